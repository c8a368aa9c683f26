"""steerlm.py: the attribute string, loss masking, clamping, rule and model labelling, Spearman by hand, bad data,
generation that follows the requested attributes, an `all` smoke run, torchrun parity; SteerLM 2.0's weights and
baseline by hand, its zero gradient at w' = b', and resume across iterations."""

from __future__ import annotations

import json
import math
import re
import signal
import sys

import pytest
import torch

import steerlm
from common import data, demo_task, rewards
from common.dist import init_distributed
from conftest import run_script

ORDER = list(demo_task.ATTRIBUTES)
ADD_PATTERN = re.compile(r"^(What is \d+ \+ \d+\?|Compute \d+ \+ \d+\.|Add \d+ and \d+\.)$")

# The `all` smoke run: the demo base model from scratch on addition only (one task is enough to learn the styles
# in a few hundred small steps). The torchrun test repeats its first steps, which lie inside the warmup, so the
# learning rate does not depend on the number of steps.
ALL_STEPS, WARMUP = 240, 20
TRAIN_FLAGS = ["--local-micro-batch-size", "16", "--learning-rate", "3e-3", "--warmup-steps", str(WARMUP),
               "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--eval-size", "32"]  # fmt: skip


@pytest.fixture(scope="module")
def add_rows(tmp_path_factory):
    """~1000 SFT rows of the addition task (answers partly wrong, styles uniform), as a user's jsonl file."""
    rows = [r for r in demo_task.sft_rows(seed=7, n=4000) if ADD_PATTERN.match(r["prompt"])]
    return demo_task.write_jsonl(rows, tmp_path_factory.mktemp("steer_data") / "add.jsonl")


@pytest.fixture(scope="module")
def steer_run(demo_base, add_rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("steerlm")
    proc = run_script("steerlm.py", "all", "--model-path", str(demo_base), "--data", str(add_rows),
                      "--output-dir", str(out), "--total-steps", str(ALL_STEPS), *TRAIN_FLAGS,
                      "--demo-eval-prompts", "8", "--steer-prompts", "4", "--max-new-tokens", "56")  # fmt: skip
    return out, proc.stdout


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(out) -> list[float]:
    """The logged train/loss series; never empty (two empty logs would compare equal)."""
    found = [
        json.loads(line)["train/loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert found, f"no train/loss logged in {out / 'metrics.jsonl'}"
    return found


# ---------------------------------------------------------------------------------------------------------------
# The attribute string
# ---------------------------------------------------------------------------------------------------------------


def test_attribute_string_round_trip():
    values = {"politeness": 3, "correctness": 4.0, "verbosity": 1}
    text = steerlm.format_attributes(values, ORDER)
    assert text == "correctness:4,verbosity:1,politeness:3"  # the fixed order, not the dict's
    assert steerlm.parse_attributes_string(text) == {"correctness": 4, "verbosity": 1, "politeness": 3}
    assert steerlm.parse_attributes_string("verbosity=0, politeness = 4") == {"verbosity": 0, "politeness": 4}
    # a missing attribute (None, or absent) is left out, never written as 0
    assert steerlm.format_attributes({"correctness": None, "politeness": 2}, ORDER) == "politeness:2"
    assert steerlm.format_attributes({"verbosity": 2.6}, ORDER) == "verbosity:3"
    with pytest.raises(
        KeyError,
        match=re.escape("attribute 'helpfulness' is not in the attribute order (correctness,verbosity,politeness)"),
    ):
        steerlm.format_attributes({"helpfulness": 3}, ORDER)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "attribute string is empty"),
        ("verbosity", "attribute string 'verbosity': item 'verbosity' is not name:value"),
        ("correctness:4,:2", "attribute string 'correctness:4,:2': item ':2' has no name"),
        ("verbosity:high", "attribute string 'verbosity:high': value 'high' of 'verbosity' is not an integer"),
        ("verbosity:1.5", "attribute string 'verbosity:1.5': value '1.5' of 'verbosity' is not an integer"),
        ("verbosity:1,verbosity:2", "attribute string 'verbosity:1,verbosity:2': 'verbosity' is given twice"),
    ],
)
def test_malformed_attribute_strings(text, message):
    with pytest.raises(ValueError) as e:
        steerlm.parse_attributes_string(text)
    assert str(e.value) == message


