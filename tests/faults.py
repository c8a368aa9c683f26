"""What every training script must survive (issue: "the fault tests every script must pass").

For each of sft, reward_model, dpo, ppo, grpo, rejection_sampling, steerlm (train) and spin, on a tiny CPU run at
a fixed seed:
  - kill -9 once metrics are logged past the last checkpoint, then `--resume`: the continued run starts at the
    checkpoint's step and logs the same losses as an uninterrupted one (fp32; the losses after the checkpoint are
    recomputed, not lost or doubled); for PPO with --adaptive-kl also the KL coefficient;
  - SIGTERM (and SIGINT, for sft): a checkpoint is written, the process says where and exits 0, the model on disk
    loads, and `--resume` finishes with the uninterrupted run's losses;
  - a NaN loss (here: a model whose final norm is NaN) stops the run with an error naming the step, or, with
    --skip-nonfinite, is skipped and counted; a loss that turns NaN only at a later step is reported as that step.
A kill in the middle of writing a checkpoint is covered in-process in tests/test_checkpoint.py, bad input per
contract in tests/test_data.py and per script in each script's tests, and torchrun parity there too.

This module holds the runs, fixtures and checks; the tests are in tests/test_faults_supervised.py (sft,
reward_model, dpo, steerlm, spin) and tests/test_faults_online.py (ppo, grpo, rejection_sampling): two files, so
that pytest-xdist's `--dist loadfile` puts them on different workers (one file was ~400 s on one worker).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from common import demo_task
from common.checkpoint import find_trainer_state
from conftest import ROOT, run_script, script_env


@pytest.fixture(scope="module", name="files")
def files_fixture(demo_base, tmp_path_factory):
    """Small datasets for every contract, and a reward model (random head) for PPO."""
    from common.models import load_sequence_classifier, load_tokenizer

    root = tmp_path_factory.mktemp("fault_data")
    tok = load_tokenizer(str(demo_base))
    rm = load_sequence_classifier(str(demo_base), torch.device("cpu"), 1, pad_token_id=tok.pad_token_id, init_head=True)
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    (root / "length_reward.py").write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    return {
        "base": str(demo_base),
        "rm": str(root / "rm"),
        "length_reward": f"{root / 'length_reward.py'}:length",
        "sft": str(demo_task.write_jsonl(demo_task.sft_rows(seed=7, n=400), root / "sft.jsonl")),
        "pairs": str(demo_task.write_jsonl(demo_task.preference_rows(seed=7, n=400), root / "pairs.jsonl")),
        "prompts": str(demo_task.write_jsonl(demo_task.prompt_rows(seed=7, n=200), root / "prompts.jsonl")),
        "attrs": str(demo_task.write_jsonl(demo_task.attribute_rows(seed=7, n=400), root / "attrs.jsonl")),
    }


STEP_FLAGS = ["--log-every", "1", "--eval-every", "0", "--warmup-steps", "2"]
SUPERVISED = ["--eval-size", "32", "--local-micro-batch-size", "8", *STEP_FLAGS]


def spec(name: str, f: dict, model: str | None = None) -> tuple[list[str], tuple[str, ...]]:
    """(command line, the metrics compared across runs) of a tiny run of each script: 10 steps or updates, 20 for
    sft, whose steps are the fastest (~50 ms on a busy CPU): a signal sent after step 1 must land before the end."""
    model = model or f["base"]
    if name == "ppo_adaptive_kl":  # the controller's coefficient moves every update and must be restored on resume
        cmd, keys = spec("ppo", f, model)
        return [*cmd, "--adaptive-kl", "--kl-horizon", "200"], (*keys, "objective/kl_coef")
    if name == "sft":
        return [
            "sft.py",
            "--model-path",
            model,
            "--data",
            f["sft"],
            "--demo-eval-prompts",
            "0",
            "--total-steps",
            "20",
            *SUPERVISED,
        ], ("train/loss",)
    if name == "reward_model":
        cmd = ["reward_model.py", "--model-path", model, "--data", f["pairs"], "--total-steps", "10", *SUPERVISED]
        return cmd, ("train/loss",)
    if name == "dpo":
        return [
            "dpo.py",
            "--model-path",
            model,
            "--data",
            f["pairs"],
            "--demo-eval-prompts",
            "0",
            "--total-steps",
            "10",
            *SUPERVISED,
        ], ("train/loss",)
    if name == "steerlm":
        return ["steerlm.py", "train", "--model-path", model, "--data", f["attrs"], "--demo-eval-prompts", "0",
                "--steer-prompts", "0", "--total-steps", "10", *SUPERVISED], ("train/loss",)  # fmt: skip
    if name == "ppo":
        return ["ppo.py", "--model-path", model, "--reward-model-path", f["rm"], "--data", f["prompts"],
                "--total-episodes", "80", "--local-rollout-batch-size", "8", "--response-length", "10",
                "--demo-eval-prompts", "0", "--sample-every", "0",
                "--log-every", "1"], ("ppo/loss/policy_avg",)  # fmt: skip
    if name == "grpo":
        return ["grpo.py", "--model-path", model, "--data", f["prompts"], "--reward-fn", f["length_reward"],
                "--total-episodes", "40", "--local-rollout-batch-size", "4", "--num-generations", "4",
                "--response-length", "10", "--learning-rate", "1e-3", "--demo-eval-prompts", "0", "--sample-every", "0",
                "--log-every", "1"], ("grpo/loss",)  # fmt: skip
    if name == "rejection_sampling":
        return ["rejection_sampling.py", "--model-path", model, "--data", f["prompts"], "--reward-fn",
                f["length_reward"], "--total-episodes", "40", "--local-rollout-batch-size", "4", "--num-rollouts", "4",
                "--top-n", "2", "--keep-truncated", "--response-length", "10", "--learning-rate", "1e-3",
                "--demo-eval-prompts", "0", "--sample-every", "0", "--log-every", "1"], ("rs/loss",)  # fmt: skip
    if name == "spin":
        return ["spin.py", "--model-path", model, "--data", f["sft"], "--iterations", "1", "--num-prompts", "80",
                "--max-new-tokens", "10", "--local-micro-batch-size", "8", "--eval-size", "16",
                "--demo-eval-prompts", "0", "--log-every", "1", "--eval-every", "0"], ("train/loss",)  # fmt: skip
    raise ValueError(name)


SCRIPTS = ["sft", "reward_model", "dpo", "ppo", "grpo", "rejection_sampling", "steerlm", "spin"]


def log_rows(out) -> list[dict]:
    """The complete lines of metrics.jsonl (a running process may be in the middle of writing the last one)."""
    path = out / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def logged(out, key: str) -> list[float]:
    return [r[key] for r in log_rows(out) if key in r]


def series(out, keys: tuple[str, ...]) -> dict[str, list]:
    """The steps and values of `keys` over the rows that log keys[0] (one per training step or update)."""
    rows = [r for r in log_rows(out) if keys[0] in r]
    return {k: [r[k] for r in rows] for k in ("step", *keys)}


def assert_same_series(got: dict, expected: dict) -> None:
    assert got["step"] == expected["step"], (got["step"], expected["step"])  # nothing lost, nothing logged twice
    differ = [k for k, values in expected.items() if got[k] != pytest.approx(values, rel=1e-5, abs=1e-6)]
    assert not differ, {k: {"got": got[k], "expected": expected[k]} for k in differ}


def checkpoint_step(out) -> int | None:
    """The step of the trainer state `--resume` would load (None while there is none, or mid-swap)."""
    try:
        path = find_trainer_state(out)
        return json.loads((path / "COMPLETE").read_text())["step"] if path else None
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def resumed_from(output: str) -> int:
    """The step a run starts at, from its startup line (`start_step=` or, for PPO and GRPO, `start_update=`)."""
    found = re.findall(r"\bstart_(?:step|update)=(\d+)", output)
    assert len(found) == 1, output[-3000:]
    return int(found[0])


def start(cmd: list[str], out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *cmd, "--output-dir", str(out)], cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.fixture(scope="module", name="uninterrupted")
def uninterrupted_fixture(files, tmp_path_factory):
    """The logged series of an uninterrupted run of each case: run once, shared by the kill -9 and signal tests."""
    cache = {}

    def get(name: str) -> dict[str, list]:
        if name not in cache:
            cmd, keys = spec(name, files)
            out = tmp_path_factory.mktemp(f"straight_{name}")
            run_script(*cmd, "--output-dir", str(out), "--save-every", "0")
            cache[name] = series(out, keys)
            assert len(cache[name]["step"]) >= 5, cache[name]
        return cache[name]

    return get


@pytest.fixture(scope="module", name="nan_model")
def nan_model_fixture(demo_base, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("nan") / "model"
    model = AutoModelForCausalLM.from_pretrained(demo_base)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(demo_base).save_pretrained(path)
    return str(path)


def check_kill9_then_resume(name, files, uninterrupted, tmp_path):
    """kill -9 once metrics are logged past the last checkpoint: the resumed run must start at the checkpoint's step,
    drop what the killed run logged after it, redo those steps, and end with the uninterrupted run's series. A resume
    that restarted from step 0 (and rewrote the whole log) or kept the killed run's extra lines fails here."""
    cmd, keys = spec(name, files)
    expected = uninterrupted(name)
    out = tmp_path / "killed"
    proc = start([*cmd, "--save-every", "3"], out)
    deadline = time.time() + 300
    while (saved := checkpoint_step(out)) is None or max((r["step"] for r in log_rows(out)), default=-1) <= saved:
        assert proc.poll() is None, f"finished before logging past a checkpoint:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "nothing logged past a checkpoint in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoint_step(out)  # what --resume loads, read again now that nothing is writing
    assert saved > 0 and max(r["step"] for r in log_rows(out)) > saved  # lines past the checkpoint, to be redone
    resumed = run_script(*cmd, "--output-dir", str(out), "--save-every", "3", "--resume")
    assert resumed_from(resumed.stdout) == saved
    assert_same_series(series(out, keys), expected)


