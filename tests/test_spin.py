"""spin.py: the SPIN loss by hand, gold/prompt splitting, pair construction (dropped duplicates, mixing the previous
iteration), the reference switching to each iteration's start model, a two-iteration smoke run, torchrun parity,
kill -9 + resume equal to an uninterrupted run (pairs and sampling generator restored), malformed rows."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

import dpo
import spin
from common import data, demo_task
from conftest import ROOT, run_script, script_env

# log p_theta(gold) = -1, log p_theta(generated) = -3; log p_t = -2 for both: rho = +1 / -1, Delta = 2.
POL_C, POL_R, REF_C, REF_R = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
LOG2 = math.log(2.0)


def test_spin_loss_by_hand():
    """lambda = beta = 0.5: l(lambda Delta) = log(1 + e^-1) = 0.3132617; rewards lambda rho = +0.5 / -0.5.
    hinge: max(0, 1 - 0.25 x 2) = 0.5 at beta 0.25. ipo: (2 - 1/(2 x 0.25))^2 = 0 at beta 0.25, (2 - 1)^2 = 1 at 0.5."""
    losses, rc, rr = spin.preference_loss(POL_C, POL_R, REF_C, REF_R, "sigmoid", 0.5)
    assert (losses.item(), rc.item(), rr.item()) == pytest.approx((0.3132617, 0.5, -0.5), abs=1e-6)
    assert spin.preference_loss(POL_C, POL_R, REF_C, REF_R, "hinge", 0.25)[0].item() == pytest.approx(0.5)
    assert spin.preference_loss(POL_C, POL_R, REF_C, REF_R, "ipo", 0.25)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert spin.preference_loss(POL_C, POL_R, REF_C, REF_R, "ipo", 0.5)[0].item() == pytest.approx(1.0)
    # policy == reference (the first step of every iteration): Delta = 0, loss log 2 whatever the log-probs
    at_start, _, _ = spin.preference_loss(POL_C, POL_R, POL_C, POL_R, "sigmoid", 0.1)
    assert at_start.item() == pytest.approx(LOG2)
    with pytest.raises(ValueError, match="unknown loss_type"):
        spin.preference_loss(POL_C, POL_R, REF_C, REF_R, "kto", 0.5)


def test_spin_loss_is_dpo_sigmoid_with_beta_lambda_and_pushes_gold_up():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16) * 5 for _ in range(4))
    ours, our_c, our_r = spin.preference_loss(pc, pr, rc, rr, "sigmoid", 0.3)
    theirs, their_c, their_r = dpo.preference_loss(pc, pr, rc, rr, "sigmoid", 0.3)
    assert torch.allclose(ours, theirs) and torch.allclose(our_c, their_c) and torch.allclose(our_r, their_r)
    gold, generated = POL_C.clone().requires_grad_(), POL_R.clone().requires_grad_()
    spin.preference_loss(gold, generated, REF_C, REF_R, "sigmoid", 0.1)[0].sum().backward()
    assert gold.grad.item() < 0 < generated.grad.item()  # descending raises the gold, lowers the own generation


def test_split_gold_takes_the_last_assistant_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "4", "attributes": {"verbosity": 0}},
        {"role": "user", "content": "Thanks"},  # no answer to imitate: dropped
    ]
    prompt, gold = spin.split_gold(messages, "f: row 3")
    assert gold == "4" and prompt == messages[:4]
    with pytest.raises(data.DataError, match=r"f: row 7, field 'messages': no prompt turn before the last assistant"):
        spin.split_gold([{"role": "assistant", "content": "4"}], "f: row 7")


def test_build_pairs_drops_and_counts_generations_equal_to_the_gold_and_mixes_the_previous_iteration():
    records = [
        {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "gold": f"The answer is {i + 1}.", "row": i + 1}
        for i in range(4)
    ]
    generations = ["The answer is 1. ", "The answer is 3.", "  The answer is 3.", "Sure! The answer is 4."]
    pairs, dropped = spin.build_pairs(records, generations, iteration=2)
    assert dropped == 2  # rows 1 and 3 answered exactly the gold (up to surrounding whitespace)
    assert [(p["row"], p["chosen"], p["rejected"], p["iteration"]) for p in pairs] == [
        (2, "The answer is 2.", "The answer is 3.", 2),
        (4, "The answer is 4.", "Sure! The answer is 4.", 2),
    ]
    previous = [
        {"prompt": records[0]["prompt"], "chosen": "The answer is 1.", "rejected": "7", "row": 1, "iteration": 1}
    ]
    mixed, dropped_again = spin.build_pairs(records, generations, iteration=2, previous=previous)
    assert dropped_again == 2 and mixed == pairs + previous  # the previous pair keeps its older generation
    with pytest.raises(ValueError):
        spin.build_pairs(records, generations[:3], iteration=1)  # one generation per prompt, never silently fewer


def test_build_pairs_pairs_each_of_k_generations_with_its_records_gold():
    records = [{"prompt": [{"role": "user", "content": f"q{i}"}], "gold": f"g{i}", "row": i + 1} for i in range(2)]
    generations = ["a", "g0", "b", "c", "d", "e"]  # record 0's three answers, then record 1's
    pairs, dropped = spin.build_pairs(records, generations, iteration=1)
    assert dropped == 1  # record 0's second answer is its gold
    assert [(p["row"], p["chosen"], p["rejected"]) for p in pairs] == [
        (1, "g0", "a"), (1, "g0", "b"), (2, "g1", "c"), (2, "g1", "d"), (2, "g1", "e")
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not k per record"):
        spin.build_pairs(records, generations[:5], iteration=1)


def test_self_play_gap_by_hand():
    """Gold: right at verbosity 1 (score 0.9) and 0 (0.8); own: wrong at 0, right at 0 (0.8). Verbosity histograms
    gold {0: .5, 1: .5}, own {0: 1}: total variation 0.5."""
    prompts = ["What is 2 + 3?", "Which is larger, 318 or 381?"]
    gap = spin.self_play_gap(prompts, ["The answer is 5.", "381"], ["7", "381"])
    expected = {"gap/gold_score": 0.85, "gap/gold_accuracy": 1.0, "gap/gold_verbosity": 0.5, "gap/own_score": 0.4,
                "gap/own_accuracy": 0.5, "gap/own_verbosity": 0.0, "gap/verbosity_tv": 0.5}  # fmt: skip
    assert gap.keys() == expected.keys()
    for key, value in expected.items():
        assert gap[key] == pytest.approx(value), key
    assert spin.self_play_gap([], [], []) == {}


def test_default_start_model_missing_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/sft here
    with pytest.raises(
        SystemExit, match=r"--model-path out/sft: no such model directory; build it first with `python sft.py`"
    ):
        spin.check_model_path(spin.Args.model_path)
    spin.check_model_path("some-org/some-hub-model")  # hub ids are left to transformers


def test_help_documents_every_flag(capsys):
    import tyro

    with pytest.raises(SystemExit):
        tyro.cli(spin.Args, args=["--help"])
    out = capsys.readouterr().out
    for name in spin.Args.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out, name


# --- script runs -------------------------------------------------------------------------------------------------

TINY = ["--iterations", "2", "--num-prompts", "32", "--eval-size", "8", "--max-new-tokens", "12",
        "--local-micro-batch-size", "8", "--log-every", "1", "--warmup-steps", "1", "--learning-rate", "1e-3"]  # fmt: skip


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> list[float]:
    """The logged train/loss series; never empty (two empty logs would compare equal)."""
    found = [r["train/loss"] for r in metrics(out) if "train/loss" in r and "spin/iteration_step" in r]
    assert found, f"no train/loss logged in {out}"
    return found


@pytest.fixture(scope="module")
def smoke(demo_base, tmp_path_factory):
    """Two tiny iterations on the demo prompts with greedy generations and --mix-previous."""
    out = tmp_path_factory.mktemp("spin_smoke")
    proc = run_script("spin.py", "--model-path", str(demo_base), "--output-dir", str(out), *TINY, "--temperature", "0",
                      "--mix-previous", "--demo-eval-prompts", "8")  # fmt: skip
    return out, proc.stdout


def test_smoke_two_iterations_write_loadable_models_and_per_iteration_eval(smoke):
    from transformers import AutoModelForCausalLM

    out, stdout = smoke
    weights = {}
    for name in ("iter_1", "iter_2", "."):
        model = AutoModelForCausalLM.from_pretrained(out / name)
        weights[name] = model.model.norm.weight.detach().clone()
    assert not torch.equal(weights["iter_1"], weights["iter_2"])  # iteration 2 trained on
    assert torch.equal(weights["iter_2"], weights["."])  # the final model is the last iteration's
    result = json.loads((out / "eval.json").read_text())
    for key in ("initial/eval/score", "initial/eval/accuracy", "iter_1/eval/score", "iter_1/eval/accuracy",
                "iter_2/eval/score", "iter_2/eval/accuracy", "iter_2/eval/rewards/accuracies", "eval/score"):  # fmt: skip
        assert key in result, key
    rows = metrics(out)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
            "train/loss"} <= set(next(r for r in rows if "spin/iteration_step" in r))  # fmt: skip
    # mixing: iteration 2 trains on its own 32 pairs plus iteration 1's 32 (nothing dropped: a random model never
    # answers the gold)
    assert (result["iter_1/spin/pairs"], result["iter_2/spin/pairs"]) == (32, 64)
    assert result["iter_1/spin/dropped_pairs"] == 0
    assert "per iteration" in stdout and "initial" in stdout and "iteration 2 done" in stdout
    # the model-vs-data gap on the first --gap-prompts training prompts, at the start and after each iteration
    for key in (
        "initial/gap/own_accuracy",
        "iter_1/gap/own_accuracy",
        "iter_2/gap/verbosity_tv",
        "iter_2/gap/gold_score",
    ):
        assert 0 <= result[key] <= 1, key
    assert "data vs model on the first 32 training prompts" in stdout


def test_several_generations_per_prompt_make_a_pair_each(demo_base, tmp_path):
    """--num-generations 3: three sampled answers per prompt, in a row, each paired with the prompt's gold."""
    run_script("spin.py", "--model-path", str(demo_base), "--output-dir", str(tmp_path), "--iterations", "1",
               "--num-prompts", "8", "--eval-size", "4", "--max-new-tokens", "8", "--num-generations", "3",
               "--local-micro-batch-size", "8", "--demo-eval-prompts", "0", "--gap-prompts", "0")  # fmt: skip
    saved = torch.load(tmp_path / "pairs" / "iter_1.pt", weights_only=False)
    pairs = saved["pairs"]
    assert len(pairs) + saved["dropped"] == 24 and saved["dropped"] == 0  # a random model never answers the gold
    rows = [p["row"] for p in pairs]
    assert rows == [r for r in dict.fromkeys(rows) for _ in range(3)] and len(set(rows)) == 8
    for i in range(0, 24, 3):
        assert len({p["chosen"] for p in pairs[i : i + 3]}) == 1  # the same gold
        assert len({p["rejected"] for p in pairs[i : i + 3]}) > 1  # different draws
    assert "initial/gap/own_accuracy" not in json.loads((tmp_path / "eval.json").read_text())  # --gap-prompts 0: off


