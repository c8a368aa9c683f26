"""distill.py: the losses by hand, the teacher's top-K cache (round trip, invalidation), the tokenizer check; and
script runs on tiny models: both modes, 1 vs 2 processes (on-policy), kill -9 + resume, bad rows."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

import distill
from common import data, demo_task
from common.dist import Dist
from conftest import run_script
from faults import assert_same_series, checkpoint_step, log_rows, resumed_from, series, start
from kernels import full_kl, topk_of

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def models(demo_base):
    """Teacher: the demo base (4 layers, random); student: the same cut to 2 layers (`--model-path demo:2`)."""
    from common.models import ensure_demo_student

    return {"teacher": str(demo_base), "student": str(ensure_demo_student(2, base=demo_base))}


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> str:
    return str(demo_task.write_jsonl(demo_task.sft_rows(seed=3, n=120), tmp_path_factory.mktemp("d") / "sft.jsonl"))


# --------------------------------------------------------------------------------------------------- losses


def test_student_is_a_cut_of_the_base(models):
    from transformers import AutoModelForCausalLM

    from common.models import ensure_demo_student

    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"])
    student = AutoModelForCausalLM.from_pretrained(models["student"])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for name, tensor in student.state_dict().items():
        assert torch.equal(tensor, teacher.state_dict()[name]), name  # layers 0-1, embeddings, norm: the base's
    with pytest.raises(ValueError, match="demo:9: the demo base has 4 layers"):
        ensure_demo_student(9, base=models["teacher"])


def test_on_policy_losses_are_zero_when_student_is_teacher():
    """Every on-policy divergence of a distribution from itself is 0, with zero gradient."""
    logits = torch.randn(3, 5, 40) * 3
    logits[..., 0] = float("-inf")  # the never-sampled pad token
    for flags in ({"on_policy_kl": "full"}, {"on_policy_kl": "topk", "top_k": 8}, {"jsd_beta": 0.5},
                  {"jsd_beta": 1.0}, {"on_policy_kl": "topk", "top_k": 8, "topk_mass": "tail"}):  # fmt: skip
        student = logits.clone().requires_grad_()
        loss = distill.on_policy_token_losses(student, logits, distill.Args(**flags))
        loss.sum().backward()
        assert loss.abs().max() < 1e-5 and student.grad.abs().max() < 1e-5, flags


def test_generalized_jsd_by_hand():
    """beta = 1 is the reverse KL(S || T); beta = 0.5 is the symmetric Jensen-Shannon divergence, which for
    S = [1, 0], T = [0, 1] is log 2; small beta approaches beta x KL(T || S)."""
    s, t = torch.randn(4, 30), torch.randn(4, 30)
    assert torch.allclose(distill.generalized_jsd(s, t, 1.0, 1.0), full_kl(s, t), atol=1e-6)
    half = distill.generalized_jsd(s, t, 0.5, 1.0)
    assert torch.allclose(half, distill.generalized_jsd(t, s, 0.5, 1.0), atol=1e-6)
    one_hot = torch.tensor([[0.0, float("-inf")]]), torch.tensor([[float("-inf"), 0.0]])
    assert distill.generalized_jsd(*one_hot, 0.5, 1.0).item() == pytest.approx(0.693147, abs=1e-6)
    beta = 1e-4
    assert torch.allclose(distill.generalized_jsd(s, t, beta, 1.0) / beta, full_kl(t, s), rtol=1e-2)
    with pytest.raises(ValueError, match="--jsd-beta must be in"):
        distill.generalized_jsd(s, t, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ top-K cache


def sft_examples(tokenizer, n=12):
    records = data.parse_rows(demo_task.sft_rows(seed=5, n=n), data.parse_sft, "x").records
    return [data.tokenize_sft(tokenizer, r, 128, "x") for r in records]


def test_topk_cache_round_trips(models, tokenizer, tmp_path):
    """What stage 1 writes is, row by row, the teacher's top-K ids and log-probs at every label position (log-probs
    to fp16 rounding), laid out by `topk_batch` like logits[:, :-1]."""
    from common.models import load_causal_lm

    teacher = load_causal_lm(models["teacher"], CPU.device).eval()
    examples = sft_examples(tokenizer)
    args = distill.Args(top_k=8, temperature=0.8, local_micro_batch_size=5)  # micro-batches of 5, 5, 2
    distill.write_topk_cache(tmp_path / "c", "k1", teacher, examples, args, CPU, tokenizer.pad_token_id, len(tokenizer))
    cache = distill.open_cache(tmp_path / "c", "k1")
    assert cache is not None and distill.open_cache(tmp_path / "c", "k2") is None  # another key: stale
    batch = data.collate(examples[3:6], tokenizer.pad_token_id)
    ids, lp = distill.topk_batch(cache, [3, 4, 5], examples, batch["input_ids"].shape[1] - 1)
    with torch.no_grad():
        logits = teacher(**data.model_inputs(batch, teacher, CPU.device)).logits[:, :-1]
    want_ids, want_lp = topk_of(logits, 8, 0.8)
    labelled = batch["labels"][:, 1:] != -100
    assert labelled.sum() > 20 and (ids[~labelled] == -100).all() and (lp[~labelled] == 0).all()
    assert torch.equal(ids[labelled], want_ids[labelled])
    assert torch.allclose(lp[labelled], want_lp[labelled], atol=2e-2, rtol=1e-3)  # fp16 of values down to ~-16


def test_cache_key_changes_with_teacher_weights_and_data(models, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from common.models import weights_fingerprint

    examples = sft_examples(tokenizer)
    args = distill.Args()
    key = distill.cache_key(weights_fingerprint(models["teacher"]), examples, args, "float32")
    retrained = AutoModelForCausalLM.from_pretrained(models["teacher"])
    with torch.no_grad():
        retrained.model.norm.weight.mul_(1.01)  # same path layout, same file size, other weights
    retrained.save_pretrained(tmp_path / "t")
    assert distill.cache_key(weights_fingerprint(tmp_path / "t"), examples, args, "float32") != key
    first = distill.label_positions(examples[0])[0] + 1  # one token fewer in the loss
    other = [dict(examples[0], labels=examples[0]["labels"][:first] + [-100] + examples[0]["labels"][first + 1 :])]
    other += examples[1:]
    for changed in (other, examples[:-1]):
        assert distill.cache_key(weights_fingerprint(models["teacher"]), changed, args, "float32") != key
    assert distill.cache_key(weights_fingerprint(models["teacher"]), examples, distill.Args(top_k=8), "float32") != key
    assert distill.cache_key(weights_fingerprint(models["teacher"]), examples, args, "float32") == key


def test_mismatched_tokenizers_are_an_error(tokenizer):
    import copy

    distill.check_same_tokenizer(tokenizer, copy.deepcopy(tokenizer), "s", "t")  # the same: no error
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["zebra"])
    with pytest.raises(ValueError, match=r"teacher t and student s must share the tokenizer: vocabularies differ"):
        distill.check_same_tokenizer(tokenizer, other, "s", "t")
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ messages }}"
    with pytest.raises(ValueError, match="chat templates differ"):
        distill.check_same_tokenizer(tokenizer, other, "s", "t")


# ---------------------------------------------------------------------------------------------------- scripts


def common_flags(models, rows):
    return ["--model-path", models["student"], "--teacher-path", models["teacher"], "--data", rows,
            "--demo-eval-prompts", "0", "--log-every", "1", "--top-k", "8", "--learning-rate", "2e-3",
            "--warmup-steps", "2"]  # fmt: skip


def on_policy_flags(models, rows):
    # lmbda 0.5: both kinds of step occur within 6 steps at seed 1
    return [*common_flags(models, rows), "--local-micro-batch-size", "4", "--gradient-accumulation-steps", "2",
            "--total-steps", "6", "--response-length", "10", "--lmbda", "0.5"]  # fmt: skip


def losses(out: Path) -> list[float]:
    return [r["train/loss"] for r in log_rows(out) if "train/loss" in r]


@pytest.fixture(scope="module")
def on_policy_run(models, rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("on_policy")
    run_script("distill.py", *on_policy_flags(models, rows), "--output-dir", str(out), "--save-every", "0")
    return out


def test_on_policy_runs_and_two_processes_match_one(on_policy_run, models, rows, tmp_path):
    """Keyed sampling and global-token normalisation: 2 ranks x 4 prompts sample the same responses as 1 x 8
    and log the same losses."""
    got = losses(on_policy_run)
    frac = [r["distill/on_policy_frac"] for r in log_rows(on_policy_run) if "distill/on_policy_frac" in r]
    assert len(got) == 6 and all(v > 0 for v in got) and set(frac) == {0.0, 1.0}, (got, frac)
    run_script("distill.py", *on_policy_flags(models, rows), "--output-dir", str(tmp_path),
               "--gradient-accumulation-steps", "1", nproc=2)  # fmt: skip
    assert losses(tmp_path) == pytest.approx(got, rel=1e-5, abs=1e-6)


def test_offline_runs_reuses_its_cache_and_refuses_a_stale_one(models, rows, tmp_path):
    """Stage 1 + 2 in one run; then stage 2 alone from its cache (no teacher loaded: the log says `cached`) with 4 x 2
    accumulation instead of 8 x 1: the same losses; then stage 2 with other data: the cache is stale, an error."""
    flags = [*common_flags(models, rows), "--mode", "offline", "--eval-size", "16", "--local-micro-batch-size", "8",
             "--total-steps", "5", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    first = run_script("distill.py", *flags, "--output-dir", str(tmp_path / "a"))
    assert "top-K cache computed" in first.stdout
    result = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert result["eval/kd_loss"] > 0 and len(losses(tmp_path / "a")) == 5
    second = run_script("distill.py", *flags, "--offline-stage", "train", "--output-dir", str(tmp_path / "b"),
                        "--local-micro-batch-size", "4", "--gradient-accumulation-steps", "2")  # fmt: skip
    assert "top-K cache cached" in second.stdout
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-5, abs=1e-6)
    stale = run_script("distill.py", *flags, "--offline-stage", "train", "--max-seq-len", "40",
                       "--output-dir", str(tmp_path / "c"), check=False)  # fmt: skip
    assert stale.returncode != 0 and "top-K cache is stale (another teacher or data)" in stale.stderr


@pytest.mark.slow  # like the other scripts' fault tests (tests/test_faults_supervised.py)
def test_kill9_then_resume_equals_uninterrupted(on_policy_run, models, rows, tmp_path):
    cmd = ["distill.py", *on_policy_flags(models, rows)]
    proc = start([*cmd, "--save-every", "2"], tmp_path)
    deadline = time.time() + 300
    while (saved := checkpoint_step(tmp_path)) is None or max(
        (r["step"] for r in log_rows(tmp_path)), default=-1
    ) <= saved:
        assert proc.poll() is None, f"finished before logging past a checkpoint:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "nothing logged past a checkpoint in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = checkpoint_step(tmp_path)
    resumed = run_script(*cmd, "--output-dir", str(tmp_path), "--save-every", "2", "--resume")
    assert resumed_from(resumed.stdout) == saved > 0
    assert_same_series(series(tmp_path, ("train/loss",)), series(on_policy_run, ("train/loss",)))


def test_bad_rows_stop_with_a_clear_error(models, rows, tmp_path):
    """(Mismatched tokenizers: `test_mismatched_tokenizers_are_an_error`; the script calls the same check first.)"""
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "What is 1 + 2?", "completion": "3"}
    path.write_text("\n".join(json.dumps(r) for r in [good] * 20 + [{"prompt": "What is 1 + 2?"}] + [good] * 20))
    flags = [*common_flags(models, rows), "--output-dir", str(tmp_path / "o")]
    proc = run_script("distill.py", *flags, "--data", str(path), check=False)
    assert proc.returncode != 0 and f"{path}: row 21, field 'completion': missing" in proc.stderr
    # --max-rows: rows past the first N are never read, so the bad row 21 does not stop a run on the first 20
    proc = run_script("distill.py", *flags, "--data", str(path), "--max-rows", "20", "--total-steps", "1",
                      "--local-micro-batch-size", "4", "--response-length", "4", "--save-every", "0")  # fmt: skip
    assert "examples=20 " in proc.stdout and "skipped_rows=0 " in proc.stdout


def test_help_documents_every_flag():
    proc = run_script("distill.py", "--help")
    for name in distill.Args.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in proc.stdout, name
    assert "the mass outside" in proc.stdout or "outside its top K" in proc.stdout  # --topk-mass says what it does


def test_lora_student(models, rows, tmp_path):
    """--lora-r on the student: two on-policy steps train adapters only; the merged export is a plain model that
    differs from the student's start only in the adapted (decoder-block linear) weights."""
    flags = [*common_flags(models, rows), "--local-micro-batch-size", "4", "--total-steps", "2",
             "--response-length", "10", "--lora-r", "4", "--output-dir", str(tmp_path)]  # fmt: skip
    proc = run_script("distill.py", *flags)
    assert "LoRA" in proc.stdout and len(losses(tmp_path)) == 2
    from safetensors.torch import load_file

    start, end = load_file(Path(models["student"]) / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all(k.startswith("model.layers.") and k.endswith("proj.weight") for k in changed), changed