def check_stop_signal(name, sig, files, uninterrupted, tmp_path):
    """SIGTERM (SIGINT for sft): a checkpoint at the next step boundary, a line naming it, exit 0; `--resume` starts
    there and ends with the uninterrupted run's series. The signal goes out once the first step is logged, with most
    of the run still to go (sft: 19 of 20 steps), so it lands mid-run: a run without the handler (killed, rc -15; or
    a KeyboardInterrupt) fails here instead of being skipped."""
    cmd, keys = spec(name, files)
    expected = uninterrupted(name)
    out = tmp_path / "run"
    proc = start(cmd, out)
    deadline = time.time() + 300
    while not logged(out, keys[0]):
        assert proc.poll() is None, f"finished before the first log line:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{output[-3000:]}"
    saved_at = rf"{sig.name}: checkpoint saved at (?:step|update|iteration 1 step) (\d+) in {re.escape(str(out))};"
    match = re.search(saved_at, output)
    assert match, output[-3000:]
    stopped = int(match.group(1))
    assert 0 < stopped < expected["step"][-1] and checkpoint_step(out) == stopped  # mid-run, and on disk
    from transformers import AutoConfig

    AutoConfig.from_pretrained(out)
    resumed = run_script(*cmd, "--output-dir", str(out), "--resume")
    assert resumed_from(resumed.stdout) == stopped
    assert_same_series(series(out, keys), expected)
