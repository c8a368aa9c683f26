"""Tokenizers as real models ship them, built here without downloads: Qwen2.5-like (ChatML template, pad == EOS, or no
pad and no spare token) and Llama-3-like (no pad, no template in the base model, two EOS ids in
generation_config.json). Byte-level BPEs trained on demo-task text with the real pre-tokenizer regexes, saved with a
random tiny Llama (builders shared with tests/test_real_shapes.py, in examples/make_dry_run_inputs.py). Covered: the
pad `load_tokenizer` picks, the embeddings that grow with it, EOS still trained and attended, `--chat-template`,
several EOS ids in generation, and short sft.py -> grpo.py runs on each."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch

from common import data, demo_task, models, rewards
from common.dist import init_distributed
from common.generation import generate, is_eos, sequence_inputs, truncate_after_eos
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "examples"))
import make_dry_run_inputs as inputs  # noqa: E402
from make_dry_run_inputs import (  # noqa: E402
    LLAMA3_SPLIT,
    LLAMA_SPECIALS,
    QWEN2_SPLIT,
    QWEN_BARE_SPECIALS,
    QWEN_SPECIALS,
    QWEN_TEMPLATE,
)

CPU = torch.device("cpu")
NO_TEMPLATE = "the tokenizer has no chat template; pass --chat-template chatml|llama3|plain|FILE"


def build(path, *, split, specials, eos, bos=None, pad=None, template=None, generation_eos=None, tie=True):
    """A byte-level BPE (400 tokens) with these special tokens, and a random 2-layer Llama of its vocabulary size."""
    tokenizer = inputs.build_tokenizer(split=split, specials=specials, eos=eos, bos=bos, pad=pad, template=template)
    return inputs.save_model(path, tokenizer, tie_word_embeddings=tie, generation_eos=generation_eos)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {
        # Qwen2.5 base: pads with EOS, ships a ChatML template, tied embeddings
        "qwen": build(root / "qwen", split=QWEN2_SPLIT, specials=QWEN_SPECIALS, eos="<|endoftext|>",
                      pad="<|endoftext|>", template=QWEN_TEMPLATE),
        # the same family with no pad and no spare token to pad with
        "qwen_bare": build(root / "qwen_bare", split=QWEN2_SPLIT, specials=QWEN_BARE_SPECIALS, eos="<|endoftext|>",
                           template=QWEN_TEMPLATE),
        # Llama-3 base: no pad, no template, untied; generation_config lists two EOS ids (as Instruct does)
        "llama": build(root / "llama", split=LLAMA3_SPLIT, specials=LLAMA_SPECIALS, bos="<|begin_of_text|>",
                       eos="<|end_of_text|>", generation_eos=["<|eot_id|>", "<|end_of_text|>"], tie=False),
    }  # fmt: skip


def ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


# --- the pad token --------------------------------------------------------------------------------------------


def test_pad_is_a_spare_special_token_and_is_printed(real, capsys):
    """Qwen-like (pad == EOS): <|fim_pad|>, not <|vision_pad|> (lower id, but a multimodal placeholder) nor a token
    of the template. Llama-like (no pad) with the llama3 template: the first reserved token."""
    qwen = models.load_tokenizer(real["qwen"])
    assert (qwen.pad_token, qwen.eos_token) == ("<|fim_pad|>", "<|endoftext|>")
    assert ids(qwen, "<|vision_pad|>")[0] < qwen.pad_token_id
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "pad token '<|fim_pad|>'" in lines[0] and "was EOS '<|endoftext|>'" in lines[0], lines
    llama = models.load_tokenizer(real["llama"], chat_template="llama3")
    assert llama.pad_token == "<|reserved_special_token_0|>" and llama.pad_token_id not in (
        llama.eos_token_id, llama.bos_token_id)  # fmt: skip
    assert "was none" in capsys.readouterr().out


def test_pad_skips_tokens_the_template_writes(real, tmp_path):
    """A template (FILE) that writes <|reserved_special_token_0|> makes it taken: the next reserved token pads."""
    template = tmp_path / "t.jinja"
    template.write_text(models.CHAT_TEMPLATES["llama3"].replace("<|eot_id|>", "<|reserved_special_token_0|>"))
    tok = models.load_tokenizer(real["llama"], chat_template=str(template))
    assert tok.chat_template == template.read_text() and tok.pad_token == "<|reserved_special_token_1|>"


def test_no_spare_token_adds_pad_and_the_embeddings_grow(real):
    """<|pad|> is added as a new id; load_causal_lm(vocab_size=len(tokenizer)) grows the (tied) embeddings by one
    row set to the mean of the others and leaves the old rows alone; it never shrinks them."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(real["qwen_bare"]).get_input_embeddings().weight.detach()
    tok = models.load_tokenizer(real["qwen_bare"])
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == len(tok) - 1 == original.shape[0]
    model = models.load_causal_lm(real["qwen_bare"], CPU, vocab_size=len(tok))
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == len(tok) == model.config.vocab_size and model.lm_head.weight.shape[0] == len(tok)
    assert torch.equal(emb[:-1], original) and torch.allclose(emb[-1], original.mean(0))
    assert models.load_causal_lm(real["qwen_bare"], CPU, vocab_size=5).get_input_embeddings().weight.shape[0] == len(
        original
    )
    rm = models.load_sequence_classifier(real["qwen_bare"], CPU, 1, pad_token_id=tok.pad_token_id, vocab_size=len(tok))
    assert rm.get_input_embeddings().weight.shape[0] == len(tok)


