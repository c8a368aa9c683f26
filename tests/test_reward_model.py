"""reward_model.py: BT and margin losses by hand, HelpSteer2-Preference's margin/scaled BT by hand, masked
regression, padding invariance, the saved model round-trips through transformers, malformed rows and strengths,
one output of a multi-output model, smoke runs (bt, regression), torchrun parity."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

import reward_model as rm
from common import data, demo_task, rewards
from common.models import load_tokenizer
from conftest import run_script


def test_bt_loss_by_hand():
    """r_c = 1, r_r = 0: -log sigmoid(1) = log(1 + e^-1) = 0.3132617. Margin 0.5: log(1 + e^-0.5) = 0.4740770.
    Centering 0.01 x (1 + 0)^2 adds 0.01."""
    c, r = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.0])
    plain = rm.bt_loss(c, r, torch.tensor([0.0, 0.5, 0.0]), 0.0)
    assert plain.tolist() == pytest.approx([0.3132617, 0.4740770, 0.3132617], abs=1e-6)
    centered = rm.bt_loss(c, r, torch.zeros(3), 0.01)
    assert centered.tolist() == pytest.approx([0.3232617] * 3, abs=1e-6)


def hf2_loss(loss, chosen, rejected, strength, margin=None):
    """Per-pair loss of --loss on a batch, through the script's own helpers."""
    terms = [rm.pair_margin_and_weight(loss, margin, s) for s in strength]
    m, w = (torch.tensor(x) for x in zip(*terms))
    return rm.bt_loss(chosen, rejected, m, 0.0, w)


def test_helpsteer2_preference_losses_by_hand():
    """r_c = [1, 1, 0.5], r_r = [0, 0, 1] (r_c - r_r = [1, 1, -0.5]), strengths s = [0.5, -2, 1] (only |s| counts).
    -log sigmoid(x) = log(1 + e^-x):
      regular_bt  [log(1+e^-1), log(1+e^-1), log(1+e^0.5)]                 = [0.3132617, 0.3132617, 0.9740770]
      margin_bt   x = r_c - r_r - |s| = [0.5, -1, -1.5]
                  [log(1+e^-0.5), log(1+e^1), log(1+e^1.5)]                = [0.4740770, 1.3132617, 1.7014133]
      scaled_bt   |s| x regular = [0.5 x 0.3132617, 2 x 0.3132617, 1 x 0.9740770] = [0.1566308, 0.6265234, 0.9740770]
    d scaled / d r_c of pair 2 = -|s| sigmoid(-1) = -2 / (1 + e) = -0.5378828."""
    c = torch.tensor([1.0, 1.0, 0.5], requires_grad=True)
    r, s = torch.tensor([0.0, 0.0, 1.0]), [0.5, -2.0, 1.0]
    assert hf2_loss("regular_bt", c, r, s).tolist() == pytest.approx([0.3132617, 0.3132617, 0.9740770], abs=1e-6)
    assert hf2_loss("margin_bt", c, r, s).tolist() == pytest.approx([0.4740770, 1.3132617, 1.7014133], abs=1e-6)
    scaled = hf2_loss("scaled_bt", c, r, s)
    assert scaled.tolist() == pytest.approx([0.1566308, 0.6265234, 0.9740770], abs=1e-6)
    scaled.sum().backward()
    assert c.grad[1].item() == pytest.approx(-0.5378828, abs=1e-6)
    # regular_bt keeps the `margin` column (--use-margin) and ignores the strength; the others ignore the margin
    assert hf2_loss("regular_bt", c, r, s, margin=0.5)[0].item() == pytest.approx(0.4740770, abs=1e-6)
    assert hf2_loss("margin_bt", c, r, s, margin=5.0)[0].item() == pytest.approx(0.4740770, abs=1e-6)
    assert rm.pair_margin_and_weight("regular_bt", None, None) == (0.0, 1.0)
    with pytest.raises(ValueError, match="--loss scaled_bt needs the pair's preference strength"):
        rm.pair_margin_and_weight("scaled_bt", None, None)


def test_output_index_by_name():
    from types import SimpleNamespace as NS

    lm = NS(architectures=["LlamaForCausalLM"], num_labels=2, id2label={0: "LABEL_0", 1: "LABEL_1"})
    multi = NS(architectures=["LlamaForSequenceClassification"], num_labels=3, attribute_names=["a", "b", "c"])
    assert rm.output_index(lm, None, "m") is None  # a causal LM's default num_labels=2 is no head
    assert rm.output_index(multi, "c", "m") == 2
    with pytest.raises(
        ValueError, match=r"m has 3 outputs \['a', 'b', 'c'\]: choose the one to train with --reward-output"
    ):
        rm.output_index(multi, None, "m")
    with pytest.raises(ValueError, match=r"--reward-output x: not an output of m \(its outputs: \['a', 'b', 'c'\]\)"):
        rm.output_index(multi, "x", "m")
    with pytest.raises(ValueError, match="--reward-output a: m has one output"):
        rm.output_index(lm, "a", "m")


