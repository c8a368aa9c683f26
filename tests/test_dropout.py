"""Dropout is off in every model the scripts load (`common.models.disable_dropout`), whatever the config says.

GPT-2 keeps dropout 0.1 in its config (0.5 here, so a miss cannot hide), Llama 0: in train mode a model with
dropout on gives a PPO ratio that is not 1 on the first minibatch and a DPO loss that is not log 2 at step 0.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
)

from common import demo_task
from common.models import disable_dropout, load_causal_lm, load_sequence_classifier
from conftest import run_script
from kernels import selective_logprob

CPU = torch.device("cpu")
PDROP = 0.5


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    """A 2-layer GPT-2 with every dropout at 0.5, saved with the demo tokenizer (pad != EOS, chat template)."""
    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=2,
        resid_pdrop=PDROP,
        embd_pdrop=PDROP,
        attn_pdrop=PDROP,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def token_batch(tokenizer) -> torch.Tensor:
    ids = [tokenizer.encode("Add 12 and 30. The answer is 42.")] * 3
    return torch.tensor(ids)  # (B, T)


def saved_pdrop(path) -> list[float]:
    config = json.loads((path / "config.json").read_text())
    return [config[k] for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]


def test_disable_dropout_counts_what_it_changed(gpt2_dir, demo_base):
    """GPT-2, 2 layers: the embedding dropout, and per block attn_dropout, resid_dropout and the MLP's dropout
    = 1 + 3 x 2 = 7 modules. The demo Llama has only `attention_dropout = 0.0` attributes: nothing to change."""
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    assert disable_dropout(model) == 7
    assert disable_dropout(model) == 0  # idempotent
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert disable_dropout(AutoModelForCausalLM.from_pretrained(demo_base)) == 0


def test_causal_lm_is_deterministic_in_train_mode(gpt2_dir, tokenizer):
    ids = token_batch(tokenizer)
    targets = ids[:, 1:]
    # plain transformers in train mode: dropout on, two forwards differ (so the assertions below can fail)
    plain = AutoModelForCausalLM.from_pretrained(gpt2_dir).train()
    with torch.no_grad():
        assert not torch.equal(plain(ids).logits, plain(ids).logits)

    model = load_causal_lm(str(gpt2_dir), CPU).train()
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits  # (B, T, V)
        logp_train = selective_logprob(first[:, :-1], targets)  # (B, T-1)
        model.eval()
        logp_eval = selective_logprob(model(ids).logits[:, :-1], targets)
    assert torch.equal(first, second)
    ratio = torch.exp(logp_train - logp_eval)  # PPO's pi / pi_old on the first minibatch
    assert torch.equal(ratio, torch.ones_like(ratio))
    # the model's config, and hence an exported model's, keeps the user's dropout
    assert model.config.attn_pdrop == PDROP and saved_pdrop(gpt2_dir) == [PDROP] * 3


def test_float_dropout_attributes_are_zeroed_too(tmp_path):
    """OPT has no nn.Dropout: its decoder, layers and attention keep `dropout` as a float passed to F.dropout /
    sdpa, and the decoder's `layerdrop` skips whole layers at random in train mode. 2 layers: decoder dropout +
    layerdrop + 2 layers' dropout + 2 attentions' dropout = 6."""
    config = OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=32, dropout=PDROP, attention_dropout=PDROP,
                       layerdrop=PDROP)  # fmt: skip
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(tmp_path)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))  # (B, T)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).train()
    with torch.no_grad():
        assert not torch.equal(plain(ids).logits, plain(ids).logits)
    assert disable_dropout(plain) == 6
    model = load_causal_lm(str(tmp_path), CPU).train()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_sequence_classifier_is_deterministic_in_train_mode(gpt2_dir, tokenizer, tmp_path):
    ids = token_batch(tokenizer)
    plain = AutoModelForSequenceClassification.from_pretrained(gpt2_dir, num_labels=1).train()
    with torch.no_grad():
        assert not torch.equal(plain(ids).logits, plain(ids).logits)
    model = load_sequence_classifier(str(gpt2_dir), CPU, 1, pad_token_id=tokenizer.pad_token_id).train()
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits  # (B, 1)
        model.eval()
        evaluated = model(ids).logits
    assert torch.equal(first, second) and torch.equal(first, evaluated)
    model.save_pretrained(tmp_path)
    assert saved_pdrop(tmp_path) == [PDROP] * 3


def test_dpo_starts_at_log_2_with_a_dropout_model(gpt2_dir, tmp_path):
    """The policy (train mode) equals the reference (eval mode) at step 0: Delta = 0, loss = -log sigmoid(0)."""
    pairs = demo_task.write_jsonl(demo_task.preference_rows(seed=3, n=24), tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    run_script("dpo.py", "--model-path", str(gpt2_dir), "--data", str(pairs), "--output-dir", str(out),
               "--sft-loss-weight", "0", "--total-steps", "1", "--log-every", "1", "--eval-every", "0",
               "--save-every", "0", "--demo-eval-prompts", "0", "--eval-size", "8", "--local-micro-batch-size", "8",
               "--warmup-steps", "1")  # fmt: skip
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert saved_pdrop(out) == [PDROP] * 3  # the exported model keeps the config