def test_labels_cover_the_response_not_the_attribute_string(tokenizer):
    record = {
        "messages": [
            {"role": "user", "content": "Add 4 and 4."},
            {"role": "assistant", "content": "Sure! The answer is 8."},
        ],
        "attributes": {"correctness": 4, "verbosity": 1, "politeness": 1},
    }
    assert steerlm.conditioning_mode(tokenizer) == "template"
    ex = steerlm.tokenize_example(tokenizer, record, ORDER, "template", 128, "x")
    text = tokenizer.decode(ex["input_ids"])
    header = "<|assistant|>[correctness:4,verbosity:1,politeness:1]\n"
    assert text == "<|bos|><|user|>\nAdd 4 and 4.<|end|>\n" + header + "Sure! The answer is 8.<|end|>\n"
    labelled = tokenizer.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != data.IGNORE_INDEX])
    assert labelled == "Sure! The answer is 8.<|end|>\n"
    # the generation prompt asks for the same header the training example had
    request = steerlm.request_ids(
        tokenizer, record["messages"][:1], "correctness:4,verbosity:1,politeness:1", "template"
    )
    assert ex["input_ids"][: len(request)] == request and ex["labels"][len(request)] != data.IGNORE_INDEX


def test_steer2_request_prompt_truncation_left_keeps_the_last_turns_of_both_prompts(tokenizer):
    """SteerLM 2.0 requests: over --max-prompt-len, "left" drops whole leading exchanges from the request and the
    plain prompt alike (the same turns), "error" names the field; within the limit both render the whole prompt."""
    turns = [{"role": "user", "content": "Add 1 and 2. " * 6}, {"role": "assistant", "content": "3"},
             {"role": "user", "content": "Add 4 and 4."}, {"role": "assistant", "content": "8"}]  # fmt: skip
    record = {"messages": turns, "attributes": {"correctness": 4, "verbosity": 1, "politeness": 0}, "row": 3}
    request = "correctness:4,verbosity:1,politeness:0"
    whole = steerlm.request_ids(tokenizer, turns[:3], request, "template")
    last = steerlm.request_ids(tokenizer, turns[2:3], request, "template")
    assert len(last) < len(whole)
    fits = steerlm.steer2_request(tokenizer, record, ORDER, "template", len(whole), "error", "f: row 3")
    assert fits["ids"] == whole and fits["prompt"] == turns[:3]
    assert fits["plain_ids"] == data.render(tokenizer, turns[:3], add_generation_prompt=True)
    assert fits["values"] == [4.0, 1.0, 0.0] and fits["request"] == request
    cut = steerlm.steer2_request(tokenizer, record, ORDER, "template", len(last), "left", "f: row 3")
    assert cut["prompt"] == turns[2:3] and cut["ids"] == last
    assert cut["plain_ids"] == data.render(tokenizer, turns[2:3], add_generation_prompt=True)
    tokens = steerlm.steer2_request(tokenizer, record, ORDER, "template", len(last) - 2, "left", "f: row 3")
    assert tokens["ids"] == last[2:]  # the last turn alone is too long: cut from the left, the header stays
    with pytest.raises(
        data.DataError, match=r"^f: row 3, field 'messages': prompt is \d+ tokens, over --max-prompt-len"
    ):
        steerlm.steer2_request(tokenizer, record, ORDER, "template", len(last), "error", "f: row 3")


