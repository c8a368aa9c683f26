"""The helpers that scripts repeat on purpose must not drift apart, and each script logs only under its own
metric names (so dashboards comparing runs of different methods compare like with like)."""

from __future__ import annotations

import ast
import inspect
import re

import pytest
import torch

import dpo
import grpo
import ppo
import reward_model
import sft
import spin
import steerlm
from common import data
from common.dist import init_distributed
from conftest import ROOT

TWINS = [
    (ppo.masked_mean, grpo.masked_mean),
    (ppo.whiten, grpo.whiten),
    (dpo.sequence_logprobs, spin.sequence_logprobs),
    (dpo.pair_logprobs, spin.pair_logprobs),
    (sft.count_label_tokens, steerlm.count_label_tokens),
    (sft.sft_loss_sum, steerlm.sft_loss_sum),
]


@pytest.mark.parametrize("a, b", TWINS, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_repeated_helpers_are_identical(a, b):
    assert inspect.getsource(a) == inspect.getsource(b), (
        f"{a.__module__}.{a.__name__} and {b.__module__}.{b.__name__} drifted apart"
    )


def test_sequence_logprobs_agree_across_scripts(demo_base, tokenizer):
    """dpo/spin (right-padded prompt+response) and ppo (left-padded prompt, right-padded response) compute the
    same log-probabilities of the same responses, up to one documented difference: ppo scores sampled tokens
    under the distribution generation samples from, without the pad token (common.generation.never_sampled);
    the offline scripts score dataset answers under the model's full softmax. With the pad logit removed from the
    model's output they agree to 1e-5; without, they differ by the pad token's probability mass."""
    from common.models import load_causal_lm

    model = load_causal_lm(str(demo_base), torch.device("cpu")).eval()
    pad = tokenizer.pad_token_id
    prompts, responses = [[1, 4, 40, 41, 5], [1, 4, 40, 5]], [[50, 51, 52, 2], [60, 2]]
    queries = torch.tensor([[1, 4, 40, 41, 5], [pad, 1, 4, 40, 5]])
    resp = torch.tensor([[50, 51, 52, 2], [60, 2, pad, pad]])
    with torch.no_grad():
        per_token = ppo.response_logprobs(model, queries, resp, pad, temperature=1.0)
        full_softmax, _ = dpo.sequence_logprobs(model, prompts, responses, pad, torch.device("cpu"))
        hook = model.lm_head.register_forward_hook(
            lambda m, i, out: out.index_fill(-1, torch.tensor([pad]), -torch.inf)
        )
        without_pad, _ = dpo.sequence_logprobs(model, prompts, responses, pad, torch.device("cpu"))
        hook.remove()
    assert torch.allclose(without_pad, per_token.sum(-1), atol=1e-5)
    assert (full_softmax - per_token.sum(-1)).abs().min() > 1e-4  # the pad token's mass is really there


def test_ppo_logprobs_use_the_sampling_distribution(demo_base, tokenizer):
    """ppo's old/new/reference log-probs are those of softmax(logits / T) with the pad logit at -inf, the
    distribution `generate` samples from (review item: they used the full softmax, so the ratio and KL were taken
    on another distribution than the one that sampled)."""
    from common.models import load_causal_lm

    model = load_causal_lm(str(demo_base), torch.device("cpu")).eval()
    pad, T = tokenizer.pad_token_id, 0.7
    queries = torch.tensor([[1, 4, 40, 41, 5], [pad, 1, 4, 40, 5]])
    resp = torch.tensor([[50, 51, 52, 2], [60, 2, pad, pad]])
    with torch.no_grad():
        got = ppo.response_logprobs(model, queries, resp, pad, temperature=T)
        logits = model(**ppo.sequence_inputs(queries, resp, pad)).logits[:, 4:-1]  # positions predicting responses
        logits[..., pad] = -torch.inf
        expected = torch.log_softmax(logits / T, -1).gather(-1, resp.clamp(max=logits.shape[-1] - 1)[..., None])[..., 0]
    mask = resp != pad
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)
    assert (got[~mask] == 0).all()


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_tokenizer(demo_base, tmp_path):
    """The demo tokenizer with a ChatML (Qwen-style) template: its EOS is <|im_end|>, followed by a newline."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(tmp_path / "chatml")
    return tok


@pytest.mark.parametrize("template", ["demo", "chatml"])
def test_reward_model_scores_the_same_tokens_in_training_statistics_and_rl(demo_base, tokenizer, tmp_path, template):
    """reward_model.py's held-out evaluation (whose scores are also the inputs of the stored score_mean/score_std)
    and the RL scripts' scoring of a generated reply (common.rewards.score_replies, used by ppo.py) read the same
    number for the same prompt + reply text. A generated reply is its content's tokens then EOS: it has no newline
    after the end-of-turn token, which the chat template writes; scoring the rendered text with that newline (what
    reward_model.py did before) reads another position and gives another number, so the check can fail."""
    from common import rewards
    from common.models import load_sequence_classifier

    tok = tokenizer if template == "demo" else chatml_tokenizer(demo_base, tmp_path)
    torch.manual_seed(0)  # the random score head (and resized embeddings): not whatever the worker ran before
    model = load_sequence_classifier(
        str(demo_base), torch.device("cpu"), 1, pad_token_id=tok.pad_token_id, init_head=True
    ).eval()
    model.resize_token_embeddings(len(tok))
    args = reward_model.Args(max_seq_len=96, max_prompt_len=64, local_micro_batch_size=4)
    records = [
        {"prompt": [{"role": "user", "content": "What is 42 + 5?"}], "chosen": "42 plus 5 makes 47. The answer is 47.",
         "rejected": "The answer is 48.", "margin": None},
        {"prompt": [{"role": "user", "content": "Reverse the letters c a t."}], "chosen": "t a c",
         "rejected": "Let me work this out. The letters reversed are t c a.", "margin": None},
    ]  # fmt: skip
    items = [reward_model.tokenize_example(tok, r, args, [], f"row {i}") for i, r in enumerate(records)]
    with torch.no_grad():
        _, held_out = reward_model.evaluate(model, items, args, init_distributed(), tok.pad_token_id, [])
    eval_chosen, eval_rejected = held_out[:2], held_out[2:]  # evaluate scores chosen rows, then rejected

    prompts = [data.render(tok, r["prompt"], add_generation_prompt=True) for r in records]
    generated = lambda text: data.encode(tok, text) + [tok.eos_token_id]  # noqa: E731 (content tokens, then EOS)
    with torch.no_grad():
        rl_chosen = rewards.score_replies(model, prompts, [generated(r["chosen"]) for r in records],
                                          tok.pad_token_id, tok.eos_token_id, torch.device("cpu"))[:, 0]  # fmt: skip
        rendered = [data.render(tok, r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]) for r in records]
        with_newline = rewards.score_sequences(model, rendered, tok.pad_token_id, torch.device("cpu"))[:, 0]
    assert rendered[0][-2] == tok.eos_token_id and rendered[0][-1] != tok.eos_token_id  # the template's trailing text
    assert torch.allclose(eval_chosen, rl_chosen, atol=1e-5), (eval_chosen, rl_chosen)
    assert (with_newline - rl_chosen).abs().min() > 1e-3  # the old read-out position really scores differently
    assert eval_rejected.shape == (2,)


# Metric namespaces per script: DESIGN.md's names plus each script's own prefix. A key outside its script's
# namespaces (e.g. a PPO name in dpo.py) fails.
NAMESPACES = {
    "sft.py": {"train", "eval", "perf", "initial"},
    "reward_model.py": {"train", "eval", "perf", "reward"},
    "dpo.py": {"train", "eval", "perf", "initial", "rewards", "logps"},
    "spin.py": {"train", "eval", "perf", "initial", "rewards", "logps", "spin", "iter", "gap"},
    "steerlm.py": {"train", "eval", "perf", "initial", "steer", "contrast", "label"},
    "ppo.py": {"objective", "ppo", "perf", "eval", "initial"},
    "grpo.py": {"objective", "reward", "grpo", "perf", "eval", "initial"},
    "rejection_sampling.py": {"reward", "rs", "perf", "eval", "initial"},
    "distill.py": {"train", "eval", "perf", "initial", "distill"},
}
METRIC = re.compile(r"^([a-z]+)(?:_\d+)?/[a-z_0-9/{}]+$")


def metric_literals(path) -> set[str]:
    keys = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and METRIC.match(node.value):
            keys.add(node.value)
        if isinstance(node, ast.JoinedStr):  # f-strings: the literal head, e.g. f"eval/mae/{name}"
            head = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if METRIC.match(head.split("{")[0] + "x"):
                keys.add(head)
    return keys


@pytest.mark.parametrize("script", sorted(NAMESPACES))
def test_each_script_logs_only_under_its_own_metric_names(script):
    keys = metric_literals(ROOT / script)
    assert keys, "no metric names found: the scan is broken"
    foreign = sorted(k for k in keys if METRIC.match(k.split("{")[0] + "x").group(1) not in NAMESPACES[script])
    # paths that look like metric names but are files (e.g. "out/sft") are not metrics
    foreign = [k for k in foreign if not k.startswith(("out/", "bench/", "tests/"))]
    assert not foreign, f"{script} logs outside its namespaces {sorted(NAMESPACES[script])}: {foreign}"


def test_design_metric_names_are_used():
    """The names DESIGN.md promises appear in the scripts that own them."""
    ppo_keys = metric_literals(ROOT / "ppo.py")
    for key in ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "ppo/policy/approxkl_avg", "ppo/policy/clipfrac_avg", "ppo/loss/policy_avg",
                "ppo/loss/value_avg", "ppo/val/clipfrac_avg", "ppo/val/num_eos_tokens", "ppo/lr", "perf/tokens_per_sec"]:  # fmt: skip
        assert key in ppo_keys, key
    for script in ("dpo.py", "spin.py"):
        keys = metric_literals(ROOT / script)
        for key in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ]:
            assert key in keys, (script, key)
    for script in ("sft.py", "steerlm.py"):
        assert {"train/loss", "eval/loss"} <= metric_literals(ROOT / script), script
    grpo_keys = metric_literals(ROOT / "grpo.py")
    assert "reward/" in metric_literals(ROOT / "common" / "rewards.py")  # reward/<name> of every source (RewardSources)
    for key in ["objective/kl", "objective/entropy", "reward/mean", "reward/std", "grpo/zero_std_groups",
                "grpo/clipfrac_low", "grpo/clipfrac_high", "grpo/loss", "grpo/response_length", "grpo/truncated_frac",
                "perf/tokens_per_sec"]:  # fmt: skip
        assert key in grpo_keys, key
