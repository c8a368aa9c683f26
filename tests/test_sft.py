"""sft.py: packed == unpacked loss, golden losses, batch-split invariance, torchrun parity, resume, faults."""

from __future__ import annotations

import json

import pytest
import torch

from common import data, demo_task
from conftest import run_script

STEPS = 12
COMMON = ["--total-steps", str(STEPS), "--log-every", "1", "--eval-every", "0", "--save-every", "0",
          "--demo-eval-prompts", "0", "--eval-size", "32", "--warmup-steps", "3"]  # fmt: skip

# Losses of the first 12 steps of `sft.py` on the fixture data (600 demo rows, seed 1, global batch 32, fp32,
# CPU), to 1e-4: loose enough for another CPU's summation order, tight enough to catch a changed loss, mask,
# schedule or data order. Regenerate with `pytest tests/test_sft.py -k golden -s` after an intended change (it prints them).
GOLDEN = [
    6.10916,
    5.797147,
    5.574667,
    5.331121,
    5.037438,
    4.795818,
    4.56899,
    4.321765,
    4.45712,
    4.084818,
    4.067228,
    3.944629,
]


def losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return demo_task.write_jsonl(demo_task.sft_rows(seed=3, n=600), tmp_path_factory.mktemp("sftdata") / "sft.jsonl")


@pytest.fixture(scope="module")
def baseline(demo_base, sft_data, tmp_path_factory):
    """The reference run: 1 process, micro-batch 16 x 2 accumulation steps."""
    out = tmp_path_factory.mktemp("baseline")
    run_script("sft.py", "--model-path", str(demo_base), "--data", str(sft_data), "--output-dir", str(out),
               "--local-micro-batch-size", "16", "--gradient-accumulation-steps", "2", *COMMON)  # fmt: skip
    return out


def test_packed_loss_equals_unpacked(demo_base, tokenizer):
    import sft
    from common.models import load_causal_lm

    model = load_causal_lm(str(demo_base), torch.device("cpu")).eval()
    rows = data.parse_rows(demo_task.sft_rows(seed=5, n=12), data.parse_sft, "x").records
    examples = [data.tokenize_sft(tokenizer, r, 128, "x") for r in rows]
    with torch.no_grad():
        unpacked = sft.sft_loss_sum(model, data.collate(examples, tokenizer.pad_token_id), torch.device("cpu"))
        rows_packed = data.pack(examples, 128)
        assert len(rows_packed) < len(examples)  # something was actually packed
        packed = sft.sft_loss_sum(model, data.collate_packed(rows_packed, tokenizer.pad_token_id), torch.device("cpu"))
    n_tokens = sum(sft.count_label_tokens(e) for e in examples)
    assert abs(unpacked.item() - packed.item()) / n_tokens < 1e-5, (unpacked.item(), packed.item())


def test_golden_losses(baseline):
    got = losses(baseline)
    print("golden losses:", [round(x, 6) for x in got])
    assert len(got) == STEPS
    assert got[-1] < got[0] - 0.5  # it learns
    assert got == pytest.approx(GOLDEN, rel=1e-4)


def test_micro_batch_times_accumulation_invariance(baseline, demo_base, sft_data, tmp_path):
    """32 x 1 and 8 x 4 see the same global batch and normalise by its token count: same losses."""
    for micro, accum in [(32, 1), (8, 4)]:
        out = tmp_path / f"m{micro}"
        run_script("sft.py", "--model-path", str(demo_base), "--data", str(sft_data), "--output-dir", str(out),
                   "--local-micro-batch-size", str(micro), "--gradient-accumulation-steps", str(accum), *COMMON)  # fmt: skip
        got, expected = losses(out), losses(baseline)
        assert len(got) == len(expected) == STEPS  # two empty logs would compare equal
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_torchrun_two_processes_match_one(baseline, demo_base, sft_data, tmp_path):
    """2 ranks x micro 16 = the same global batch of 32 as the baseline: the same losses."""
    # an evaluation (no backward) right before a checkpoint: FSDP must be resharded before the state is read
    run_script("sft.py", "--model-path", str(demo_base), "--data", str(sft_data), "--output-dir", str(tmp_path),
               "--local-micro-batch-size", "16", *COMMON, "--eval-every", "6", "--save-every", "6", nproc=2)  # fmt: skip
    got, expected = losses(tmp_path), losses(baseline)
    assert len(got) == len(expected) == STEPS  # two empty logs would compare equal
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    state = json.loads((tmp_path / "trainer_state" / "COMPLETE").read_text())
    assert state == {"world_size": 2, "step": STEPS}


# kill -9 + resume, SIGTERM and NaN handling of sft.py are in tests/test_faults_supervised.py, with every other script.


def test_bad_data_row_names_file_row_and_field(demo_base, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "What is 1 + 2?", "completion": "3"}
    path.write_text("\n".join(json.dumps(r) for r in [good] * 40 + [{"prompt": "What is 1 + 2?"}] + [good] * 40) + "\n")
    proc = run_script("sft.py", "--model-path", str(demo_base), "--data", str(path), "--output-dir", str(tmp_path / "o"),
                      *COMMON, check=False)  # fmt: skip
    assert proc.returncode != 0
    assert f"{path}: row 41, field 'completion': missing" in proc.stderr
    proc = run_script("sft.py", "--model-path", str(demo_base), "--data", str(path), "--output-dir", str(tmp_path / "o"),
                      *COMMON, "--skip-bad-rows", "--total-steps", "1", "--local-micro-batch-size", "8")  # fmt: skip
    assert "1 bad rows skipped" in proc.stdout
    proc = run_script("sft.py", "--model-path", str(demo_base), "--data", str(path), "--output-dir", str(tmp_path / "o"),
                      *COMMON, "--max-rows", "30", "--total-steps", "1", "--local-micro-batch-size", "8")  # fmt: skip
    assert "(30 examples," in proc.stdout  # --max-rows: the first 30 training rows; the bad row 41 is never read


def test_smoke_demo_run_outputs_a_usable_model(demo_base, sft_data, tmp_path):
    """The script end to end with the demo evaluation; the output loads with transformers alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    proc = run_script("sft.py", "--model-path", str(demo_base), "--output-dir", str(out), "--total-steps", "20",
                      "--demo-eval-prompts", "16", "--max-new-tokens", "24", "--packing", "--eval-every", "10")  # fmt: skip
    assert "ground truth (16 held-out demo prompts)" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    for key in ("eval/loss", "eval/score", "eval/accuracy", "initial/eval/score"):
        assert key in result
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Add 1 and 2."}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|bos|><|user|>\nAdd 1 and 2.<|end|>\n<|assistant|>\n"
    assert tok.pad_token_id != tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id


def test_help_documents_every_flag():
    proc = run_script("sft.py", "--help")
    import sft

    for name in sft.Args.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in proc.stdout, name
    assert "tokens per example" in proc.stdout  # the field docstrings are the help text