def test_template_without_attributes_falls_back_to_a_system_message(tokenizer):
    plain = tokenizer.chat_template.replace(
        "{% if message['role'] == 'assistant' and message.get('attributes') %}[{{ message['attributes'] }}]{% endif %}",
        "",
    ).replace("{% if attributes %}[{{ attributes }}]{% endif %}", "")
    assert plain != tokenizer.chat_template
    original = tokenizer.chat_template
    tokenizer.chat_template = plain
    try:
        assert steerlm.conditioning_mode(tokenizer) == "system"
        record = {"messages": [{"role": "user", "content": "Add 4 and 4."}, {"role": "assistant", "content": "8"}],
                  "attributes": {"verbosity": 0}}  # fmt: skip
        ex = steerlm.tokenize_example(tokenizer, record, ORDER, "system", 128, "x")
        assert tokenizer.decode(ex["input_ids"]).startswith(
            "<|bos|><|system|>\nAttributes: verbosity:0<|end|>\n<|user|>"
        )
        assert tokenizer.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != -100]) == "8<|end|>\n"
        request = tokenizer.decode(steerlm.request_ids(tokenizer, record["messages"][:1], "verbosity:0", "system"))
        assert (
            request
            == "<|bos|><|system|>\nAttributes: verbosity:0<|end|>\n<|user|>\nAdd 4 and 4.<|end|>\n<|assistant|>\n"
        )
    finally:
        tokenizer.chat_template = original


# ---------------------------------------------------------------------------------------------------------------
# Labelling
# ---------------------------------------------------------------------------------------------------------------


def test_clamp_round():
    """Round half to even, then clamp to [0, 4]: -0.7 -> -1 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 2.51 -> 3, 4.4 -> 4,
    9 -> 4."""
    pred = torch.tensor([[-0.7, 0.49, 0.5, 1.5], [2.5, 2.51, 4.4, 9.0]])
    out = steerlm.clamp_round(pred)
    assert out.dtype == torch.long and out.tolist() == [[0, 0, 0, 2], [2, 3, 4, 4]]


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("Add 4 and 4.", "Sure! The answer is 8.", {"correctness": 4, "verbosity": 1, "politeness": 1}),
        ("Add 4 and 4.", "9", {"correctness": 0, "verbosity": 0, "politeness": 0}),
        ("Which is larger, 12 or 31?",
         ("Sure! Happy to help. Let me work this out. Of 12 and 31, the larger is 31. "
          "The answer is 31. Hope this helps."),
         {"correctness": 4, "verbosity": 3, "politeness": 3}),
    ],
)  # fmt: skip
def test_demo_rules_on_known_examples(prompt, response, expected):
    assert steerlm.demo_rules(prompt, response) == expected


def test_plugin_rules_from_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_rules.py").write_text(
        "def score(prompt, response):\n    return {'verbosity': len(response.split()) / 2, 'politeness': 0}\n"
        "def broken(prompt, response):\n    return {'verbosity': 'high'}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_rules", raising=False)
    fn = steerlm.load_rules("my_rules:score")
    assert steerlm.rule_labels(fn, "Add 4 and 4.", "The answer is 8.", "f: row 1") == {"verbosity": 2, "politeness": 0}
    assert steerlm.load_rules(f"{tmp_path / 'my_rules.py'}:score")("p", "a b c") == {"verbosity": 1.5, "politeness": 0}
    assert steerlm.load_rules("demo") is steerlm.demo_rules
    with pytest.raises(TypeError, match=re.escape("--rules 'my_rules:nothing': my_rules has no function 'nothing'")):
        steerlm.load_rules("my_rules:nothing")
    with pytest.raises(ValueError, match="expected 'module.path:function' or 'file.py:function'"):
        steerlm.load_rules("my_rules")
    with pytest.raises(
        data.DataError,
        match=re.escape("f: row 7: the rule function returned 'verbosity': 'high', expected a finite number"),
    ):
        steerlm.rule_labels(steerlm.load_rules("my_rules:broken"), "p", "r", "f: row 7")
    with pytest.raises(
        data.DataError, match=re.escape("f: row 3: the rule function raised ValueError: not a demo-task")
    ):
        steerlm.rule_labels(steerlm.demo_rules, "Tell me a joke.", "No.", "f: row 3")


