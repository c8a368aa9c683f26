"""dpo.py: every loss against a value derived by hand, gradient directions, precomputed == on-the-fly reference,
padding invariance, KTO/RPO data handling, malformed rows, a smoke run per loss type, torchrun parity."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

import dpo
from common import demo_task
from common.dist import Dist
from conftest import run_script

CPU = torch.device("cpu")
ONE_PROCESS = Dist(rank=0, world_size=1, local_rank=0, device=CPU)

# policy chosen/rejected = -1/-3, reference = -2/-2: rho_c = 1, rho_r = -1, Delta = 2.
POL_C, POL_R, REF_C, REF_R = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
LOG2 = math.log(2.0)


def loss_of(loss_type, beta, **kw):
    losses, rc, rr = dpo.preference_loss(POL_C, POL_R, REF_C, REF_R, loss_type, beta, **kw)
    return losses.item(), rc.item(), rr.item()


def test_sigmoid_dpo_by_hand():
    """beta = 0.5: beta Delta = 1, loss = -log sigmoid(1) = log(1 + e^-1) = 0.3132617; rewards beta rho = +-0.5."""
    assert loss_of("sigmoid", 0.5) == pytest.approx((0.3132617, 0.5, -0.5), abs=1e-6)


def test_conservative_dpo_by_hand():
    """eps = 0.1: 0.9 (-log sigmoid(1)) + 0.1 (-log sigmoid(-1)) = 0.9 x 0.3132617 + 0.1 x 1.3132617 = 0.4132617."""
    assert loss_of("sigmoid", 0.5, label_smoothing=0.1)[0] == pytest.approx(0.4132617, abs=1e-6)


def test_ipo_by_hand():
    """(Delta - 1/(2 beta))^2 = (2 - 1)^2 = 1 at beta = 0.5; (2 - 2)^2 = 0 at beta = 0.25."""
    assert loss_of("ipo", 0.5)[0] == pytest.approx(1.0)
    assert loss_of("ipo", 0.25)[0] == pytest.approx(0.0)


def test_hinge_by_hand():
    """max(0, 1 - beta Delta): beta = 0.25 -> 0.5; beta = 1 -> 0 (the margin is met)."""
    assert loss_of("hinge", 0.25)[0] == pytest.approx(0.5)
    assert loss_of("hinge", 1.0)[0] == 0.0


def test_simpo_by_hand_ignores_the_reference():
    """z = beta (logp_c - logp_r) - gamma = 0.5 (-1 + 3) - 0.5 = 0.5; loss -log sigmoid(0.5) = 0.4740770;
    rewards beta logp = -0.5 and -1.5; the reference log-probs play no part."""
    assert loss_of("simpo", 0.5, simpo_gamma=0.5) == pytest.approx((0.4740770, -0.5, -1.5), abs=1e-6)
    other_ref, _, _ = dpo.preference_loss(POL_C, POL_R, REF_C + 7, REF_R - 3, "simpo", 0.5, simpo_gamma=0.5)
    assert other_ref.item() == pytest.approx(0.4740770, abs=1e-6)


def test_rpo_losses_by_hand():
    """Data rewards 0.5 / 0, eta = 1: Delta_r = 0.5; beta Delta = 1 (beta = 0.5).
    rpo_sq = (1 - 0.5)^2 = 0.25.
    rpo_bwd_kl = KL(Bern(s(0.5)) || Bern(s(1))) = p ln(p/q) + (1-p) ln((1-p)/(1-q)), p = 0.6224593, q = 0.7310586
               = 0.0279550.
    rpo_fwd_kl = KL(Bern(s(1)) || Bern(s(0.5))) = 0.0263446."""
    rewards = {"chosen_data_rewards": torch.tensor([0.5]), "rejected_data_rewards": torch.tensor([0.0])}
    assert loss_of("rpo_sq", 0.5, **rewards)[0] == pytest.approx(0.25, abs=1e-6)
    assert loss_of("rpo_bwd_kl", 0.5, **rewards)[0] == pytest.approx(0.0279550, abs=1e-6)
    assert loss_of("rpo_fwd_kl", 0.5, **rewards)[0] == pytest.approx(0.0263446, abs=1e-6)
    assert loss_of("rpo_sq", 0.5, rpo_eta=2.0, **rewards)[0] == pytest.approx(0.0, abs=1e-6)  # eta scales the gap
    with pytest.raises(ValueError, match="needs per-response rewards"):
        loss_of("rpo_sq", 0.5)


def test_kto_by_hand():
    """rho = +1 (desirable) and -1 (undesirable); z0 = max(0, mean rho) = 0; beta = 0.5:
    desirable 1 - sigmoid(0.5 (1 - 0)) = 0.3775407; undesirable 1 - sigmoid(0.5 (0 - (-1))) = 0.3775407;
    lambda_U = 2 doubles the second."""
    losses, rewards, z0 = dpo.kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), 0.5,
                                       undesirable_weight=2.0)  # fmt: skip
    assert z0.item() == 0.0
    assert losses.tolist() == pytest.approx([0.3775407, 2 * 0.3775407], abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.5])
    _, _, z0 = dpo.kto_loss(torch.tensor([0.0, 0.0]), torch.tensor([-2.0, -1.0]), torch.tensor([True, False]), 0.5)
    assert z0.item() == pytest.approx(1.5)  # matched_batch_mean: the batch's own mean log-ratio when positive


class RankZeroOfTwo:
    """Rank 0 of a 2-process run whose rank 1 holds `other`: all_reduce adds it (a sum all-reduce)."""

    device = CPU

    def __init__(self, other: torch.Tensor):
        self.other = other

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.add_(self.other)


def test_kto_mismatched_reference_point_by_hand():
    """z0 = max(0, mean of log pi/pi_ref over the mismatched pairs of the GLOBAL batch).
    One process, mismatched log-ratios (1, -3): mean -1 -> z0 = 0; (2, 1): z0 = 1.5.
    Two ranks, rank 0 holding (1, -3) and rank 1 holding (4): (1 - 3 + 4) / 3 = 2/3 on both ranks (rank 0's own
    mean would give 0).
    With z0 = 2/3, beta = 0.5 and matched rho = +1 (desirable), -1 (undesirable):
        desirable    1 - sigmoid(0.5 (1 - 2/3)) = 1 - sigmoid(1/6) = 0.4584295
        undesirable  1 - sigmoid(0.5 (2/3 + 1)) = 1 - sigmoid(5/6) = 0.3029407"""
    assert dpo.kto_reference_point(torch.tensor([1.0, -3.0]), ONE_PROCESS).item() == 0.0
    assert dpo.kto_reference_point(torch.tensor([2.0, 1.0]), ONE_PROCESS).item() == pytest.approx(1.5)
    rank1 = torch.tensor([4.0, 1.0], dtype=torch.float64)  # rank 1's (sum, count)
    z0 = dpo.kto_reference_point(torch.tensor([1.0, -3.0]), RankZeroOfTwo(rank1))
    assert z0.item() == pytest.approx(2 / 3)
    losses, _, used = dpo.kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.tensor([True, False]),
                                   0.5, reference_point=z0)  # fmt: skip
    assert used is z0 and losses.tolist() == pytest.approx([0.4584295, 0.3029407], abs=1e-6)


def test_kto_mismatched_pairs_are_one_fixed_cycle():
    """Item i (prompt [i], completion [10 + i, 20 + i]) gets another item's completion; following the partners
    from item 0 visits all 7 items before coming back (one cycle: no item keeps its own completion). The same
    pairing every call; truncated to fit max_seq_len (prompt 1 token + 1 completion token at max_seq_len 2)."""
    items = [{"prompt_ids": [i], "completion_ids": [10 + i, 20 + i]} for i in range(7)]
    got = dpo.mismatched_completions(items, max_seq_len=128)
    partner = [c[0] - 10 for c in got]
    assert all(got[i] == items[j]["completion_ids"] for i, j in enumerate(partner))
    seen, i = [], 0
    while i not in seen:
        seen.append(i)
        i = partner[i]
    assert sorted(seen) == list(range(7)) and i == 0
    assert dpo.mismatched_completions(items, max_seq_len=128) == got
    assert dpo.mismatched_completions(items, max_seq_len=2) == [c[:1] for c in got]
    assert dpo.mismatched_completions([], 128) == []
    with pytest.raises(ValueError, match="needs at least 2 examples"):
        dpo.mismatched_completions(items[:1], 128)


@pytest.mark.parametrize("reference_point", ["mismatched", "matched_batch_mean"])
def test_kto_eval_loss_uses_the_example_weights(demo_base, tokenizer, reference_point):
    """The policy is the reference, so rho = 0 and z0 = 0 and every loss is lambda (1 - sigmoid(0)) = lambda / 2:
    2 desirable (lambda_D = 1) and 2 undesirable (lambda_U = 3) rows give (2 x 0.5 + 2 x 1.5) / 4 = 1.0
    (0.5 if the weights were ignored)."""
    from common.models import load_causal_lm

    model = load_causal_lm(str(demo_base), CPU)
    items = [
        {"prompt_ids": [1, 4, 40, 5], "completion_ids": [50, 51, 2], "label": True},
        {"prompt_ids": [1, 4, 41, 42, 5], "completion_ids": [60, 2], "label": False},
        {"prompt_ids": [1, 4, 43, 5], "completion_ids": [52, 53, 54, 2], "label": True},
        {"prompt_ids": [1, 4, 44, 45, 46, 5], "completion_ids": [61, 62, 2], "label": False},
    ]
    for e, other in zip(items, dpo.mismatched_completions(items, 128)):
        e["mismatched_ids"] = other
    args = dpo.Args(loss_type="kto", kto_reference_point=reference_point, kto_desirable_weight=1.0,
                    kto_undesirable_weight=3.0, local_micro_batch_size=2)  # fmt: skip
    ref = dpo.reference_logprobs(model, items, args, ONE_PROCESS, tokenizer.pad_token_id, kto=True)
    assert ref.shape == (4, 2 if reference_point == "mismatched" else 1)
    metrics = dpo.evaluate(model, items, ref, args, ONE_PROCESS, tokenizer.pad_token_id, kto=True)
    assert metrics["eval/loss"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["eval/kto_reference_point"] == pytest.approx(0.0, abs=1e-5)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type"):
        loss_of("nope", 0.1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"])
def test_gradient_pushes_chosen_up_and_rejected_down(loss_type):
    pol_c, pol_r = POL_C.clone().requires_grad_(), POL_R.clone().requires_grad_()
    kw = {"chosen_data_rewards": torch.tensor([3.0]), "rejected_data_rewards": torch.tensor([0.0])}
    # a small beta keeps every loss away from its minimum, so the gradient is non-zero
    losses, _, _ = dpo.preference_loss(pol_c, pol_r, REF_C, REF_R, loss_type, 0.1, simpo_gamma=2.0, **kw)
    losses.sum().backward()
    assert pol_c.grad.item() < 0 < pol_r.grad.item()  # descending the loss raises chosen, lowers rejected


def test_sequence_logprobs_invariant_to_padding(demo_base, tokenizer):
    from common.models import load_causal_lm

    model = load_causal_lm(str(demo_base), torch.device("cpu")).eval()
    pad = tokenizer.pad_token_id
    prompts, responses = [[1, 4, 40, 5], [1, 4, 40, 41, 42, 43, 44, 5]], [[50, 51, 2], [60, 2]]
    with torch.no_grad():
        batched, lengths = dpo.sequence_logprobs(model, prompts, responses, pad, torch.device("cpu"))
        alone = torch.cat(
            [dpo.sequence_logprobs(model, [p], [r], pad, torch.device("cpu"))[0] for p, r in zip(prompts, responses)]
        )
        mean, _ = dpo.sequence_logprobs(model, prompts, responses, pad, torch.device("cpu"), average=True)
    assert lengths.tolist() == [3, 2]
    assert torch.allclose(batched, alone, atol=1e-5)
    assert torch.allclose(mean, batched / lengths, atol=1e-6)


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_data")
    return {
        "pairs": demo_task.write_jsonl(demo_task.preference_rows(seed=3, n=300), root / "pairs.jsonl"),
        "kto": demo_task.write_jsonl(demo_task.kto_rows(seed=3, n=300), root / "kto.jsonl"),
    }


COMMON = ["--total-steps", "3", "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--demo-eval-prompts", "0",
          "--eval-size", "32", "--local-micro-batch-size", "8", "--warmup-steps", "1"]  # fmt: skip


def losses(out):
    """The logged train/loss series; never empty (two empty logs would compare equal)."""
    found = [
        json.loads(line)["train/loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert found, f"no train/loss logged in {out / 'metrics.jsonl'}"
    return found


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl", "kto"])
def test_smoke_each_loss_type(demo_base, pref_data, tmp_path, loss_type):
    data_file = pref_data["kto" if loss_type == "kto" else "pairs"]
    run_script("dpo.py", "--model-path", str(demo_base), "--data", str(data_file), "--output-dir", str(tmp_path),
               "--loss-type", loss_type, *COMMON)  # fmt: skip
    got = losses(tmp_path)
    assert len(got) == 3 and all(v == v for v in got)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/chosen" in metrics[0] and "logps/chosen" in metrics[0]
    if loss_type != "kto":
        assert {"rewards/accuracies", "rewards/margins", "logps/rejected"} <= set(metrics[0])
    assert {"eval/loss", "eval/rewards/chosen"} <= set(json.loads((tmp_path / "eval.json").read_text()))


def test_precomputed_reference_equals_on_the_fly(demo_base, pref_data, tmp_path):
    """The policy starts equal to the reference, so any difference would show in the very first losses."""
    args = [
        "--model-path",
        str(demo_base),
        "--data",
        str(pref_data["pairs"]),
        *COMMON,
        "--local-micro-batch-size",
        "16",
        "--sft-loss-weight",
        "0",
    ]
    run_script("dpo.py", *args, "--output-dir", str(tmp_path / "live"))
    run_script("dpo.py", *args, "--output-dir", str(tmp_path / "pre"), "--precompute-ref-logprobs")
    assert (tmp_path / "pre" / "ref_logprobs.pt").exists()
    assert losses(tmp_path / "pre") == pytest.approx(losses(tmp_path / "live"), rel=1e-5, abs=1e-6)
    first = json.loads((tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] == pytest.approx(0.693147, abs=1e-4)  # -log sigmoid(0) at the start
    # a second run reuses the cache (same key) and still matches
    key = torch.load(tmp_path / "pre" / "ref_logprobs.pt", weights_only=False)["key"]
    run_script("dpo.py", *args, "--output-dir", str(tmp_path / "pre"), "--precompute-ref-logprobs")
    assert losses(tmp_path / "pre") == pytest.approx(losses(tmp_path / "live"), rel=1e-5, abs=1e-6)
    assert torch.load(tmp_path / "pre" / "ref_logprobs.pt", weights_only=False)["key"] == key
    # other data of the same size must not reuse the stale numbers
    other = demo_task.write_jsonl(demo_task.preference_rows(seed=9, n=300), tmp_path / "other.jsonl")
    other_args = [a if a != str(pref_data["pairs"]) else str(other) for a in args]
    run_script("dpo.py", *other_args, "--output-dir", str(tmp_path / "pre"), "--precompute-ref-logprobs")
    assert torch.load(tmp_path / "pre" / "ref_logprobs.pt", weights_only=False)["key"] != key
    assert losses(tmp_path / "pre")[0] == pytest.approx(0.693147, abs=1e-4)  # recomputed: policy == reference again


def test_precomputed_reference_follows_the_weights(demo_base, pref_data, tmp_path):
    """The cache key hashes the reference's weights: an unchanged reference reuses the cache; the same directory
    retrained (one tensor changed; same path, same file size, same mtime) is recomputed."""
    from transformers import AutoModelForCausalLM

    ref = tmp_path / "ref"
    shutil.copytree(demo_base, ref)
    out = tmp_path / "out"
    args = ["--model-path", str(demo_base), "--ref-model-path", str(ref), "--data", str(pref_data["pairs"]), *COMMON,
            "--total-steps", "1", "--sft-loss-weight", "0", "--output-dir", str(out), "--precompute-ref-logprobs"]  # fmt: skip
    assert "reference log-probs: computed" in run_script("dpo.py", *args).stdout
    first = torch.load(out / "ref_logprobs.pt", weights_only=False)
    assert "reference log-probs: cached" in run_script("dpo.py", *args).stdout
    assert torch.load(out / "ref_logprobs.pt", weights_only=False)["key"] == first["key"]

    weights = ref / "model.safetensors"
    before = weights.stat()
    model = AutoModelForCausalLM.from_pretrained(ref)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(ref)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns

    assert "reference log-probs: computed" in run_script("dpo.py", *args).stdout
    second = torch.load(out / "ref_logprobs.pt", weights_only=False)
    assert second["key"] != first["key"]
    assert second["logps"].shape == first["logps"].shape and (second["logps"] - first["logps"]).abs().max() > 0.1


def test_sft_loss_weight_adds_the_chosen_nll(demo_base, pref_data, tmp_path):
    """At the first step the policy is the reference, so the preference loss is log 2 and the logged loss is
    log 2 + w x train/sft_nll (the chosen responses' mean per-token NLL, itself well above 0 for this model)."""
    for w in ("0", "0.5"):
        run_script("dpo.py", "--model-path", str(demo_base), "--data", str(pref_data["pairs"]), *COMMON,
                   "--sft-loss-weight", w, "--output-dir", str(tmp_path / w))  # fmt: skip
    first = {w: json.loads((tmp_path / w / "metrics.jsonl").read_text().splitlines()[0]) for w in ("0", "0.5")}
    assert first["0.5"]["train/sft_nll"] > 1.0
    assert first["0"]["train/loss"] == pytest.approx(LOG2, abs=1e-4)
    assert first["0.5"]["train/loss"] == pytest.approx(LOG2 + 0.5 * first["0.5"]["train/sft_nll"], abs=1e-4)
    assert first["0.5"]["train/sft_nll"] == pytest.approx(first["0"]["train/sft_nll"], rel=1e-5)  # same weights, data


def test_torchrun_two_processes_match_one(demo_base, pref_data, tmp_path):
    args = ["--model-path", str(demo_base), "--data", str(pref_data["pairs"]), *COMMON]
    run_script("dpo.py", *args, "--output-dir", str(tmp_path / "one"), "--local-micro-batch-size", "16")
    run_script("dpo.py", *args, "--output-dir", str(tmp_path / "two"), "--local-micro-batch-size", "8", nproc=2)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=1e-6)