def test_untied_head_grows_with_template_tokens(real):
    """`--chat-template chatml` on a Llama-like vocabulary adds <|im_start|> and <|im_end|>; an untied LM head grows
    with the embeddings, its new rows also at the mean; the reply then ends at <|im_end|>."""
    tok = models.load_tokenizer(real["llama"], chat_template="chatml")
    added = ids(tok, "<|im_start|>", "<|im_end|>")
    assert added == [len(tok) - 2, len(tok) - 1]
    model = models.load_causal_lm(real["llama"], CPU, vocab_size=len(tok))
    head, emb = model.lm_head.weight.detach(), model.get_input_embeddings().weight.detach()
    assert head.shape[0] == emb.shape[0] == len(tok) and head.data_ptr() != emb.data_ptr()
    assert torch.allclose(head[-1], head[:-2].mean(0))
    assert added[1] in models.end_of_turn_ids(tok, real["llama"])


# --- EOS is trained on and attended, with a tokenizer that padded with EOS ---------------------------------------


def test_eos_is_labelled_and_not_masked_as_padding(real):
    """Qwen-like, pad == EOS originally, `plain` template (the reply ends with EOS itself): the SFT labels keep
    the EOS; right padding after a shorter example masks the padding but not its EOS; the RL model inputs attend
    to a response's EOS. With the pad left at EOS, the last two would mask the EOS."""
    tok = models.load_tokenizer(real["qwen"], chat_template="plain")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert pad != eos
    user = {"role": "user", "content": "Add 2 and 2."}
    long = data.tokenize_sft(tok, {"messages": [user, {"role": "assistant", "content": "It is 4, I think."}]}, 96, "x")
    short = data.tokenize_sft(tok, {"messages": [user, {"role": "assistant", "content": "4"}]}, 96, "x")
    assert short["input_ids"][-1] == eos and short["labels"][-1] == eos
    batch = data.collate([long, short], pad)
    n = len(short["input_ids"])
    assert batch["attention_mask"][1, n - 1] == 1 and batch["labels"][1, n - 1] == eos
    assert batch["attention_mask"][1, n:].sum() == 0 and (batch["input_ids"][1, n:] == pad).all()
    prompt = data.render(tok, [user], add_generation_prompt=True)
    reply = data.tokenize_response(tok, [user], prompt, "4", "x")
    assert reply[-1] == eos
    inputs = sequence_inputs(data.pad([prompt], pad, "left"), data.pad([reply], pad, "right", len(reply) + 2), pad)
    assert inputs["attention_mask"][0].tolist() == [1] * (len(prompt) + len(reply)) + [0, 0]


# --- chat templates -----------------------------------------------------------------------------------------------


def test_no_template_and_no_flag_is_a_one_line_error(real):
    with pytest.raises(ValueError) as e:
        models.load_tokenizer(real["llama"])
    assert str(e.value) == f"{real['llama']}: {NO_TEMPLATE}"
    with pytest.raises(ValueError, match=r"^--chat-template 'nope': not a built-in template nor a file; use "):
        models.load_tokenizer(real["llama"], chat_template="nope")