def test_label_stage_with_rules_and_with_an_attribute_model(demo_base, tmp_path):
    """Rules on the demo rows give the demo rules' values. An attribute model whose head is fitted (least
    squares on the pooled hidden states) to predict values from -2.2 to 6.2 is written clamped and rounded,
    row for row, through padded batches of 5."""
    from transformers import AutoTokenizer

    from common.models import load_sequence_classifier

    rows = demo_task.sft_rows(seed=11, n=24)
    source = demo_task.write_jsonl(rows, tmp_path / "sft.jsonl")
    dist = init_distributed()
    args = steerlm.LabelArgs(data=str(source), output_file=str(tmp_path / "rules.jsonl"))
    steerlm.label_stage(args, dist, args.output_file)
    labelled = read_jsonl(tmp_path / "rules.jsonl")
    assert [r["attributes"] for r in labelled] == [steerlm.demo_rules(r["prompt"], r["completion"]) for r in rows]
    assert labelled[0]["messages"] == [
        {"role": "user", "content": rows[0]["prompt"]},
        {"role": "assistant", "content": rows[0]["completion"]},
    ]

    names = ["helpfulness", "verbosity", "coherence"]
    tok = AutoTokenizer.from_pretrained(demo_base)
    model = load_sequence_classifier(str(demo_base), torch.device("cpu"), 3, pad_token_id=tok.pad_token_id).eval()
    seqs = [rewards.conversation_reward_tokens(tok, r["messages"]) for r in labelled]
    targets = torch.linspace(-2.2, 6.2, 24)[:, None] + torch.tensor([0.0, 0.13, 0.27])  # (24, 3)
    with torch.no_grad():
        hidden = torch.stack([model.model(torch.tensor([s])).last_hidden_state[0, -1] for s in seqs])  # (24, H)
        model.score.weight.copy_(torch.linalg.lstsq(hidden, targets).solution.T)
        raw = torch.cat([rewards.score_sequences(model, [s], tok.pad_token_id, torch.device("cpu")) for s in seqs])
    assert torch.allclose(raw, targets, atol=1e-3)
    model.config.attribute_names = names
    model.save_pretrained(tmp_path / "attr_model")
    tok.save_pretrained(tmp_path / "attr_model")
    args = steerlm.LabelArgs(
        data=str(source),
        output_file=str(tmp_path / "model.jsonl"),
        label_model=str(tmp_path / "attr_model"),
        label_batch_size=5,
    )
    steerlm.label_stage(args, dist, args.output_file)
    got = [r["attributes"] for r in read_jsonl(tmp_path / "model.jsonl")]
    assert got == [dict(zip(names, row)) for row in steerlm.clamp_round(targets).tolist()]
    assert got[0] == {"helpfulness": 0, "verbosity": 0, "coherence": 0} and got[-1] == {
        "helpfulness": 4,
        "verbosity": 4,
        "coherence": 4,
    }
    assert got[10] == {"helpfulness": 1, "verbosity": 2, "coherence": 2}  # -2.2 + 10 * 8.4 / 23 = 1.45, 1.58, 1.72


def test_label_stage_bad_row_names_file_row_and_field(tmp_path):
    path = demo_task.write_jsonl(
        [{"prompt": "Add 1 and 2.", "completion": "3"}] * 5 + [{"prompt": "Add 1 and 2."}], tmp_path / "bad.jsonl"
    )
    args = steerlm.LabelArgs(data=str(path), output_file=str(tmp_path / "out.jsonl"))
    with pytest.raises(data.DataError, match=re.escape(f"{path}: row 6, field 'completion': missing")):
        steerlm.label_stage(args, init_distributed(), args.output_file)
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# Training data and metrics
# ---------------------------------------------------------------------------------------------------------------


def test_spearman_by_hand():
    """x = [1, 2, 3, 4, 5], y = [5, 6, 7, 8, 7]: y's ranks are [1, 2, 3.5, 5, 3.5] (the two 7s share 3.5).
    Centred: x [-2, -1, 0, 1, 2], y [-2, -1, 0.5, 2, 0.5]; cov = 4 + 1 + 0 + 2 + 1 = 8; |x|^2 = 10,
    |y|^2 = 4 + 1 + 0.25 + 4 + 0.25 = 9.5; rho = 8 / sqrt(95) = 0.8207827."""
    assert steerlm.average_ranks([5, 6, 7, 8, 7]) == [1, 2, 3.5, 5, 3.5]
    assert steerlm.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207827, abs=1e-7)
    assert steerlm.spearman([0, 1, 2], [9, 4, 1]) == pytest.approx(-1.0)
    assert steerlm.spearman([0, 1, 2], [3, 3, 3]) != steerlm.spearman([0, 1, 2], [3, 3, 3])  # NaN: undefined