def test_rpo_without_rewards_and_malformed_rows(demo_base, tmp_path):
    rows = [{"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5"}] * 50
    path = demo_task.write_jsonl(rows, tmp_path / "no_rewards.jsonl")
    proc = run_script("dpo.py", "--model-path", str(demo_base), "--data", str(path), "--output-dir", str(tmp_path / "o"),
                      "--loss-type", "rpo_sq", *COMMON, check=False)  # fmt: skip
    assert (
        proc.returncode != 0
        and f"{path}: row 1, field 'chosen_reward': missing (rpo_sq needs per-response rewards)" in proc.stderr
    )
    bad = demo_task.write_jsonl(
        rows[:10] + [{"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "4"}] + rows, tmp_path / "bad.jsonl"
    )
    proc = run_script("dpo.py", "--model-path", str(demo_base), "--data", str(bad), "--output-dir", str(tmp_path / "o"),
                      *COMMON, check=False)  # fmt: skip
    assert proc.returncode != 0 and f"{bad}: row 11, field 'rejected': identical to 'chosen'" in proc.stderr
    kto_bad = demo_task.write_jsonl(
        [{"prompt": "Add 2 and 2.", "completion": "4", "label": "yes"}] * 40, tmp_path / "kto.jsonl"
    )
    proc = run_script("dpo.py", "--model-path", str(demo_base), "--data", str(kto_bad), "--output-dir", str(tmp_path / "o"),
                      "--loss-type", "kto", *COMMON, check=False)  # fmt: skip
    assert proc.returncode != 0 and f"{kto_bad}: row 1, field 'label': expected true/false, got str" in proc.stderr


def test_kto_torchrun_two_processes_match_one(demo_base, pref_data, tmp_path):
    """KTO's reference point is taken over the global batch, so 2 ranks x 8 rows (reference log-probs precomputed,
    mismatched pairs included) reproduce 1 rank x 16 (reference model live). lr 1e-3 moves the policy enough in
    one step for z0 to be positive at step 2; the per-micro-batch matched estimate differs here by 6e-5 at step 2."""
    args = ["--model-path", str(demo_base), "--data", str(pref_data["kto"]), "--loss-type", "kto", *COMMON,
            "--learning-rate", "1e-3"]  # fmt: skip
    run_script("dpo.py", *args, "--output-dir", str(tmp_path / "one"), "--local-micro-batch-size", "16")
    run_script("dpo.py", *args, "--output-dir", str(tmp_path / "two"), "--local-micro-batch-size", "8",
               "--precompute-ref-logprobs", nproc=2)  # fmt: skip
    one, two = (
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")
    )
    for key in ("train/loss", "train/kto_reference_point", "eval/loss", "eval/kto_reference_point"):
        a, b = [r[key] for r in one if key in r], [r[key] for r in two if key in r]
        assert len(a) == len(b) > 0 and b == pytest.approx(a, rel=1e-5, abs=1e-6), key
    assert max(r["train/kto_reference_point"] for r in one if "train/loss" in r) > 1.0  # z0 was exercised
