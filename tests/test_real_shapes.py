"""Every script at a real model's shape: random-initialised stand-ins for Qwen2.5-0.5B (Qwen2 architecture, hidden 896,
14 heads / 2 KV heads, vocabulary 151,936, tied embeddings; pad == EOS tokenizer with a ChatML template that injects
a system prompt) and Llama-3.2-1B (Llama architecture, hidden 2048, 32 / 8 heads, vocabulary 128,256, tied; no pad,
no template, two EOS ids), each with 1 layer and a narrow MLP (examples/make_dry_run_inputs.py).

What a tiny vocabulary never shows: memory and time at real V (the (B, T, V) logits, the LM-head weight the fused
log-prob path reads, `logits_to_keep`), tied embeddings staying tied through training and export, sampling from a
vocabulary much larger than the tokenizer (ids past the tokenizer's last token, as with Qwen's 151,936 rows for
151,665 tokens), and the templates. One chain per shape keeps the cost down: the Qwen chain is
`examples/real_model.sh --dry-run` (sft -> reward_model -> ppo, dpo), whose SFT output then feeds grpo,
rejection_sampling (scored by the dry run's reward model), spin, steerlm train and distill (teacher). The Llama shape
is in test_real_shapes_llama.py (a file of its own, so that the two chains run on different test workers). Each test
deletes what it wrote (a 1-layer model at these widths is ~0.6 GB a copy, ~2.5 GB a run with its trainer state).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_script, script_env

sys.path.insert(0, str(ROOT / "examples"))
import make_dry_run_inputs as inputs  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = ["--total-steps", "2", "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--warmup-steps", "0"]
ONLINE = ["--local-rollout-batch-size", "4", "--response-length", "6", "--max-prompt-len", "64", "--total-episodes",
          "8", "--log-every", "1", "--save-every", "0", "--sample-every", "0", "--demo-eval-prompts", "0"]  # fmt: skip


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def logged(out: Path, key: str) -> list[float]:
    """The values of `key` in metrics.jsonl; each must be finite."""
    values = [r[key] for r in metrics(out) if key in r]
    assert values and all(math.isfinite(v) for v in values), (key, values)
    return values


def assert_real_shape(out: Path, vocab_size: int, hidden_size: int, causal: bool = True) -> None:
    """The exported model keeps the real vocabulary and width, and its LM head is still the embedding matrix."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert (config.vocab_size, config.hidden_size) == (vocab_size, hidden_size)
    if causal:
        assert config.tie_word_embeddings
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in set(f.keys())  # tied: saved once, as the embeddings


# --- Qwen2.5-0.5B shape: the real_model.sh dry run, then the other scripts from its SFT output -----------------------


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """`bash examples/real_model.sh --dry-run OUT`: inputs, then sft, reward_model, ppo, dpo, each 2 steps/updates."""
    out = tmp_path_factory.mktemp("real_dry_run")
    env = script_env() | {"PYTHON": sys.executable}
    proc = subprocess.run(["bash", "examples/real_model.sh", "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    yield out, proc.stdout
    shutil.rmtree(out, ignore_errors=True)


def test_real_model_dry_run(qwen):
    """Each stage ran its steps with finite metrics at V = 151,936; sft.py picked the pad once (pad == EOS in the base
    tokenizer) and exported it with the template, which every later stage read without a note."""
    from transformers import AutoTokenizer

    out, stdout = qwen
    assert stdout.count("pad token '<|fim_pad|>'") == 1, stdout[-3000:]
    assert len(logged(out / "sft", "train/loss")) == 2
    assert len(logged(out / "reward_model", "train/loss")) == 2
    assert len(logged(out / "ppo", "ppo/loss/policy_avg")) == 2 and logged(out / "ppo", "ppo/loss/value_avg")
    assert len(logged(out / "dpo", "train/loss")) == 2 and (out / "dpo" / "ref_logprobs.pt").exists()
    for stage in ("sft", "ppo", "dpo"):
        assert_real_shape(out / stage, 151_936, 896)
        tok = AutoTokenizer.from_pretrained(out / stage)
        assert tok.pad_token == "<|fim_pad|>" and tok.chat_template == inputs.QWEN_TEMPLATE
    assert_real_shape(out / "reward_model", 151_936, 896, causal=False)
    assert_real_shape(out / "ppo" / "value_model", 151_936, 896, causal=False)


@pytest.fixture(scope="module")
def qwen_files(qwen):
    out, _ = qwen
    (out / "rw.py").write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    from common import demo_task

    attributes = demo_task.write_jsonl(demo_task.attribute_rows(seed=1, n=24), out / "attributes.jsonl")
    return {"sft_model": str(out / "sft"), "rm": str(out / "reward_model"), "prompts": str(out / "inputs" / "prompts.jsonl"),
            "sft": str(out / "inputs" / "sft.jsonl"), "rw": f"{out / 'rw.py'}:length", "attributes": str(attributes),
            "base": str(out / "inputs" / "model"), "chat_template": "chatml"}  # fmt: skip


# the scripts after sft at either shape; `f`: the chain's files (`chat_template`: the student base model's, distill)
RUNS = {
    "grpo": lambda f: ["grpo.py", "--model-path", f["sft_model"], "--data", f["prompts"], "--reward-fn", f["rw"],
                       "--num-generations", "4", "--ppo-epochs", "1", "--num-minibatches", "1", *ONLINE],
    "rejection_sampling": lambda f: ["rejection_sampling.py", "--model-path", f["sft_model"], "--data", f["prompts"],
                                     "--reward-model-path", f["rm"], "--num-rollouts", "2", "--top-n", "1",
                                     "--keep-truncated", *ONLINE],
    "spin": lambda f: ["spin.py", "--model-path", f["sft_model"], "--data", f["sft"], "--iterations", "1",
                       "--num-prompts", "4", "--eval-size", "4", "--max-new-tokens", "4", "--local-micro-batch-size",
                       "2", "--steps-per-iteration", "2", "--log-every", "1", "--warmup-steps", "0",
                       "--demo-eval-prompts", "0"],
    "steerlm": lambda f: ["steerlm.py", "train", "--model-path", f["sft_model"], "--data", f["attributes"],
                          "--eval-size", "4", "--local-micro-batch-size", "2", "--demo-eval-prompts", "0",
                          "--steer-prompts", "0", *STEPS],
    "distill": lambda f: ["distill.py", "--model-path", f["base"], "--teacher-path", f["sft_model"], "--data", f["sft"],
                          "--chat-template", f["chat_template"], "--eval-size", "4", "--local-micro-batch-size", "2",
                          "--response-length", "6", "--top-k", "8", "--demo-eval-prompts", "0", *STEPS],
}  # fmt: skip
LOSS = {"ppo": "ppo/loss/policy_avg", "dpo": "train/loss", "grpo": "grpo/loss", "rejection_sampling": "rs/loss", "spin": "train/loss", "steerlm": "train/loss",
             "distill": "train/loss"}  # fmt: skip


@pytest.mark.parametrize("script", list(RUNS))
def test_qwen_shape(qwen_files, tmp_path, script):
    """The scripts real_model.sh does not run, from its SFT output (distill: the base model as the student, the SFT
    output as the teacher), a couple of steps each at the real shape."""
    script_file, *flags = RUNS[script](qwen_files)
    run_script(script_file, *flags, "--output-dir", str(tmp_path))
    assert logged(tmp_path, LOSS[script])
    assert_real_shape(tmp_path, 151_936, 896)
    shutil.rmtree(tmp_path)