def test_reference_is_the_model_at_the_start_of_each_iteration(smoke, demo_base, tokenizer):
    """The first loss of every iteration is the loss at Delta = 0 (policy == reference: log 2 for sigmoid,
    (1 / (2 beta))^2 = 1 for the default ipo at beta 0.5), and the saved reference log-probs of iteration 2 are the
    iteration-1 model's, not the start model's."""
    from common.models import load_causal_lm

    out, _ = smoke
    zero = torch.zeros(1)
    at_start = spin.preference_loss(zero, zero, zero, zero, spin.Args.loss_type, spin.Args.beta)[0].item()
    assert at_start == pytest.approx(1.0 if spin.Args.loss_type == "ipo" else LOG2)
    rows = [r for r in metrics(out) if "spin/iteration_step" in r]
    firsts = [r["train/loss"] for r in rows if r["spin/iteration_step"] == 1]
    assert firsts == pytest.approx([at_start, at_start], abs=1e-4)
    assert any(abs(r["train/loss"] - at_start) > 1e-3 for r in rows)  # ... and it then moves away

    it1, it2 = (torch.load(out / "pairs" / f"iter_{k}.pt", weights_only=False) for k in (1, 2))
    items = [data.tokenize_pair(tokenizer, p, 128, 96, "t") for p in it2["pairs"] + it1["pairs"]]  # mixed, in order
    assert it2["ref"].shape == (len(items), 2)
    cpu, pad = torch.device("cpu"), tokenizer.pad_token_id
    with torch.no_grad():
        by_iter1 = torch.stack(
            spin.pair_logprobs(load_causal_lm(str(out / "iter_1"), cpu).eval(), items, pad, cpu, False)[:2], -1
        )
        by_start = torch.stack(
            spin.pair_logprobs(load_causal_lm(str(demo_base), cpu).eval(), items, pad, cpu, False)[:2], -1
        )
    assert torch.allclose(it2["ref"], by_iter1, atol=1e-4)
    assert (it2["ref"] - by_start).abs().max() > 1e-2  # the start model would give other numbers


