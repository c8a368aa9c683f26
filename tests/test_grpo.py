"""grpo.py: advantage estimators, clipping, sequence ratios and loss aggregation by hand; reward functions and
their faults; micro-batch x accumulation invariance, torchrun parity, dynamic sampling and smoke runs of the
script on a tiny model (kill -9 / SIGTERM / NaN are in tests/test_faults_online.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import grpo
from common import demo_task, rewards
from conftest import run_script

# --------------------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------------------

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 0.0, 0.0, 0.0]])


def test_grpo_advantages_by_hand():
    """Group 1: mean 0.5, unbiased std sqrt((4 x 0.25) / 3) = 0.57735 -> +-0.5 / (0.57735 + 1e-4) = +-0.86588.
    Group 2: all equal -> 0 (0 / eps). Group 3: mean 0.75, std sqrt((2.25^2 + 3 x 0.75^2) / 3) = 1.5
    -> 2.25 / 1.5001 = 1.49990 and -0.75 / 1.5001 = -0.49997."""
    adv = grpo.group_advantages(REWARDS, "grpo", "group")
    expected = torch.tensor(
        [[0.86588, -0.86588, -0.86588, 0.86588], [0.0, 0.0, 0.0, 0.0], [1.49990, -0.49997, -0.49997, -0.49997]]
    )
    assert torch.allclose(adv, expected, atol=1e-5)


def test_rloo_advantages_are_leave_one_out():
    """r_i - mean of the other three: group 1: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3; group 3: 3 - 0 = 3, 0 - 1 = -1."""
    adv = grpo.group_advantages(REWARDS, "rloo", "none")
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0], [3.0, -1.0, -1.0, -1.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    loop = torch.stack([torch.stack([r[i] - torch.cat([r[:i], r[i + 1 :]]).mean() for i in range(4)]) for r in REWARDS])
    assert torch.allclose(adv, loop, atol=1e-6)


def test_batch_and_no_scaling():
    """Dr. GRPO (`none`): r - group mean, nothing else. `batch`: divided by the std of all 12 rewards."""
    centred = REWARDS - REWARDS.mean(-1, keepdim=True)
    assert torch.allclose(grpo.group_advantages(REWARDS, "grpo", "none"), centred)
    assert torch.allclose(grpo.group_advantages(REWARDS, "grpo", "batch"), centred / (REWARDS.std() + 1e-4), atol=1e-6)


def test_reinforce_pp_returns_and_baseline():
    """Two samples (one group), rewards 2 and 0, lengths 3 and 2, KL 0.1 per token, kl_coef 1.
    Per-token rewards: row 1 [-0.1, -0.1, -0.1 + 2], row 2 [-0.1, -0.1 + 0, pad]; returns (sums to the end):
    row 1 [1.7, 1.8, 1.9], row 2 [-0.2, -0.1]; then whitened over the 5 tokens. With the baseline the scores
    become +1 and -1 first: row 1 [0.7, 0.8, 0.9], row 2 [-1.2, -1.1]."""
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = torch.full((2, 3), 0.1)
    scores = torch.tensor([2.0, 0.0])
    for baseline, returns in ((False, [1.7, 1.8, 1.9, -0.2, -0.1]), (True, [0.7, 0.8, 0.9, -1.2, -1.1])):
        adv = grpo.reinforce_pp_advantages(scores, kl, mask, 1.0, 2, baseline)
        r = torch.tensor(returns)
        expected = (r - r.mean()) / r.std()
        assert torch.allclose(adv[mask > 0], expected, atol=1e-4), (baseline, adv)
        assert adv[1, 2] == 0


def test_overlong_penalty():
    """max 10, buffer 4: no penalty up to 6 tokens, then -(len - 6) / 4, -1 at 10."""
    got = grpo.overlong_penalty(torch.tensor([3, 6, 7, 8, 10]), 10, 4, 1.0)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    assert (grpo.overlong_penalty(torch.tensor([10]), 10, 0, 1.0) == 0).all()


# --------------------------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------------------------


def test_clip_higher_clips_only_above_one_plus_clip_high():
    """A = +1: ratio 1.25 is inside [0.8, 1.28] (loss -1.25, gradient flows); ratio 1.3 is clipped to 1.28
    (loss -1.28, no gradient, counted high). A = -1: ratio 0.7 is clipped below at 0.8 (counted low)."""
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.25, 1.3, 0.7]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, low, high = grpo.policy_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-1.25, -1.28, 0.8]]), atol=1e-6)
    assert high.tolist() == [[False, True, False]] and low.tolist() == [[False, False, True]]
    loss.sum().backward()
    assert torch.allclose(new.grad, torch.tensor([[-1.25, 0.0, 0.0]]), atol=1e-6)  # d(-A r)/d log r = -A r
    # symmetric clipping (0.2, 0.2) clips 1.25 too
    _, _, high_sym = grpo.policy_loss(new.detach(), old, adv, mask, 0.2, 0.2)
    assert high_sym.tolist() == [[True, True, False]]


def test_dual_clip_caps_negative_advantage_losses():
    """A = -1, ratio 5: the clipped surrogate gives max(5, 1.2) = 5; dual clip c = 3 caps it at 3."""
    new, old = torch.log(torch.tensor([[5.0]])), torch.zeros(1, 1)
    loss, _, _ = grpo.policy_loss(new, old, torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2, 0.2)
    assert loss.item() == pytest.approx(5.0)
    loss, _, _ = grpo.policy_loss(new, old, torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2, 0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(3.0)


def test_sequence_level_ratio_is_exp_of_mean_token_log_ratio():
    """GSPO: every token of a sequence carries s = exp(mean_t log r_t) (padding excluded from the mean), and the
    gradient of the token loss -A s with respect to log pi_t is -A s (the sequence ratio times the token's
    score function)."""
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    new = torch.tensor([[-0.9, -2.1, -2.9], [-1.05, -0.95, 0.0]]).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, 1.0])
    loss, _, _ = grpo.policy_loss(new, old, adv, mask, 10.0, 10.0, importance_level="sequence")
    s = torch.exp(torch.tensor([(0.1 - 0.1 + 0.1) / 3, (-0.05 + 0.05) / 2]))
    assert torch.allclose(loss, -s[:, None] * mask, atol=1e-6)
    loss.sum().backward()
    assert torch.allclose(new.grad, -s[:, None] * mask, atol=1e-6)


def test_loss_aggregation_modes_by_hand():
    """Per-token losses of 2 sequences (lengths 3 and 1): [1, 2, 3] and [4].
    token_mean: 10 / 4 = 2.5; seq_mean_token_mean: (2 + 4) / 2 = 3; seq_mean_token_sum: (6 + 4) / 2 = 5;
    constant (max length 8): 10 / (2 x 8) = 0.625."""
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    norm = {"tokens": 4.0, "sequences": 2.0, "max_len": 8}
    expected = {"token_mean": 2.5, "seq_mean_token_mean": 3.0, "seq_mean_token_sum": 5.0, "constant": 0.625}
    for mode, value in expected.items():
        assert grpo.aggregate(losses, mask, mode, norm).item() == pytest.approx(value), mode
    # micro-batches add up to the minibatch: row by row with the same global normalisers
    for mode in expected:
        parts = sum(grpo.aggregate(losses[i : i + 1], mask[i : i + 1], mode, norm) for i in range(2))
        assert parts.item() == pytest.approx(expected[mode]), mode


def test_combine_rewards_treats_none_as_no_reward():
    per_source = torch.tensor([[1.0, float("nan")], [0.5, 2.0]])
    assert grpo.combine_rewards(per_source, [1.0, 0.5]).tolist() == [1.0, 1.5]


# --------------------------------------------------------------------------------------------------------------
# Reward functions
# --------------------------------------------------------------------------------------------------------------


def test_reward_function_loading_and_columns(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def exact(prompts, completions, answer, **kw):\n"
        "    return [float(c.strip() == a) if a is not None else None for c, a in zip(completions, answer)]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, "my_rewards", raising=False)
    name, fn = rewards.load_reward_fn("my_rewards:exact")
    assert name == "exact"
    got = rewards.call_reward_fn(name, fn, ["q1", "q2", "q3"], ["4", "5", "x"], {"answer": ["4", "6", None]}, 3)
    assert got == [1.0, 0.0, None]
    assert rewards.load_reward_fn(f"{tmp_path / 'my_rewards.py'}:exact")[0] == "exact"
    assert rewards.load_reward_fn("demo")[1] is rewards.demo_reward
    with pytest.raises(TypeError, match="has no function 'nothing'"):
        rewards.load_reward_fn("my_rewards:nothing")


def _raises(prompts, completions, **columns):
    raise KeyError("answer")


def _short(prompts, completions, **columns):
    return [1.0]


def _nan(prompts, completions, **columns):
    return [1.0, float("nan")]


def _text(prompts, completions, **columns):
    return [1.0, "high"]


@pytest.mark.parametrize(
    "fn, message",
    [
        (_raises, "reward function 'bad' raised KeyError at update 7: 'answer'"),
        (_short, "reward function 'bad' returned 1 values for 2 completions at update 7"),
        (_nan, "reward function 'bad' returned nan at update 7 for prompt 'What is 2 + 3?'"),
        (_text, "reward function 'bad' returned 'high' at update 7 for prompt 'What is 2 + 3?'"),
    ],
)
def test_reward_function_faults_name_function_update_and_prompt(fn, message):
    with pytest.raises(rewards.RewardFunctionError) as err:
        rewards.call_reward_fn("bad", fn, ["What is 1 + 1?", "What is 2 + 3?"], ["2", "5"], {}, 7)
    assert message in str(err.value)


def test_demo_reward_is_the_grader():
    prompt = demo_task.eval_prompts(1)[0]
    answer = demo_task.solve(prompt)
    assert rewards.demo_reward([prompt, prompt], [f"The answer is {answer}.", "The answer is 9999."]) == [
        demo_task.grade(prompt, f"The answer is {answer}.")["score"],
        0.0,
    ]


# --------------------------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_files(demo_base, tmp_path_factory):
    """Prompts with an `answer` column, and reward functions a random tiny model gets varied rewards from."""
    root = tmp_path_factory.mktemp("grpo")
    rows = [
        {"prompt": r["prompt"], "answer": demo_task.solve(r["prompt"])} for r in demo_task.prompt_rows(seed=5, n=64)
    ]
    prompts = demo_task.write_jsonl(rows, root / "prompts.jsonl")
    (root / "rw.py").write_text(
        "def length(prompts, completions, answer, **kw):\n"
        "    assert len(answer) == len(completions) and all(a is not None for a in answer)\n"
        "    return [len(c) / 10 for c in completions]\n"
        "def half_flat(prompts, completions, **kw):\n"
        "    # prompts with an even number of characters: every sample gets 0 (no signal); others: length\n"
        "    return [0.0 if len(p) % 2 == 0 else len(c) / 10 for p, c in zip(prompts, completions)]\n"
        "def broken(prompts, completions, **kw):\n"
        "    return [1.0] * (len(completions) - 1)\n"
    )
    return {"base": str(demo_base), "prompts": str(prompts), "rw": str(root / "rw.py")}


def small(f, *extra) -> list[str]:
    return ["--model-path", f["base"], "--data", f["prompts"], "--reward-fn", f"{f['rw']}:length",
            "--num-generations", "4", "--local-rollout-batch-size", "4", "--response-length", "8",
            "--demo-eval-prompts", "0", "--sample-every", "0", "--save-every", "0", "--learning-rate", "1e-3",
            "--ppo-epochs", "1", "--num-minibatches", "1", *extra]  # fmt: skip


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def updates(out) -> list[dict]:
    return [r for r in metrics(out) if "grpo/loss" in r and "perf/time_train" in r]


def test_smoke_run_all_estimators(grpo_files, tmp_path):
    """Every estimator and loss mode runs end to end; the logged metrics are finite and the model loads."""
    f = grpo_files
    for k, extra in enumerate([
        [],
        ["--advantage", "rloo", "--kl-coef", "0.1", "--kl-in", "reward", "--scale-rewards", "none"],
        ["--advantage", "reinforce_pp", "--kl-coef", "0.1", "--kl-in", "reward", "--kl-estimator", "k1"],
        ["--advantage", "reinforce_pp_baseline", "--ppo-epochs", "2", "--num-minibatches", "2"],
        ["--importance-level", "sequence", "--loss-agg", "seq_mean_token_mean", "--kl-coef", "0.05",
         "--ppo-epochs", "2", "--clip-low", "3e-4", "--clip-high", "4e-4"],
        ["--scale-rewards", "none", "--loss-agg", "constant", "--overlong-buffer", "4", "--mask-truncated",
         "--clip-high", "0.28", "--dual-clip", "3"],
    ]):  # fmt: skip
        out = tmp_path / f"run{k}"
        proc = run_script("grpo.py", *small(f, "--total-episodes", "8", "--output-dir", str(out), *extra))
        rows = updates(out)
        assert len(rows) == 2, proc.stdout[-2000:]
        for key in ("reward/mean", "reward/std", "reward/length", "objective/entropy", "grpo/loss", "grpo/clipfrac_low",
                    "grpo/clipfrac_high", "grpo/zero_std_groups", "grpo/response_length", "grpo/truncated_frac",
                    "perf/tokens_per_sec", "perf/rollout_tokens_per_sec"):  # fmt: skip
            assert all(math.isfinite(r[key]) for r in rows), (extra, key)
        if "--kl-coef" in extra:
            assert "reference=loaded" in proc.stdout and rows[-1]["objective/kl"] >= 0
        else:
            assert "reference=none (kl_coef 0)" in proc.stdout and all("objective/kl" not in r for r in rows)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run0")


def test_micro_batch_times_accumulation_equals_one_micro_batch(grpo_files, tmp_path):
    """16 samples per minibatch as 1 x 16 or 4 x 4 (gradient accumulation): same losses, same weights after."""
    f = grpo_files
    common = small(f, "--total-episodes", "8", "--kl-coef", "0.1", "--ppo-epochs", "2")
    run_script("grpo.py", *common, "--output-dir", str(tmp_path / "a"))
    run_script("grpo.py", *common, "--output-dir", str(tmp_path / "b"), "--gradient-accumulation-steps", "4")
    a, b = updates(tmp_path / "a"), updates(tmp_path / "b")
    assert len(a) == len(b) == 2
    for key in ("grpo/loss", "objective/kl", "reward/mean"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6), key
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    w0 = load_file(Path(f["base"]) / "model.safetensors")
    # float rounding differs between the two layouts (a group's prompt is shared within a micro-batch of 16, less so
    # in micro-batches of 4), and Adam magnifies it on weights whose gradient is ~0; a mistake in the accumulation
    # (a step's gradient scaled by 4, say) moves the weights by as much as the update itself
    moved = max((wa[k] - w0[k]).abs().max().item() for k in wa)
    assert moved > 1e-3 and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-2 * moved


def test_torchrun_two_processes_match_one(grpo_files, tmp_path):
    """Sampling keyed by (update, prompt position, sample), groups on one rank, losses normalised over the global
    batch: 2 ranks x 2 prompts = 1 rank x 4 prompts, with a reference model (KL in the loss)."""
    f = grpo_files
    common = small(f, "--total-episodes", "8", "--kl-coef", "0.1")
    common = [c for c in common]
    i = common.index("--local-rollout-batch-size")
    one = common[:i] + ["--local-rollout-batch-size", "4"] + common[i + 2 :]
    two = common[:i] + ["--local-rollout-batch-size", "2"] + common[i + 2 :]
    run_script("grpo.py", *one, "--output-dir", str(tmp_path / "one"))
    run_script("grpo.py", *two, "--output-dir", str(tmp_path / "two"), nproc=2)
    a, b = updates(tmp_path / "one"), updates(tmp_path / "two")
    assert len(a) == len(b) == 2
    for key in ("grpo/loss", "objective/kl", "reward/mean", "reward/std", "grpo/response_length"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-4, abs=1e-5), key


def test_dynamic_sampling_refills_and_counts(grpo_files, tmp_path):
    """With `half_flat`, every group of an even-length prompt has zero reward spread: dynamic sampling samples
    more prompts, counts the extra rounds, and fills the batch with groups that have a spread (or masks the rest)."""
    f = grpo_files
    args = small(f, "--total-episodes", "8", "--output-dir", str(tmp_path / "dyn"))
    args[args.index("--reward-fn") + 1] = f"{f['rw']}:half_flat"
    run_script("grpo.py", *args, "--dynamic-sampling", "--max-extra-rollouts", "3")
    rows = updates(tmp_path / "dyn")
    assert any(r["grpo/zero_std_groups"] > 0 for r in rows)
    assert sum(r["grpo/extra_rollout_rounds"] for r in rows) >= 1
    for r in rows:  # every group trained on has a reward spread; what could not be filled is masked and counted
        assert r["grpo/zero_std_groups_trained"] == 0, r
        assert r["grpo/masked_fill_samples"] % 4 == 0  # whole groups of G = 4
        if r["grpo/zero_std_groups"] == 0:
            assert r["grpo/extra_rollout_rounds"] == 0
    # without dynamic sampling the flat groups are trained on (and counted)
    plain = small(f, "--total-episodes", "8", "--output-dir", str(tmp_path / "plain"))
    plain[plain.index("--reward-fn") + 1] = f"{f['rw']}:half_flat"
    run_script("grpo.py", *plain)
    assert any(r["grpo/zero_std_groups_trained"] > 0 for r in updates(tmp_path / "plain"))


def test_reward_function_fault_stops_the_run(grpo_files, tmp_path):
    f = grpo_files
    args = small(f, "--total-episodes", "8", "--output-dir", str(tmp_path / "bad"))
    args[args.index("--reward-fn") + 1] = f"{f['rw']}:broken"
    proc = run_script("grpo.py", *args, check=False)
    assert proc.returncode != 0
    assert "reward function 'broken' returned 15 values for 16 completions at update 0" in proc.stderr


def test_no_reward_outside_the_demo_is_an_error(grpo_files, tmp_path):
    f = grpo_files
    proc = run_script("grpo.py", "--model-path", f["base"], "--data", f["prompts"], "--output-dir", str(tmp_path / "x"),
                      check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "no reward: pass --reward-fn module:function and/or --reward-model-path" in proc.stderr


def test_reward_model_and_function_combined(grpo_files, tmp_path):
    """A reward function and a reward model (random head) together, weighted: both logged under their names, the
    combined mean is the weighted sum of the two means (every sample gets both rewards)."""
    from common.models import load_sequence_classifier, load_tokenizer

    tok = load_tokenizer(grpo_files["base"])
    rm = load_sequence_classifier(
        grpo_files["base"], torch.device("cpu"), 1, pad_token_id=tok.pad_token_id, init_head=True
    )
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    out = tmp_path / "combined"
    proc = run_script("grpo.py", *small(grpo_files, "--total-episodes", "8", "--output-dir", str(out),
                                        "--reward-model-path", str(tmp_path / "rm"), "--reward-weights", "1", "0.5"))  # fmt: skip
    assert "rewards={'length': 1.0, 'reward_model': 0.5}" in proc.stdout
    for r in updates(out):
        assert r["reward/mean"] == pytest.approx(
            r["reward/length"] + 0.5 * r["reward/reward_model"], rel=1e-4, abs=1e-5
        )
    bad = run_script("grpo.py", *small(grpo_files, "--total-episodes", "8", "--output-dir", str(tmp_path / "w"),
                                       "--reward-weights", "1", "2"), check=False)  # fmt: skip
    assert bad.returncode != 0 and "--reward-weights: 2 weights for 1 rewards ['length']" in bad.stderr


def test_bad_prompt_row_names_file_row_and_field(grpo_files, tmp_path):
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"question": "What is 1 + 1?", "answer": "2"}]
    path = demo_task.write_jsonl(rows, tmp_path / "bad.jsonl")
    args = small(grpo_files, "--output-dir", str(tmp_path / "o"))
    args[args.index("--data") + 1] = str(path)
    proc = run_script("grpo.py", *args, check=False)
    assert proc.returncode != 0
    assert f"{path}: row 2, field 'prompt': missing" in proc.stderr