def test_malformed_attribute_data_names_file_row_and_field(demo_base, tmp_path):
    good = {"prompt": "Add 1 and 2.", "completion": "3", "attributes": {"correctness": 4, "verbosity": 0}}
    bad_type = good | {"attributes": {"correctness": 4, "verbosity": "low"}}
    path = demo_task.write_jsonl([good] * 40 + [bad_type] + [good] * 40, tmp_path / "bad.jsonl")
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        args = steerlm.TrainArgs(model_path=str(demo_base), data=str(path), output_dir=str(tmp_path / "o"), eval_size=8)
        with pytest.raises(
            data.DataError, match=re.escape(f"{path}: row 41, field 'attributes.verbosity': expected a number, got str")
        ):
            steerlm.train_stage(args, init_distributed())
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
    # an attribute the model is not conditioned on is an error too, not silently dropped
    record = data.parse_attributes(good | {"attributes": {"helpfulness": 3}}, str(path), 5)
    with pytest.raises(
        data.DataError,
        match=re.escape(f"{path}: row 5, field 'attributes.helpfulness': attribute 'helpfulness' is not in"),
    ):
        steerlm.tokenize_example(None, record, ORDER, "template", 128, f"{path}: row 5")


# ---------------------------------------------------------------------------------------------------------------
# Script runs
# ---------------------------------------------------------------------------------------------------------------


def test_all_smoke_run_labels_trains_evaluates_and_exports(steer_run):
    from transformers import AutoConfig, AutoModelForCausalLM

    out, stdout = steer_run
    labelled = read_jsonl(out / "labelled.jsonl")
    assert labelled[0]["attributes"].keys() == {"correctness", "verbosity", "politeness"}
    assert "conditioning=template" in stdout and "steer verbosity: spearman" in stdout
    result = json.loads((out / "eval.json").read_text())
    for key in ("eval/loss", "eval/accuracy", "eval/score", "initial/eval/accuracy", "contrast/eval/accuracy",
                "steer/verbosity/spearman", "steer/verbosity/exact_match", "steer/politeness/spearman",
                "steer/politeness/exact_match", "steer/verbosity/accuracy_at_0"):  # fmt: skip
        assert key in result, key
    assert len(losses(out)) == ALL_STEPS and losses(out)[-1] < losses(out)[0] - 1.0
    config = AutoConfig.from_pretrained(out)
    assert config.steerlm_attributes == ORDER and config.steerlm_conditioning == "template"
    AutoModelForCausalLM.from_pretrained(out)


def test_generation_honours_requested_attributes(steer_run, tmp_path):
    """On held-out addition prompts, the trained model's verbosity and politeness follow the request: verbosity 0
    gives shorter answers than 4, and politeness 4 more polite markers than 0 (graded by demo_task)."""
    out, _ = steer_run
    prompts = [p for p in demo_task.eval_prompts(256) if ADD_PATTERN.match(p)][:12]
    requests = [
        {"prompt": p, "attributes": {"verbosity": v, "politeness": k}}
        for v, k in [(0, 2), (4, 2), (2, 0), (2, 4)]
        for p in prompts
    ]
    path = demo_task.write_jsonl(requests, tmp_path / "prompts.jsonl")
    args = steerlm.GenerateArgs(
        model_path=str(out),
        prompts_file=str(path),
        output_file=str(tmp_path / "r.jsonl"),
        attributes="correctness=4",
        max_new_tokens=56,
    )
    rows = steerlm.generate_stage(args, init_distributed())
    assert rows[0]["attributes"] == "correctness:4,verbosity:0,politeness:2"
    graded = [demo_task.grade(r["prompt"], r["response"]) for r in rows]
    n = len(prompts)
    verbosity = [sum(g["verbosity"] for g in graded[i * n : (i + 1) * n]) / n for i in range(4)]
    politeness = [sum(g["politeness"] for g in graded[i * n : (i + 1) * n]) / n for i in range(4)]
    words = [sum(len(r["response"].split()) for r in rows[i * n : (i + 1) * n]) / n for i in range(2)]
    assert verbosity[0] < 1.0 and verbosity[1] > 2.5, verbosity  # the small model may write level 3 for 4
    assert words[0] < words[1] / 2, words
    assert politeness[2] < 1.0 and politeness[3] > 2.5, politeness