def test_builtin_templates_render_and_are_prefix_stable(real):
    """Exact renderings; multi-turn conversations (with a system turn) keep labels on the assistant turns only,
    which needs prefix stability under the real pre-tokenizers."""
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 2."},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 and 3?"},
                    {"role": "assistant", "content": "6"}]  # fmt: skip
    expected = {
        "plain": "<|begin_of_text|>System: Be brief.\n\nUser: Add 2 and 2.\n\nAssistant: 4<|end_of_text|>",
        "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 2.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 2 and 2.<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n",
    }
    for name, text in expected.items():
        tok = models.load_tokenizer(real["llama"], chat_template=name)
        assert tok.apply_chat_template(conversation[:3], tokenize=False) == text, name
        ids_, labels = data.tokenize_conversation(tok, conversation, name)
        answers = tok.decode([i for i, lab in zip(ids_, labels) if lab != data.IGNORE_INDEX])
        assert answers.replace(" ", "") == {"plain": "4<|end_of_text|>6<|end_of_text|>",
                                            "llama3": "4<|eot_id|>6<|eot_id|>",
                                            "chatml": "4<|im_end|>\n6<|im_end|>\n"}[name], (name, answers)  # fmt: skip


def test_flag_overrides_the_tokenizers_own_template(real):
    own = models.load_tokenizer(real["qwen"])
    assert own.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>system")
    plain = models.load_tokenizer(real["qwen"], chat_template="plain")
    text = plain.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "User: hi\n\nAssistant:"


# --- several EOS ids -------------------------------------------------------------------------------------------


def test_end_of_turn_ids(real, demo_base, tmp_path):
    """Llama-like: EOS + generation_config's list (+ the llama3 template's <|eot_id|>); Qwen-like with its ChatML:
    EOS + <|im_end|>; the demo tokenizer: its one EOS (behaviour unchanged); no generation_config.json: no error."""
    llama = models.load_tokenizer(real["llama"], chat_template="llama3")
    assert models.end_of_turn_ids(llama, real["llama"]) == ids(llama, "<|end_of_text|>", "<|eot_id|>")
    plain = models.load_tokenizer(real["llama"], chat_template="plain")
    assert models.end_of_turn_ids(plain) == ids(plain, "<|end_of_text|>")
    qwen = models.load_tokenizer(real["qwen"])
    assert models.end_of_turn_ids(qwen, real["qwen"]) == ids(qwen, "<|endoftext|>", "<|im_end|>")
    demo = models.load_tokenizer(str(demo_base))
    assert models.end_of_turn_ids(demo, str(demo_base)) == [demo.eos_token_id]
    demo.save_pretrained(tmp_path)  # a tokenizer directory without generation_config.json
    assert models.end_of_turn_ids(demo, str(tmp_path)) == [demo.eos_token_id]


def test_generation_stops_at_either_eos(real):
    """A Llama-like model whose LM head always emits <|end_of_text|>, the second id of [<|eot_id|>, <|end_of_text|>]:
    with both ids each reply is that one token; with <|eot_id|> alone it runs to max_new_tokens."""
    tok = models.load_tokenizer(real["llama"], chat_template="llama3", padding_side="left")
    eot, end = ids(tok, "<|eot_id|>", "<|end_of_text|>")
    model = models.load_causal_lm(real["llama"], CPU, vocab_size=len(tok))
    head = torch.nn.Linear(64, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[end] = 10.0
    model.lm_head = head
    prompts = [
        data.render(tok, [{"role": "user", "content": p}], add_generation_prompt=True) for p in ("hi", "Add 2 and 2.")
    ]
    dist = init_distributed()
    eos_ids = models.end_of_turn_ids(tok, real["llama"])
    assert set(eos_ids) == {eot, end}
    assert generate(model, prompts, pad_id=tok.pad_token_id, eos_id=eos_ids, max_new_tokens=5, dist=dist) == [[end]] * 2
    assert generate(model, prompts, pad_id=tok.pad_token_id, eos_id=eot, max_new_tokens=5, dist=dist) == [[end] * 5] * 2


def test_truncation_and_reward_tokens_cut_at_any_eos():
    """Ids 7 and 9 both end a reply (pad 0): each row is cut after whichever comes first."""
    responses = torch.tensor([[5, 9, 6, 7], [5, 6, 7, 9], [5, 6, 6, 6]])
    out, mask = truncate_after_eos(responses, [7, 9], pad_id=0)
    assert out.tolist() == [[5, 9, 0, 0], [5, 6, 7, 0], [5, 6, 6, 6]]
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False], [True] * 4]
    assert is_eos(responses, (7, 9)).any(-1).tolist() == [True, True, False]
    assert rewards.reward_model_tokens([1, 2], [5, 9, 6, 7], [7, 9]) == [1, 2, 5, 9]
    assert rewards.reward_model_tokens([1, 2], [5, 9, 6, 7], 7) == [1, 2, 5, 9, 6, 7]
    assert rewards.reply_through_eos([5, 6], {7, 9}) == [5, 6]