def test_torchrun_two_processes_match_one(smoke, demo_base, tmp_path):
    """Greedy generations and the same global batch (2 ranks x 4): the same pairs and losses as one process."""
    out, _ = smoke
    run_script("spin.py", "--model-path", str(demo_base), "--output-dir", str(tmp_path), *TINY, "--temperature", "0",
               "--mix-previous", "--demo-eval-prompts", "8", "--local-micro-batch-size", "4", nproc=2)  # fmt: skip
    for k in (1, 2):
        one, two = (torch.load(d / "pairs" / f"iter_{k}.pt", weights_only=False) for d in (out, tmp_path))
        assert [p["rejected"] for p in two["pairs"]] == [p["rejected"] for p in one["pairs"]]
    assert losses(tmp_path) == pytest.approx(losses(out), rel=1e-4, abs=1e-5)
    assert json.loads((tmp_path / "trainer_state" / "COMPLETE").read_text())["world_size"] == 2


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """Demo SFT rows with one row that has no prompt before its assistant turn (row 5)."""
    rows = demo_task.sft_rows(seed=3, n=120)
    rows.insert(4, {"messages": [{"role": "assistant", "content": "The answer is 4."}]})
    return demo_task.write_jsonl(rows, tmp_path_factory.mktemp("spin_data") / "sft.jsonl")