def test_regression_loss_ignores_missing_attributes():
    """pred [[1, 2], [3, 4]], target [[1.5, nan], [nan, 2]]: (1 - 1.5)^2 + (4 - 2)^2 = 4.25 over 2 labels.
    A missing value treated as 0 would add 2^2 + 3^2 = 13."""
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    total, count = rm.regression_loss(pred, torch.tensor([[1.5, math.nan], [math.nan, 2.0]]))
    assert total.item() == pytest.approx(4.25) and count.item() == 2
    total.backward()
    assert pred.grad.tolist() == [[-1.0, 0.0], [0.0, 4.0]]  # no gradient into missing attributes


def test_parse_weights():
    assert rm.parse_weights("verbosity=-1,correctness=2", ["correctness", "verbosity", "politeness"]) == [
        2.0,
        -1.0,
        0.0,
    ]
    assert rm.parse_weights("", ["a"]) is None
    with pytest.raises(ValueError, match="unknown attribute 'x'"):
        rm.parse_weights("x=1", ["a"])


def test_score_is_invariant_to_padding_amount_and_side(demo_base, tokenizer):
    from common.models import load_sequence_classifier

    model = load_sequence_classifier(
        str(demo_base), torch.device("cpu"), 1, pad_token_id=tokenizer.pad_token_id, init_head=True
    ).eval()
    pad = tokenizer.pad_token_id
    seq = data.render(
        tokenizer, [{"role": "user", "content": "Add 4 and 4."}, {"role": "assistant", "content": "The answer is 8."}]
    )
    longer = data.render(
        tokenizer,
        [
            {"role": "user", "content": "What is 12 + 13?"},
            {"role": "assistant", "content": "Sure! Happy to help. The answer is 25."},
        ],
    )
    with torch.no_grad():
        alone = rewards.score_sequences(model, [seq], pad, torch.device("cpu"))[0, 0]
        # right-padded next to a longer one
        right = rewards.score_sequences(model, [seq, longer], pad, torch.device("cpu"))[0, 0]
        left = data.collate(
            [{"input_ids": seq, "labels": seq}, {"input_ids": longer, "labels": longer}], pad, side="left"
        )
        left_score = model(**data.model_inputs(left, model, torch.device("cpu"))).logits[0, 0]
    assert len(longer) > len(seq) + 3
    assert torch.allclose(alone, right, atol=1e-5) and torch.allclose(alone, left_score, atol=1e-5)


@pytest.fixture(scope="module")
def rm_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_data")
    return {
        "pairs": demo_task.write_jsonl(demo_task.preference_rows(seed=4, n=300), root / "pairs.jsonl"),
        "attributes": demo_task.write_jsonl(demo_task.attribute_rows(seed=4, n=300), root / "attrs.jsonl"),
    }


COMMON = ["--total-steps", "4", "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--eval-size", "32",
          "--local-micro-batch-size", "8", "--warmup-steps", "1"]  # fmt: skip


