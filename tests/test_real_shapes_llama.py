"""Every script at Llama-3.2-1B's shape: a random-initialised stand-in (Llama architecture, hidden 2048, 32 / 8 heads,
vocabulary 128,256, tied embeddings, 1 layer, narrow MLP; examples/make_dry_run_inputs.py) with Llama-3's tokenizer
quirks: no pad token, no chat template (`--chat-template llama3` on the SFT line, exported for every later stage) and
two EOS ids (`<|eot_id|>`, `<|end_of_text|>`).

sft runs first; its output feeds reward_model, whose output scores ppo and rejection_sampling; dpo, grpo (a
reward function), spin, steerlm train and distill (the base model as the student, the SFT output as the teacher)
start from the SFT output. A couple of steps each: what is checked is that the run works at V = 128,256 with the
picked pad, the exported template and both EOS ids, that its losses are finite, and that the real shape and the tied
LM head survive the export. The Qwen2.5-0.5B shape is in test_real_shapes.py. Each test deletes what it wrote.
"""

from __future__ import annotations

import shutil
import sys

import pytest
from test_real_shapes import LOSS, ONLINE, RUNS, STEPS, assert_real_shape, logged

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "examples"))
import make_dry_run_inputs as inputs  # noqa: E402

pytestmark = pytest.mark.slow
V, H = 128_256, 2048
PAD = "<|reserved_special_token_0|>"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The inputs, sft (2 steps) and reward_model (2 steps) at the Llama shape; deleted after the module."""
    root = tmp_path_factory.mktemp("llama_shape")
    model = inputs.real_shape_model(root / "model", "llama")
    files = inputs.write_data(root)
    sft = run_script("sft.py", "--model-path", model, "--data", files["sft"], "--output-dir", str(root / "sft"),
                     "--chat-template", "llama3", "--max-seq-len", "96", "--local-micro-batch-size", "2",
                     "--eval-size", "4", "--demo-eval-prompts", "0", *STEPS)  # fmt: skip
    rm = run_script("reward_model.py", "--model-path", str(root / "sft"), "--data", files["preferences"],
                    "--output-dir", str(root / "reward_model"), "--max-seq-len", "96", "--max-prompt-len", "64",
                    "--local-micro-batch-size", "2", "--eval-size", "4", *STEPS)  # fmt: skip
    (root / "rw.py").write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    from common import demo_task

    attributes = demo_task.write_jsonl(demo_task.attribute_rows(seed=1, n=24), root / "attributes.jsonl")
    files |= {"sft_model": str(root / "sft"), "rm": str(root / "reward_model"),
              "rw": f"{root / 'rw.py'}:length", "attributes": str(attributes), "base": str(model),
              "chat_template": "llama3"}  # fmt: skip
    yield root, files, sft.stdout, rm.stdout
    shutil.rmtree(root, ignore_errors=True)


def test_llama_shape_sft_and_reward_model(llama):
    """The pad is the first reserved token (not EOS, not <|eot_id|>), printed once by sft.py and read from its export
    by reward_model.py without a note; tied 128,256 x 2048 exported; the reward model keeps the width and vocabulary."""
    from transformers import AutoTokenizer

    root, _, sft_stdout, rm_stdout = llama
    assert sft_stdout.count(f"pad token '{PAD}'") == 1, sft_stdout[-3000:]
    assert f"pad token '{PAD}'" not in rm_stdout
    assert len(logged(root / "sft", "train/loss")) == 2
    assert len(logged(root / "reward_model", "train/loss")) == 2
    assert_real_shape(root / "sft", V, H)
    assert_real_shape(root / "reward_model", V, H, causal=False)
    tok = AutoTokenizer.from_pretrained(root / "sft")
    assert tok.pad_token == PAD and "<|start_header_id|>" in tok.chat_template


LLAMA_RUNS = RUNS | {  # the Qwen chain runs these two inside real_model.sh --dry-run
    "ppo": lambda f: ["ppo.py", "--model-path", f["sft_model"], "--reward-model-path", f["rm"], "--data", f["prompts"],
                      "--num-minibatches", "1", *ONLINE],
    "dpo": lambda f: ["dpo.py", "--model-path", f["sft_model"], "--data", f["preferences"], "--max-seq-len", "96",
                      "--max-prompt-len", "64", "--local-micro-batch-size", "2", "--eval-size", "4",
                      "--demo-eval-prompts", "0", *STEPS],
}  # fmt: skip


@pytest.mark.parametrize("script", list(LLAMA_RUNS))
def test_llama_shape(llama, tmp_path, script):
    """The scripts after sft and reward_model, a couple of steps each at the Llama shape from the SFT output."""
    _, files, _, _ = llama
    script_file, *flags = LLAMA_RUNS[script](files)
    run_script(script_file, *flags, "--output-dir", str(tmp_path))
    assert logged(tmp_path, LOSS[script])
    assert_real_shape(tmp_path, V, H)
    shutil.rmtree(tmp_path)