def test_bad_row_names_file_row_and_field(demo_base, sft_file, tmp_path):
    proc = run_script("spin.py", "--model-path", str(demo_base), "--data", str(sft_file), "--output-dir", str(tmp_path),
                      *TINY, "--demo-eval-prompts", "0", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert f"{sft_file}: row 5, field 'messages': no prompt turn before the last assistant turn" in proc.stderr


def test_kill9_then_resume_equals_uninterrupted(demo_base, sft_file, tmp_path):
    """Sampled generations, killed inside an iteration (micro-batch 4: 7 steps in iteration 1, checkpoints every 2):
    the resume must reuse the saved pairs, restore the learning rate of the step and the sampling generator, or
    the rest of the iteration, iteration 2's generations and every later loss would differ."""
    args = ["--model-path", str(demo_base), "--data", str(sft_file), *TINY, "--demo-eval-prompts", "0", "--save-every", "2",
            "--skip-bad-rows", "--mix-previous", "--local-micro-batch-size", "4", "--warmup-steps", "3"]  # fmt: skip
    full = run_script("spin.py", *args, "--output-dir", str(tmp_path / "full"))
    assert "skipped_rows=1" in full.stdout and "skipped: " in full.stdout
    out = tmp_path / "killed"
    cmd = [sys.executable, "spin.py", *args, "--output-dir", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    marker, deadline = out / "trainer_state" / "COMPLETE", time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, f"run ended before its first checkpoint:\n{proc.stdout.read()}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    state = torch.load(out / "trainer_state" / "state.pt", weights_only=False)
    assert state["iteration_step"] > 0 and state["pairs_ready"], "the kill should land inside an iteration"
    run_script("spin.py", *args, "--output-dir", str(out), "--resume")
    for k in (1, 2):
        a, b = (torch.load(d / "pairs" / f"iter_{k}.pt", weights_only=False) for d in (tmp_path / "full", out))
        assert [p["rejected"] for p in a["pairs"]] == [p["rejected"] for p in b["pairs"]]
    assert losses(out) == pytest.approx(losses(tmp_path / "full"), rel=1e-6, abs=1e-7)