# --- the scripts, end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("realdata")
    sft = demo_task.write_jsonl(demo_task.sft_rows(seed=3, n=24), root / "sft.jsonl")
    prompts = demo_task.write_jsonl(demo_task.prompt_rows(seed=5, n=16), root / "prompts.jsonl")
    (root / "rw.py").write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    return {"sft": str(sft), "prompts": str(prompts), "rw": str(root / "rw.py")}


SFT = ["--total-steps", "2", "--local-micro-batch-size", "4", "--eval-size", "4", "--demo-eval-prompts", "0",
       "--max-seq-len", "96", "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--warmup-steps", "0"]  # fmt: skip


def grpo_flags(f, model_path, out) -> list[str]:
    return ["--model-path", model_path, "--data", f["prompts"], "--reward-fn", f"{f['rw']}:length", "--output-dir", out,
            "--num-generations", "4", "--local-rollout-batch-size", "4", "--response-length", "8", "--total-episodes", "8",
            "--max-prompt-len", "96", "--demo-eval-prompts", "0", "--sample-every", "0", "--save-every", "0",
            "--ppo-epochs", "1", "--num-minibatches", "1"]  # fmt: skip


def grpo_updates(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "grpo/loss" in r]


@pytest.mark.parametrize(
    "name, flags, pad, template",
    [("qwen", [], "<|fim_pad|>", QWEN_TEMPLATE),
     ("llama", ["--chat-template", "llama3"], "<|reserved_special_token_0|>", models.CHAT_TEMPLATES["llama3"])],
)  # fmt: skip
def test_sft_then_grpo(real, files, tmp_path, name, flags, pad, template):
    """sft.py on the base model picks the pad (printed once) and exports it with the template; grpo.py on that
    output reads the same pad and template without being told (nothing printed) and runs its updates."""
    from transformers import AutoTokenizer

    sft_out = tmp_path / "sft"
    proc = run_script("sft.py", "--model-path", real[name], "--data", files["sft"], "--output-dir", str(sft_out),
                      *flags, *SFT)  # fmt: skip
    assert len(re.findall(rf"tokenizer .*: pad token '{re.escape(pad)}'", proc.stdout)) == 1, proc.stdout[-2000:]
    exported = AutoTokenizer.from_pretrained(sft_out)
    assert exported.pad_token == pad and exported.chat_template == template
    grpo_out = tmp_path / "grpo"
    proc = run_script("grpo.py", *grpo_flags(files, str(sft_out), str(grpo_out)))
    assert "pad token" not in proc.stdout
    rows = grpo_updates(grpo_out)
    assert len(rows) == 2 and all(math.isfinite(r["grpo/loss"]) for r in rows), proc.stdout[-2000:]
    assert AutoTokenizer.from_pretrained(grpo_out).pad_token == pad


def test_grpo_with_an_added_pad_and_the_plain_template(real, files, tmp_path):
    """No pad and no spare token: <|pad|> is added, the policy's embeddings grow, and the exported model has
    the tokenizer's size."""
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "grpo"
    proc = run_script("grpo.py", *grpo_flags(files, real["qwen_bare"], str(out)), "--chat-template", "plain")
    assert "pad token '<|pad|>' added" in proc.stdout, proc.stdout[-2000:]
    assert len(grpo_updates(out)) == 2
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == "<|pad|>" and AutoConfig.from_pretrained(out).vocab_size == len(tok)
    assert AutoConfig.from_pretrained(real["qwen_bare"]).vocab_size == len(tok) - 1
