"""LoRA (common/lora.py, issue 18): what is trained, the reference for free, the exports, and the scripts' runs.

In-process, on the demo model with its adapters set to random values (a fresh LoRA model equals its base, which
would hide every mix-up): the adapters-off reference gives the base model's log-probs exactly; only adapter (and
score-head) parameters move in an optimizer step; the merged export loads in plain transformers and the adapter
export with peft, both giving the adapted model's logits; a wrong --lora-target-modules name lists the model's
linear layers. Subprocess runs: DPO with LoRA (first-step loss log 2, the startup line saying no reference is
loaded, trainer_state/ holding only adapters, base weights untouched in the export), kill -9 + --resume, and
GRPO (generation through the adapted model, reference = adapters off) on 1 and 2 processes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import checkpoint, demo_task, lora
from common.dist import init_distributed
from common.models import load_causal_lm, load_sequence_classifier
from common.training import make_optimizer, optimizer_step
from conftest import ROOT, run_script, script_env

LOG2 = math.log(2)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomised(model, seed: int = 0):
    """Set every trainable tensor (the adapters; a new LoRA's B is 0) to random values: the adapted model differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.randint(3, len(tokenizer), (3, 17), generator=torch.Generator().manual_seed(1))


def test_reference_with_adapters_off_is_the_base_model(demo_base, tokenizer):
    import dpo

    base = load_causal_lm(str(demo_base), torch.device("cpu"))
    policy = randomised(lora.apply_lora(load_causal_lm(str(demo_base), torch.device("cpu")), lora.LoraArgs(lora_r=4)))
    items = [{"prompt_ids": [1, 7, 9, 11], "chosen_ids": [20, 21, 22], "rejected_ids": [30, 31]},
             {"prompt_ids": [1, 8], "chosen_ids": [40, 41, 42, 43, 44], "rejected_ids": [50]}]  # fmt: skip
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        ref = dpo.item_logprobs(lora.AdaptersOff(policy), items, pad, torch.device("cpu"), False, False)
        expected = dpo.item_logprobs(base, items, pad, torch.device("cpu"), False, False)
        adapted = dpo.item_logprobs(policy, items, pad, torch.device("cpu"), False, False)
    assert torch.equal(ref, expected)  # a disabled LoRA layer returns its base layer's output, bit for bit
    assert (adapted - expected).abs().max() > 1e-2  # the adapters were on in the policy's own forward
    assert lora.shares_reference(lora.LoraArgs(lora_r=4), None, "m") and not lora.shares_reference(
        lora.LoraArgs(lora_r=4), "other", "m"
    )
    assert not lora.shares_reference(lora.LoraArgs(), None, "m")


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_only_adapters_and_score_head_change(demo_base, tokenizer, ids, task):
    if task == "causal_lm":
        model = load_causal_lm(str(demo_base), torch.device("cpu"))
    else:
        model = load_sequence_classifier(str(demo_base), torch.device("cpu"), 1, pad_token_id=tokenizer.pad_token_id,
                                         init_head=True)  # fmt: skip
    model = randomised(lora.apply_lora(model, lora.LoraArgs(lora_r=4), task=task))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if "lora_" not in n}
    assert heads == ({"base_model.model.score.modules_to_save.default.weight"} if task == "seq_cls" else set())
    assert {n.split(".")[-4] for n in trainable - heads} == set(
        TARGETS
    )  # ...layers.0.mlp.up_proj.lora_A.default.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, 1e-2, 0.1)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        model.get_parameter(n).numel() for n in trainable
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    optimizer_step(model, optimizer, scheduler, max_grad_norm=1.0)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_exports_merged_and_adapter(demo_base, tokenizer, ids, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dist = init_distributed()
    policy = randomised(lora.apply_lora(load_causal_lm(str(demo_base), torch.device("cpu")), lora.LoraArgs(lora_r=4)))
    checkpoint.export_pretrained(policy, tokenizer, tmp_path / "merged", dist)
    policy.lora_export = "adapter"
    checkpoint.export_pretrained(policy, tokenizer, tmp_path / "adapter", dist)
    rm = load_sequence_classifier(str(demo_base), torch.device("cpu"), 1, pad_token_id=tokenizer.pad_token_id)
    rm = randomised(lora.apply_lora(rm, lora.LoraArgs(lora_r=4), task="seq_cls"), seed=1)
    checkpoint.export_pretrained(rm, tokenizer, tmp_path / "rm", dist, {"plainalign_reward_model": True})
    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no peft
        assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.tie_word_embeddings
        assert (merged(input_ids=ids).logits - adapted).abs().max() < 1e-5
        assert not (tmp_path / "merged" / "adapter_config.json").exists()
        assert not (tmp_path / "adapter" / "config.json").exists()
        loaded = PeftModel.from_pretrained(load_causal_lm(str(demo_base), torch.device("cpu")), tmp_path / "adapter")
        assert (loaded(input_ids=ids).logits - adapted).abs().max() < 1e-5
        rm_merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
        assert rm_merged.config.plainalign_reward_model
        assert (rm_merged(input_ids=ids).logits - rm(input_ids=ids).logits).abs().max() < 1e-5
    assert torch.equal(policy.get_base_model().model.embed_tokens.weight, merged.model.embed_tokens.weight)


def test_wrong_target_module_lists_the_linear_layers(demo_base):
    model = load_causal_lm(str(demo_base), torch.device("cpu"))
    with pytest.raises(ValueError) as e:
        lora.apply_lora(model, lora.LoraArgs(lora_r=4, lora_target_modules=["q_proj", "qkv"]))
    assert str(e.value) == (
        "--lora-target-modules qkv: not a linear layer of LlamaForCausalLM; its linear layers are: down_proj, "
        "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (decoder blocks); lm_head"
    )
    only_q = lora.apply_lora(model, lora.LoraArgs(lora_r=2, lora_target_modules=["q_proj"]))
    assert {n.split(".")[-4] for n, p in only_q.named_parameters() if p.requires_grad} == {"q_proj"}


# --- script runs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_data")
    (root / "length_reward.py").write_text(
        "def length(prompts, completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    return {
        "pairs": str(demo_task.write_jsonl(demo_task.preference_rows(seed=5, n=120), root / "pairs.jsonl")),
        "prompts": str(demo_task.write_jsonl(demo_task.prompt_rows(seed=5, n=40), root / "prompts.jsonl")),
        "reward": f"{root / 'length_reward.py'}:length",
    }


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc), found before killing anything."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def dpo_args(demo_base, files) -> list[str]:
    return ["dpo.py", "--model-path", str(demo_base), "--data", files["pairs"], "--total-steps", "6", "--log-every", "1",
            "--eval-every", "0", "--demo-eval-prompts", "0", "--eval-size", "16", "--local-micro-batch-size", "8",
            "--warmup-steps", "1", "--sft-loss-weight", "0", "--learning-rate", "1e-3", "--lora-r", "4"]  # fmt: skip


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(out) -> list[float]:
    found = [r["train/loss"] for r in rows(out) if "train/loss" in r]
    assert found
    return found