def losses(out):
    """The logged train/loss series; never empty (two empty logs would compare equal)."""
    found = [
        json.loads(line)["train/loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert found, f"no train/loss logged in {out / 'metrics.jsonl'}"
    return found


def test_bt_smoke_and_round_trip_through_transformers(demo_base, rm_data, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_script(
        "reward_model.py",
        "--model-path",
        str(demo_base),
        "--data",
        str(rm_data["pairs"]),
        "--output-dir",
        str(tmp_path),
        *COMMON,
    )
    result = json.loads((tmp_path / "eval.json").read_text())
    assert {"eval/accuracy", "eval/margin", "reward/score_mean", "reward/score_std"} <= set(result)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert model.config.score_std == pytest.approx(result["reward/score_std"])
    seqs = [data.render(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": a}]) for p, a in
            [("Add 4 and 4.", "8"), ("Which is larger, 12 or 31?", "Sure! The answer is 31. Hope this helps.")]]  # fmt: skip
    with torch.no_grad():
        ours = rewards.score_sequences(model, seqs, tok.pad_token_id, torch.device("cpu"))[:, 0]
        plain = torch.stack([model(torch.tensor([s])).logits[0, 0] for s in seqs])  # transformers alone, no padding
    assert torch.allclose(ours, plain, atol=1e-5)


def test_regression_smoke_saves_attribute_names(demo_base, rm_data, tmp_path):
    from transformers import AutoConfig

    run_script("reward_model.py", "--model-path", str(demo_base), "--data", str(rm_data["attributes"]), "--output-dir", str(tmp_path),
               "--objective", "regression", "--attribute-weights", "correctness=1,verbosity=-0.25", *COMMON)  # fmt: skip
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.num_labels == 3 and config.attribute_names == ["correctness", "verbosity", "politeness"]
    assert config.attribute_weights == [1.0, -0.25, 0.0] and len(config.score_mean) == 3
    result = json.loads((tmp_path / "eval.json").read_text())
    assert {"eval/mae/verbosity", "eval/rmse/politeness", "eval/loss"} <= set(result)


def test_malformed_rows_name_file_row_field(demo_base, tmp_path):
    good = {"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5"}
    path = demo_task.write_jsonl([good] * 45 + [{"prompt": "Add 2 and 2.", "chosen": "4"}], tmp_path / "bad.jsonl")
    proc = run_script("reward_model.py", "--model-path", str(demo_base), "--data", str(path), "--output-dir", str(tmp_path / "o"),
                      *COMMON, check=False)  # fmt: skip
    assert proc.returncode != 0 and f"{path}: row 46, field 'rejected': missing" in proc.stderr


def test_torchrun_two_processes_match_one(demo_base, rm_data, tmp_path):
    args = ["--model-path", str(demo_base), "--data", str(rm_data["pairs"]), *COMMON]
    run_script("reward_model.py", *args, "--output-dir", str(tmp_path / "one"), "--local-micro-batch-size", "16")
    run_script(
        "reward_model.py", *args, "--output-dir", str(tmp_path / "two"), "--local-micro-batch-size", "8", nproc=2
    )
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=1e-6)


def test_missing_or_non_numeric_strength_names_file_row_field(demo_base, tokenizer, tmp_path):
    """Through the script: a row without the (renamed) strength column stops margin_bt; in-process: a non-numeric
    strength fails parsing, a missing one fails tokenize_example, both naming file, row and field."""
    good = {"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5", "pref": 1.0}
    path = demo_task.write_jsonl([good] * 45 + [{k: v for k, v in good.items() if k != "pref"}], tmp_path / "s.jsonl")
    proc = run_script("reward_model.py", "--model-path", str(demo_base), "--data", str(path), "--output-dir",
                      str(tmp_path / "o"), "--loss", "margin_bt", "--strength-column", "pref", *COMMON, check=False)  # fmt: skip
    assert proc.returncode != 0
    assert (
        f"{path}: row 46, field 'pref': missing (--loss margin_bt needs each pair's preference strength" in proc.stderr
    )
    args = rm.Args(loss="scaled_bt")
    parse = functools.partial(data.parse_preference, strength_column=args.strength_column)
    with pytest.raises(data.DataError, match=r"^f: row 3, field 'strength': expected a number, got str$"):
        data.parse_rows([good | {"strength": 1}, good | {"strength": 0.5}, good | {"strength": "high"}], parse, "f")
    record = parse(good, "f", 2)
    with pytest.raises(data.DataError, match=r"^f: row 2, field 'strength': missing \(--loss scaled_bt needs"):
        rm.tokenize_example(tokenizer, record, args, [], "f: row 2")
    assert rm.tokenize_example(tokenizer, parse(good | {"strength": -0.5}, "f", 2), args, [], "f")["weight"] == 0.5


def test_scaled_bt_on_one_output_of_an_attribute_model(demo_base, tokenizer, rm_data, tmp_path):
    """--reward-output picks one output of a 3-output model (its head row kept: --learning-rate 0 leaves it as it
    was), the saved model has that output alone, eval/loss is scaled BT on the held-out pairs, and
    --reward-standardization train stores the mean/std of every training response's score."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from common.models import load_sequence_classifier

    start = load_sequence_classifier(str(demo_base), torch.device("cpu"), 3, init_head=True)
    start.config.attribute_names, start.config.score_mean = ["correctness", "verbosity", "politeness"], [1.0, 2.0, 3.0]
    start.save_pretrained(tmp_path / "attr")
    tokenizer.save_pretrained(tmp_path / "attr")
    out = tmp_path / "bt"
    run_script("reward_model.py", "--model-path", str(tmp_path / "attr"), "--data", str(rm_data["pairs"]),
               "--output-dir", str(out), "--reward-output", "verbosity", "--loss", "scaled_bt",
               "--reward-standardization", "train", "--learning-rate", "0", *COMMON)  # fmt: skip
    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 1 and config.id2label == {0: "verbosity"} and config.loss == "scaled_bt"
    assert getattr(config, "attribute_names", None) is None and config.score_stats_from == "train"
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert torch.equal(model.score.weight, start.score.weight[1:2])
    tok = load_tokenizer(str(out))  # as the script loads it
    rows = demo_task.preference_rows(seed=4, n=300)
    seqs = {}
    for part, rows_ in (("train", rows[:-32]), ("eval", rows[-32:])):
        pairs = [rm.tokenize_example(tok, data.parse_preference(r, "f", 1), rm.Args(), [], "f") for r in rows_]
        with torch.no_grad():
            scores = rewards.score_sequences(model, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                                             tok.pad_token_id, torch.device("cpu"))[:, 0]  # fmt: skip
        seqs[part] = scores
    assert config.score_mean == pytest.approx(seqs["train"].mean().item(), abs=1e-4)
    assert config.score_std == pytest.approx(seqs["train"].std().item(), abs=1e-4)
    rc, rr = seqs["eval"].chunk(2)
    strength = torch.tensor([r["strength"] for r in rows[-32:]])
    expected = (strength * -torch.nn.functional.logsigmoid(rc - rr)).mean().item()
    assert json.loads((out / "eval.json").read_text())["eval/loss"] == pytest.approx(expected, abs=1e-4)