def test_generate_bad_request_rows_name_file_row_and_field(steer_run, tmp_path):
    out, _ = steer_run
    cases = [("verbosity:x", "attribute string 'verbosity:x': value 'x' of 'verbosity' is not an integer"),
             ({"helpfulness": 2}, "attribute 'helpfulness' is not in the attribute order"),
             ({"verbosity": "low"}, "'verbosity' is not a number (str)")]  # fmt: skip
    for attributes, message in cases:
        rows = [{"prompt": "Add 4 and 4."}, {"prompt": "Add 1 and 2.", "attributes": attributes}]
        path = demo_task.write_jsonl(rows, tmp_path / "bad.jsonl")
        with pytest.raises(data.DataError, match=re.escape(f"{path}: row 2, field 'attributes': {message}")):
            steerlm.generate_stage(
                steerlm.GenerateArgs(model_path=str(out), prompts_file=str(path)), init_distributed()
            )


def test_torchrun_two_processes_match_one(steer_run, demo_base, tmp_path):
    """2 ranks x micro 8 = the global batch of 16 of the `all` run, same data order and warmup: same losses."""
    out, _ = steer_run
    run_script("steerlm.py", "train", "--model-path", str(demo_base), "--data", str(out / "labelled.jsonl"),
               "--output-dir", str(tmp_path), *TRAIN_FLAGS, "--local-micro-batch-size", "8", "--total-steps", "4",
               "--demo-eval-prompts", "0", "--steer-prompts", "0", nproc=2)  # fmt: skip
    assert losses(tmp_path) == pytest.approx(losses(out)[:4], rel=1e-5, abs=1e-6)
    assert json.loads((tmp_path / "trainer_state" / "COMPLETE").read_text()) == {"world_size": 2, "step": 4}


def test_help_documents_every_flag(capsys):
    import tyro

    for name, cls in [
        ("all", steerlm.AllArgs),
        ("label", steerlm.LabelArgs),
        ("train", steerlm.TrainArgs),
        ("generate", steerlm.GenerateArgs),
        ("steer2", steerlm.Steer2Args),
    ]:
        with pytest.raises(SystemExit):
            tyro.cli(steerlm.Command, args=[name, "--help"], default=steerlm.AllArgs())
        text = capsys.readouterr().out
        for field in cls.__dataclass_fields__:
            assert "--" + field.replace("_", "-") in text, (name, field)
        if name == "generate":
            assert "requested values, `name=value,...`" in text  # the field docstrings are the help text
    assert "noise model of the attribute model" in text


# ---------------------------------------------------------------------------------------------------------------
# SteerLM 2.0
# ---------------------------------------------------------------------------------------------------------------

# sigma^2 = 1 / (2 ln 2) makes the discretised Gaussian's terms powers of two: exp(-d^2 / (2 sigma^2)) = 2^(-d^2)
SIGMA_POW2 = (1 / (2 * math.log(2))) ** 0.5


