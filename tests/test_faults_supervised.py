"""Fault tests of the supervised scripts -- sft, reward_model, dpo, steerlm (train), spin: kill -9 + resume, SIGTERM
(and SIGINT for sft), NaN losses. What each checks, and the runs they use, are in tests/faults.py."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from common import data, demo_task
from conftest import run_script
from faults import (  # noqa: F401  (one set per file)
    STEP_FLAGS,
    check_kill9_then_resume,
    check_stop_signal,
    files_fixture,
    logged,
    nan_model_fixture,
    spec,
    uninterrupted_fixture,
)

pytestmark = pytest.mark.slow

SCRIPTS = ["sft", "reward_model", "dpo", "steerlm", "spin"]
SIGNAL_CASES = [(name, signal.SIGTERM) for name in SCRIPTS] + [("sft", signal.SIGINT)]


@pytest.mark.parametrize("name", SCRIPTS)
def test_kill9_then_resume_equals_uninterrupted(name, files, uninterrupted, tmp_path):
    check_kill9_then_resume(name, files, uninterrupted, tmp_path)


@pytest.mark.parametrize("name, sig", SIGNAL_CASES, ids=[f"{n}-{s.name}" for n, s in SIGNAL_CASES])
def test_stop_signal_checkpoints_exits_zero_and_resumes(name, sig, files, uninterrupted, tmp_path):
    check_stop_signal(name, sig, files, uninterrupted, tmp_path)


@pytest.mark.parametrize("name", ["sft", "reward_model", "dpo", "steerlm", "spin"])
def test_nonfinite_loss_names_the_step_or_is_skipped(name, files, nan_model, tmp_path):
    cmd, _ = spec(name, files, model=nan_model)
    if "--total-steps" in cmd:  # spin's steps follow from its prompts
        cmd[cmd.index("--total-steps") + 1] = "2"  # two steps are enough
    proc = run_script(*cmd, "--output-dir", str(tmp_path / "stop"), check=False)
    assert proc.returncode != 0
    assert "non-finite loss at step 0 (NaN or Inf)" in proc.stderr
    run_script(*cmd, "--output-dir", str(tmp_path / "skip"), "--skip-nonfinite")
    result = json.loads((tmp_path / "skip" / "eval.json").read_text())
    assert result.get("train/skipped_steps", 0) >= 2, result


def test_nonfinite_loss_at_a_later_step_names_that_step(demo_base, tmp_path):
    """A loss that turns NaN at step K = 4, not 0, is reported as step 4: the step after the last one logged.

    Deterministic, no divergence to wait for: the demo model with untied embeddings whose *input* embedding of
    `<|system|>` is NaN, and one training row with a system turn, placed where `data.step_indices` puts it in step
    K's global batch. No other row renders `<|system|>`, so steps 0..K-1 are finite and logged, step K is NaN."""
    from transformers import AutoModelForCausalLM

    from common.models import load_tokenizer

    K, eval_size, batch_size = 4, 16, 8
    tokenizer = load_tokenizer(str(demo_base))
    model = AutoModelForCausalLM.from_pretrained(demo_base)
    model.config.tie_word_embeddings = False  # the output embedding stays finite: other sequences keep their loss
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.convert_tokens_to_ids("<|system|>")] = float("nan")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = demo_task.sft_rows(seed=7, n=80)
    i = data.step_indices(len(rows) - eval_size, batch_size, K, seed=1)[0]  # sft.py's default --seed is 1
    rows[i] = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": rows[i]["prompt"]},
                            {"role": "assistant", "content": rows[i]["completion"]}]}  # fmt: skip
    path = demo_task.write_jsonl(rows, tmp_path / "sft.jsonl")
    proc = run_script("sft.py", "--model-path", str(tmp_path / "model"), "--data", str(path), "--eval-size",
                      str(eval_size), "--local-micro-batch-size", str(batch_size), "--total-steps", "8",
                      "--demo-eval-prompts", "0", *STEP_FLAGS, "--output-dir", str(tmp_path / "run"),
                      check=False)  # fmt: skip
    assert proc.returncode != 0
    losses = logged(tmp_path / "run", "train/loss")
    assert logged(tmp_path / "run", "step") == list(range(1, K + 1)) and all(map(math.isfinite, losses)), losses
    assert f"non-finite loss at step {K} (NaN or Inf)" in proc.stderr, proc.stderr[-3000:]