@pytest.fixture(scope="module")
def dpo_run(demo_base, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_lora")
    proc = run_script(*dpo_args(demo_base, files), "--output-dir", str(out), "--save-every", "0")
    return out, proc.stdout


def test_dpo_lora_run(dpo_run, demo_base):
    """First-step loss log 2 (policy = reference); no reference model loaded, and the startup print says so;
    trainer_state/ holds the adapters and their optimizer state only; the exported model differs from the base
    only in the adapted linear layers."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    out, stdout = dpo_run
    assert losses(out)[0] == pytest.approx(LOG2, abs=1e-6)
    assert max(abs(x - LOG2) for x in losses(out)[1:]) > 1e-3  # the reference stayed put while the policy moved
    assert f"reference model: {lora.REFERENCE_NOTE}" in stdout
    assert "with the LoRA adapters disabled" in stdout
    keys = dcp.FileSystemReader(str(out / "trainer_state")).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys[:5]
    assert any(k.startswith("optim.") and "exp_avg" in k for k in keys)
    base, exported = load_file(demo_base / "model.safetensors"), load_file(out / "model.safetensors")
    assert base.keys() == exported.keys()
    changed = {k for k in base if not torch.equal(base[k], exported[k])}
    assert changed and all(k.split(".")[-2] in TARGETS for k in changed), sorted(changed)


def test_dpo_lora_two_processes_then_kill9_resume_on_one_match_one(dpo_run, demo_base, files, tmp_path):
    """FSDP2 on 2 processes (2 x 4 pairs) killed with -9 after a checkpoint (adapters + optimizer only) and a step
    logged past it, then --resume on 1 process (1 x 8 pairs), which reloads the base from --model-path and the
    adapters from trainer_state/: every loss is the 1-process uninterrupted run's, those of the 2-process steps
    and those after the resume."""
    expected = losses(dpo_run[0])
    out = tmp_path / "killed"
    args = [*dpo_args(demo_base, files), "--output-dir", str(out), "--save-every", "2"]
    micro = args.index("--local-micro-batch-size") + 1
    args[micro] = "4"  # x 2 ranks = the 1-process run's 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    complete, deadline = out / "trainer_state" / "COMPLETE", time.time() + 300

    def logged_past_checkpoint() -> bool:
        if not complete.exists() or not (out / "metrics.jsonl").exists():
            return False
        saved = json.loads(complete.read_text())["step"]
        return max((r["step"] for r in rows(out)), default=0) > saved

    try:
        while not logged_past_checkpoint():
            assert proc.poll() is None, "finished before logging past a checkpoint"
            assert time.time() < deadline
            time.sleep(0.005)
    finally:  # kill -9 the ranks and the launcher (torchrun starts the ranks in sessions of their own)
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    saved = json.loads(complete.read_text())["step"]
    assert 0 < saved < 6 and json.loads(complete.read_text())["world_size"] == 2
    args[micro] = "8"  # the same global batch on one process
    resumed = run_script(*args, "--resume")  # the 2-rank checkpoint resharded onto 1 (DCP)
    assert f"start_step={saved}" in resumed.stdout, [
        line for line in resumed.stdout.splitlines() if "start_step" in line
    ]
    assert losses(out) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_grpo_lora_run(demo_base, files, tmp_path):
    """GRPO with LoRA: rollouts from the adapted policy (no merge), the KL reference = the adapters off: KL 0 at the
    first update, then positive; --lora-export adapter writes peft's directory."""
    out = tmp_path / "grpo"
    proc = run_script("grpo.py", "--model-path", str(demo_base), "--data", files["prompts"], "--reward-fn", files["reward"],
                      "--num-generations", "4", "--response-length", "8", "--demo-eval-prompts", "0", "--sample-every", "0",
                      "--save-every", "0", "--learning-rate", "1e-2", "--ppo-epochs", "1", "--num-minibatches", "1",
                      "--total-episodes", "12", "--local-rollout-batch-size", "4", "--kl-coef", "0.1", "--lora-r", "4",
                      "--lora-export", "adapter", "--output-dir", str(out))  # fmt: skip
    assert f"reference model: {lora.REFERENCE_NOTE}" in proc.stdout
    kl = [r["objective/kl"] for r in rows(out) if "grpo/loss" in r]
    assert len(kl) == 3 and kl[0] == 0 and kl[-1] > 1e-4
    assert (out / "adapter_config.json").exists() and not (out / "config.json").exists()