def test_steer2_weights_and_baseline_by_hand():
    """2 prompts x 3 responses, attributes (verbosity, politeness), sigma^2 = 1 / (2 ln 2): P(a_k = v) = 2^-(v - pred)^2
    / Z(pred) over v = 0..4, with Z(2) = 1/16 + 1/2 + 1 + 1/2 + 1/16 = 17/8, Z(1) = Z(3) = 1057/512,
    Z(0) = Z(4) = 102529/65536.

    Prompt 1 asks verbosity:2 (politeness not asked: no term). Predicted verbosity 2, 1, 0 ->
    P(a) = 1 / Z(2) = 8/17, (1/2) / Z(1) = 256/1057, (1/16) / Z(0) = 4096/102529. log P(y|x) - log Q'(y|a,x) =
    0, ln 2, ln 4, so w' ~ (8/17, 512/1057, 16384/102529).
    Prompt 2 asks verbosity:0, politeness:4. Predictions (0, 4), (0, 4), (4, 0) -> P(a) = (65536/102529)^2 twice,
    then (1/102529)^2; P(y|x) = Q'(y|a,x) -> w' = (65536^2, 65536^2, 1) / (2 * 65536^2 + 1).
    Baseline: log Q_theta - log Q' = (0, ln 2, ln 2) -> b' = (1/5, 2/5, 2/5); (ln 3, 0, 0) -> b' = (3/5, 1/5, 1/5).
    """
    nan = float("nan")
    pred = torch.tensor([[2.0, 3.7], [1.0, 0.2], [0.0, 4.0], [0.0, 4.0], [0.0, 4.0], [4.0, 0.0]])
    requested = torch.tensor([[2.0, nan]] * 3 + [[0.0, 4.0]] * 3)
    log_attr = steerlm.attribute_logprob(pred, requested, SIGMA_POW2)
    p2 = 65536 / 102529
    expected_attr = [8 / 17, 256 / 1057, 4096 / 102529, p2 * p2, p2 * p2, (1 / 102529) ** 2]
    assert log_attr.tolist() == pytest.approx([math.log(p) for p in expected_attr], rel=1e-12)

    log_q_prime = torch.tensor([[-5.0, -4.0, -3.0], [-2.0, -6.0, -1.0]], dtype=torch.float64)
    log_p = log_q_prime + torch.tensor([[0.0, math.log(2), math.log(4)], [0.0, 0.0, 0.0]], dtype=torch.float64)
    w = steerlm.importance_weights(log_attr.view(2, 3), log_p, log_q_prime)
    c1 = [8 / 17, 512 / 1057, 16384 / 102529]
    big = 65536**2
    expected_w = [[c / sum(c1) for c in c1], [big / (2 * big + 1), big / (2 * big + 1), 1 / (2 * big + 1)]]
    assert w.tolist()[0] == pytest.approx(expected_w[0], rel=1e-12)
    assert w.tolist()[1] == pytest.approx(expected_w[1], rel=1e-12)

    log_q_theta = log_q_prime + torch.tensor(
        [[0.0, math.log(2), math.log(2)], [math.log(3), 0.0, 0.0]], dtype=torch.float64
    )
    b = steerlm.baseline_weights(log_q_theta, log_q_prime)
    expected_b = [[0.2, 0.4, 0.4], [0.6, 0.2, 0.2]]
    assert b.tolist()[0] == pytest.approx(expected_b[0], rel=1e-12)
    assert b.tolist()[1] == pytest.approx(expected_b[1], rel=1e-12)
    kl = [sum(wi * math.log(wi / bi) for wi, bi in zip(wg, bg)) for wg, bg in zip(expected_w, expected_b)]
    assert steerlm.weights_kl(w, b).tolist() == pytest.approx(kl, rel=1e-9)
    assert steerlm.weights_kl(b, b).tolist() == pytest.approx([0.0, 0.0], abs=1e-15)

    # the weighted NLL: coef (w' - b') 0.5 and -0.5, NLL 1 + 2 = 3 and 1 (pad masked), group mean length 2:
    # 0.5 * 3 / 2 - 0.5 * 1 / 2 = 0.5
    logprobs = torch.tensor([[-1.0, -2.0, -7.0], [-1.0, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = steerlm.steer2_loss(logprobs, mask, torch.tensor([0.5, -0.5]), torch.tensor([2.0, 2.0]))
    assert loss.item() == pytest.approx(0.5)


def test_steer2_gradient_is_zero_when_w_equals_b(demo_base):
    """w' = b' makes the loss's gradient exactly 0 (the model is already the target on these samples); w' != b' does
    not (so the first check is not vacuous)."""
    from common.generation import response_logprobs
    from common.models import load_causal_lm

    model = load_causal_lm(str(demo_base), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    queries = torch.randint(5, 200, (6, 5), generator=g)
    responses = torch.randint(5, 200, (6, 7), generator=g)
    mask = torch.ones(6, 7)
    mask[1, 4:] = 0
    logprobs = response_logprobs(model, queries, responses, pad_id=0, temperature=1.0)
    log_q = (logprobs.detach() * mask).sum(-1).view(2, 3)
    b = steerlm.baseline_weights(log_q, log_q + torch.tensor([[0.3, -1.0, 2.0], [0.0, 0.5, -0.5]]))
    norm = mask.sum(-1).view(2, 3).mean(-1, keepdim=True).expand(-1, 3).reshape(-1)
    for w, zero in ((b.clone(), True), (torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]), False)):
        model.zero_grad(set_to_none=True)
        steerlm.steer2_loss(logprobs, mask, (w - b).reshape(-1), norm).backward(retain_graph=True)
        grads = [p.grad.abs().max().item() for p in model.parameters() if p.grad is not None]
        assert grads, "no gradient reached the model"
        assert (max(grads) == 0.0) == zero, max(grads)


def test_steer2_resume_across_iterations_and_two_processes(demo_base, tmp_path):
    """Two iterations straight equal one iteration, then --resume to two: the same steps logged (loss, KL) and the
    same weights. Two processes (torchrun) log the same steps too: each rank samples its share of every minibatch,
    keyed by position. Q' and P(y|x) are both the demo base model; the requests are demo rows labelled by rule."""
    import tyro
    from safetensors.torch import load_file

    rows = [r | {"attributes": steerlm.demo_rules(r["prompt"], r["completion"])}
            for r in demo_task.sft_rows(seed=5, n=40)]  # fmt: skip
    path = demo_task.write_jsonl(rows, tmp_path / "requests.jsonl")
    flags = ["--model-path", str(demo_base), "--sft-model-path", str(demo_base), "--data", str(path),
             "--prompts-per-iteration", "8", "--num-samples", "3", "--num-minibatches", "2",
             "--epochs-per-iteration", "2", "--max-new-tokens", "12", "--learning-rate", "1e-3",
             "--demo-eval-prompts", "0", "--steer-prompts", "0"]  # fmt: skip
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def run(out, iterations, resume=False):
        more = ["--output-dir", str(out), "--iterations", str(iterations)] + (["--resume"] if resume else [])
        try:
            return steerlm.steer2_stage(tyro.cli(steerlm.Steer2Args, args=flags + more), init_distributed())
        finally:
            signal.signal(signal.SIGINT, saved[0])
            signal.signal(signal.SIGTERM, saved[1])

    def logged(out) -> list[float]:
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        found = [(x["step"], x["steer2/loss"], x["steer2/kl"]) for x in lines if "steer2/loss" in x]
        assert [step for step, _, _ in found] == list(range(1, 9)), found
        return [v for row in found for v in row]

    run(tmp_path / "straight", 2)
    run(tmp_path / "resumed", 1)
    assert json.loads((tmp_path / "resumed" / "trainer_state" / "COMPLETE").read_text())["step"] == 1
    run(tmp_path / "resumed", 2, resume=True)
    straight = logged(tmp_path / "straight")
    assert logged(tmp_path / "resumed") == pytest.approx(straight, rel=1e-5, abs=1e-7)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    start = load_file(demo_base / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in start) > 1e-4  # training moved the weights

    run_script("steerlm.py", "steer2", *flags, "--output-dir", str(tmp_path / "two"), "--iterations", "2", nproc=2)
    assert logged(tmp_path / "two") == pytest.approx(straight, rel=1e-4, abs=1e-6)


def test_steer2_bad_request_names_file_row_and_field(demo_base, tmp_path):
    good = {"prompt": "Add 1 and 2.", "completion": "3", "attributes": {"correctness": 4, "verbosity": 0}}
    path = demo_task.write_jsonl([good] * 3 + [good | {"attributes": {"verbosity": 7}}], tmp_path / "bad.jsonl")
    args = steerlm.Steer2Args(model_path=str(demo_base), sft_model_path=str(demo_base), data=str(path),
                              output_dir=str(tmp_path / "o"))  # fmt: skip
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(
            data.DataError, match=re.escape(f"{path}: row 4, field 'attributes.verbosity': 7.0 is outside 0..4")
        ):
            steerlm.steer2_stage(args, init_distributed())
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
