"""rejection_sampling.py: top-n selection (ties, --min-reward, replies without EOS) by hand; the loss is sft.py's
on the kept samples; the same samples and rewards as grpo.py; torchrun parity, reward-function faults and smoke
runs of the script on a tiny model (kill -9 / SIGTERM / NaN are in tests/test_faults_online.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import rejection_sampling as rs
import sft
from common import data, demo_task
from conftest import run_script

# --------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------


def test_top_n_by_hand_with_ties():
    """Row 1: 3 and 3 tie for first -> the earlier (index 1) first, then index 2, then 2.0 (index 3).
    Row 2: all equal -> the first samples in order. Row 3: best is the last sample."""
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.5, 0.5, 0.5, 0.5], [0.0, -1.0, 0.0, 4.0]])
    assert rs.select_top_n(scores, 1).tolist() == [[1], [0], [3]]
    assert rs.select_top_n(scores, 3).tolist() == [[1, 2, 3], [0, 1, 2], [3, 0, 2]]


def test_min_reward_and_eligibility_leave_slots_empty():
    """--min-reward 1: row 1 keeps 3, 3, 2, 1 in that order (all >= 1); row 2 nothing (0.5 < 1); row 3 only 4.0.
    A sample without EOS (not eligible) is never kept, even when it is the best."""
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.5, 0.5, 0.5, 0.5], [0.0, -1.0, 0.0, 4.0]])
    assert rs.select_top_n(scores, 2, min_reward=1.0).tolist() == [[1, 2], [-1, -1], [3, -1]]
    assert rs.select_top_n(scores, 4, min_reward=1.0).tolist() == [[1, 2, 3, 0], [-1, -1, -1, -1], [3, -1, -1, -1]]
    eligible = torch.tensor([[True, False, True, True], [True] * 4, [True, True, True, False]])
    assert rs.select_top_n(scores, 2, eligible=eligible).tolist() == [[2, 3], [0, 1], [0, 2]]
    assert rs.select_top_n(scores, 2, min_reward=1.0, eligible=eligible).tolist() == [[2, 3], [-1, -1], [-1, -1]]
    with pytest.raises(ValueError, match="--top-n must be between 1 and --num-rollouts"):
        rs.select_top_n(scores, 5)


# --------------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------------


def test_loss_is_sft_on_the_kept_samples(demo_base, tokenizer):
    """Kept samples as rows: prompt unlabelled, reply through EOS labelled. The summed NLL equals sft.py's
    `sft_loss_sum` on the same rows and a hand computation (log-softmax at each reply token's position); an empty
    slot (every label ignored) adds nothing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_base).eval()
    prompts = [
        data.render(tokenizer, [{"role": "user", "content": r["prompt"]}], True) for r in demo_task.prompt_rows(n=3)
    ]
    replies = [data.encode(tokenizer, text) + [tokenizer.eos_token_id] for text in ("The answer is 4.", "Sure!", "No")]
    examples = [rs.sft_example(p, r) for p, r in zip(prompts, replies)]
    batch = data.collate(examples, tokenizer.pad_token_id)
    got = rs.nll_sum(model, batch, torch.device("cpu"))
    assert torch.allclose(got, sft.sft_loss_sum(model, batch, torch.device("cpu")), rtol=1e-6)
    hand = 0.0
    for p, r in zip(prompts, replies):
        logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].double(), -1)
        hand -= sum(logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(r))
    assert got.item() == pytest.approx(hand, rel=1e-5)
    empty = dict(examples[0], labels=[data.IGNORE_INDEX] * len(examples[0]["labels"]))
    with_empty = data.collate([*examples, empty], tokenizer.pad_token_id)
    assert torch.allclose(rs.nll_sum(model, with_empty, torch.device("cpu")), got, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rs_files(demo_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("rs")
    prompts = demo_task.write_jsonl(demo_task.prompt_rows(seed=5, n=64), root / "prompts.jsonl")
    (root / "rw.py").write_text(
        "def length(prompts, completions, **kw):\n"
        "    return [len(c) / 10 for c in completions]\n"
        "def broken(prompts, completions, **kw):\n"
        "    raise KeyError('answer')\n"
    )
    return {"base": str(demo_base), "prompts": str(prompts), "rw": str(root / "rw.py")}


def small(f, *extra) -> list[str]:
    # a random tiny model rarely emits EOS within 8 tokens: --keep-truncated, or nothing would be kept
    return ["--model-path", f["base"], "--data", f["prompts"], "--reward-fn", f"{f['rw']}:length",
            "--num-rollouts", "4", "--local-rollout-batch-size", "4", "--response-length", "8", "--keep-truncated",
            "--demo-eval-prompts", "0", "--sample-every", "0", "--save-every", "0", "--learning-rate", "1e-3", *extra]  # fmt: skip


def updates(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "rs/loss" in r and "perf/time_train" in r]


def test_smoke_run_and_min_reward(rs_files, tmp_path):
    """Two updates: finite metrics, the kept samples' reward at least the mean, every prompt keeps its best; a
    --min-reward above every reward keeps nothing, takes no optimizer step and says so (weights unchanged)."""
    out = tmp_path / "run"
    proc = run_script("rejection_sampling.py", *small(rs_files, "--total-episodes", "8", "--top-n", "2",
                                                      "--output-dir", str(out)))  # fmt: skip
    rows = updates(out)
    assert len(rows) == 2, proc.stdout[-2000:]
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
        assert r["reward/kept_mean"] >= r["reward/mean"] and r["reward/length"] == r["reward/mean"]
        assert r["rs/kept_frac"] == 1 and r["rs/prompts_with_kept"] == 1 and r["rs/loss"] > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    none = tmp_path / "none"
    run_script("rejection_sampling.py", *small(rs_files, "--total-episodes", "8", "--min-reward", "1e9",
                                               "--output-dir", str(none)))  # fmt: skip
    for r in updates(none):
        assert r["rs/kept_frac"] == 0 and r["rs/prompts_with_kept"] == 0 and r["rs/loss"] == 0
    assert updates(none)[-1]["rs/empty_minibatches"] == 2
    from safetensors.torch import load_file

    w0, w1 = load_file(f"{rs_files['base']}/model.safetensors"), load_file(none / "model.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_same_samples_and_rewards_as_grpo(rs_files, tmp_path):
    """One definition of sampling keys and of reward scoring: with the same seed, prompts and group size, the first
    update of rejection_sampling.py and grpo.py draws the same samples and scores them the same."""
    f = rs_files
    common = ["--model-path", f["base"], "--data", f["prompts"], "--reward-fn", f"{f['rw']}:length",
              "--local-rollout-batch-size", "4", "--response-length", "8", "--demo-eval-prompts", "0",
              "--sample-every", "0", "--save-every", "0", "--total-episodes", "4"]  # fmt: skip
    run_script("rejection_sampling.py", *common, "--num-rollouts", "4", "--output-dir", str(tmp_path / "rs"))
    run_script("grpo.py", *common, "--num-generations", "4", "--num-minibatches", "1", "--output-dir",
               str(tmp_path / "grpo"))  # fmt: skip
    a = updates(tmp_path / "rs")[0]
    b = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines() if "grpo/loss" in x][0]
    assert a["reward/mean"] == pytest.approx(b["reward/mean"], rel=1e-6)
    assert a["rs/response_length"] == pytest.approx(b["grpo/response_length"], rel=1e-6)
    assert a["rs/truncated_frac"] == pytest.approx(b["grpo/truncated_frac"], rel=1e-6)


def test_torchrun_two_processes_match_one(rs_files, tmp_path):
    """Keyed sampling, selection per prompt, the loss normalised over the global minibatch: 2 ranks x 2 prompts =
    1 rank x 4 prompts (2 updates)."""
    f = rs_files
    one = small(f, "--total-episodes", "8", "--top-n", "2", "--output-dir", str(tmp_path / "one"))
    two = small(f, "--total-episodes", "8", "--top-n", "2", "--output-dir", str(tmp_path / "two"))
    two[two.index("--local-rollout-batch-size") + 1] = "2"
    run_script("rejection_sampling.py", *one)
    run_script("rejection_sampling.py", *two, nproc=2)
    a, b = updates(tmp_path / "one"), updates(tmp_path / "two")
    assert len(a) == len(b) == 2
    for key in ("rs/loss", "reward/mean", "reward/kept_mean", "rs/kept_response_length"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4, abs=1e-5), key


def test_reward_function_fault_and_bad_flags(rs_files, tmp_path):
    f = rs_files
    args = small(f, "--total-episodes", "4", "--output-dir", str(tmp_path / "bad"))
    args[args.index("--reward-fn") + 1] = f"{f['rw']}:broken"
    proc = run_script("rejection_sampling.py", *args, check=False)
    assert proc.returncode != 0
    assert "reward function 'broken' raised KeyError at update 0: 'answer'" in proc.stderr
    proc = run_script(
        "rejection_sampling.py", *small(f, "--top-n", "5", "--output-dir", str(tmp_path / "n")), check=False
    )
    assert proc.returncode != 0 and "--top-n must be between 1 and --num-rollouts (4), got 5" in proc.stderr


def test_lora_trains_adapters_only(rs_files, tmp_path):
    """--lora-r: peft adapters on the policy, exported as peft's adapter directory; the base weights are untouched
    (the adapter-disabled model still gives the base model's logits)."""
    out = tmp_path / "lora"
    run_script("rejection_sampling.py", *small(rs_files, "--total-episodes", "4", "--lora-r", "4", "--lora-export",
                                               "adapter", "--output-dir", str(out)))  # fmt: skip
    assert (out / "adapter_config.json").exists() and updates(out)[0]["rs/loss"] > 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(rs_files["base"]).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(rs_files["base"]), out).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(adapted(ids).logits, base(ids).logits)  # the adapters were trained
        with adapted.disable_adapter():
            assert torch.equal(adapted(ids).logits, base(ids).logits)
