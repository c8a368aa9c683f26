"""The helpers that scripts repeat on purpose must not drift apart, and each script logs only under its own
metric names (so dashboards comparing runs of different methods compare like with like)."""

from __future__ import annotations

import ast
import inspect
import re

import pytest
import torch

import dpo
import ppo
import reward_model
import sft
import spin
import steerlm
from conftest import ROOT

TWINS = [
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
    same log-probabilities of the same responses."""
    from common.models import load_causal_lm

    model = load_causal_lm(str(demo_base), torch.device("cpu")).eval()
    pad = tokenizer.pad_token_id
    prompts, responses = [[1, 4, 40, 41, 5], [1, 4, 40, 5]], [[50, 51, 52, 2], [60, 2]]
    with torch.no_grad():
        summed, _ = dpo.sequence_logprobs(model, prompts, responses, pad, torch.device("cpu"))
        queries = torch.tensor([[1, 4, 40, 41, 5], [pad, 1, 4, 40, 5]])
        resp = torch.tensor([[50, 51, 52, 2], [60, 2, pad, pad]])
        per_token = ppo.response_logprobs(model, queries, resp, pad, temperature=1.0)
    assert torch.allclose(summed, per_token.sum(-1), atol=1e-5)


def test_reward_scores_agree_with_steerlm_attribute_predictions(demo_base, tokenizer):
    from common.models import load_sequence_classifier

    model = load_sequence_classifier(
        str(demo_base), torch.device("cpu"), 3, pad_token_id=tokenizer.pad_token_id, init_head=True
    ).eval()
    seqs = [[1, 4, 40, 41, 5, 50, 2], [1, 4, 40, 5, 60, 61, 62, 63, 2]]
    with torch.no_grad():
        a = reward_model.scores(model, seqs, tokenizer.pad_token_id, torch.device("cpu"))
        b = steerlm.predict_attributes(model, seqs, tokenizer.pad_token_id, torch.device("cpu"))
    assert torch.allclose(a.float(), b.float(), atol=1e-5)


# Metric namespaces per script: DESIGN.md's names plus each script's own prefix. A key outside its script's
# namespaces (e.g. a PPO name in dpo.py) fails.
NAMESPACES = {
    "sft.py": {"train", "eval", "perf", "initial"},
    "reward_model.py": {"train", "eval", "perf", "reward"},
    "dpo.py": {"train", "eval", "perf", "initial", "rewards", "logps"},
    "spin.py": {"train", "eval", "perf", "initial", "rewards", "logps", "spin", "iter"},
    "steerlm.py": {"train", "eval", "perf", "initial", "steer", "contrast", "label"},
    "ppo.py": {"objective", "ppo", "perf", "eval", "initial"},
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
