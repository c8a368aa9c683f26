"""Data contracts: every accepted form, every malformed case with its exact error, masking, collation, packing."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import torch

from common import data
from common.data import IGNORE_INDEX, DataError


def write(tmp_path, name: str, rows: list, raw: str | None = None):
    path = tmp_path / name
    if raw is not None:
        path.write_text(raw)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".csv"):
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif name.endswith(".parquet"):
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


# --- reading --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_load_rows_every_file_format(tmp_path, ext):
    rows = [{"prompt": "What is 1 + 2?", "completion": "3"}, {"prompt": "Add 2 and 2.", "completion": "4"}]
    path = write(tmp_path, f"d.{ext}", rows)
    assert data.load_rows(str(path)) == rows


def test_load_rows_names_the_unparseable_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", [], raw='{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: unparseable JSON line"):
        data.load_rows(str(path))


def test_load_rows_rejects_non_object_line(tmp_path):
    path = write(tmp_path, "list.jsonl", [], raw='{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list.jsonl: row 2: expected a JSON object, got list"):
        data.load_rows(str(path))


def test_load_rows_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        data.load_rows(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv"])
def test_gzipped_files_read_like_their_plain_forms(tmp_path, ext):
    """`d.jsonl.gz` is read as jsonl, not taken for a hub name; a gzipped CSV keeps its cells as text ("3")."""
    rows = [{"prompt": "What is 1 + 2?", "completion": "3"}, {"prompt": "Add 2 and 2.", "completion": "4"}]
    plain = write(tmp_path, f"d.{ext}", rows)
    packed = tmp_path / f"d.{ext}.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert data.load_rows(str(packed)) == rows


def test_gzipped_jsonl_names_the_line(tmp_path):
    """Line numbers are read through gzip: past a blank line, the bad row is line 4; an unparseable line is named;
    a file that is not gzip, or is cut short, is an error naming it."""
    path = tmp_path / "blank.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join([GOOD, "", GOOD, BAD]) + "\n").encode()))
    rows = data.load_rows(str(path))
    assert rows.line_numbers == [1, 3, 4]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: row 4, field 'completion': missing$"):
        data.parse_rows(rows, data.parse_sft, str(path))
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n'))
    with pytest.raises(DataError, match=r"bad.jsonl.gz: row 2: unparseable JSON line"):
        data.load_rows(str(bad))
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text(GOOD + "\n")
    with pytest.raises(DataError, match=r"fake.jsonl.gz: not a readable gzip file"):
        data.load_rows(str(fake))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(("\n".join([GOOD] * 50) + "\n").encode())[:-12])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: not a readable gzip file"):
        data.load_rows(str(cut))


# --- row numbers: the line of a jsonl file, also past blank lines (which datasets skips) and in a held-out tail ---

GOOD = json.dumps({"prompt": "Add 2 and 2.", "completion": "4"})
BAD = json.dumps({"prompt": "Add 2 and 2."})  # no completion


def test_blank_lines_do_not_shift_row_numbers(tmp_path):
    """Lines: 1 good, 2 blank, 3 spaces only, 4 good, 5 bad. The bad row is the 3rd row datasets returns, but
    line 5 of the file, and the error must say 5."""
    path = write(tmp_path, "blank.jsonl", [], raw="\n".join([GOOD, "", "   ", GOOD, BAD, GOOD]) + "\n")
    rows = data.load_rows(str(path))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: row 5, field 'completion': missing$"):
        data.parse_rows(rows, data.parse_sft, str(path))
    assert len(rows) == 4 and rows.line_numbers == [1, 4, 5, 6]
    parsed = data.parse_rows(rows, data.parse_sft, str(path), skip_bad_rows=True)
    assert [r["row"] for r in parsed.records] == [1, 4, 6] and parsed.errors[0].startswith(f"{path}: row 5,")


def test_held_out_tail_names_the_line_of_the_file(tmp_path):
    """reward_model's --eval-size tail: 6 pairs with a blank line before each of the last 3 (lines 1-3, then 5, 7,
    9); --eval-size 2 holds out lines 7 and 9, and the bad pair on line 9 is reported as row 9 (not 6, not 2)."""
    good = json.dumps({"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5"})
    bad = json.dumps({"prompt": "Add 2 and 2.", "chosen": "4"})
    path = write(tmp_path, "pairs.jsonl", [], raw="\n".join([good, good, good, "", good, "", good, "", bad]) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: row 9, field 'rejected': missing$"):
        data.load_train_eval(str(path), None, 2, data.parse_preference, skip_bad_rows=False)
    train, held_out, source = data.load_train_eval(str(path), None, 2, data.parse_preference, skip_bad_rows=True)
    assert [r["row"] for r in train.records] == [1, 2, 3, 5] and [r["row"] for r in held_out.records] == [7]
    assert source == str(path) and held_out.errors == [f"{path}: row 9, field 'rejected': missing"]
    # a separate --eval-data file numbers its own lines
    train_path = write(tmp_path, "train.jsonl", [], raw="\n".join([good, "", good]) + "\n")
    eval_path = write(tmp_path, "eval.jsonl", [], raw="\n".join(["", good, "", bad]) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(eval_path))}: row 4, field 'rejected': missing$"):
        data.load_train_eval(str(train_path), str(eval_path), 2, data.parse_preference, skip_bad_rows=False)


def test_max_rows_reads_only_the_first_training_rows(tmp_path):
    """--max-rows N (sft.py, distill.py): the first N training rows are parsed and nothing after them, so a bad row
    past them does not stop the run; the held-out tail is unchanged, rows keep their file line numbers, and with a
    separate --eval-data file the limit applies to the training file only."""
    good = json.dumps({"prompt": "Add 2 and 2.", "completion": "4"})
    bad = json.dumps({"prompt": "Add 2 and 2."})
    path = write(tmp_path, "sft.jsonl", [], raw="\n".join([good, "", good, good, bad, good, good, good]) + "\n")
    with pytest.raises(DataError, match="row 5, field 'completion'"):
        data.load_train_eval(str(path), None, 2, data.parse_sft, False)
    train, held_out, _ = data.load_train_eval(str(path), None, 2, data.parse_sft, False, max_rows=3)
    assert [r["row"] for r in train.records] == [1, 3, 4] and [r["row"] for r in held_out.records] == [7, 8]
    train, _, _ = data.load_train_eval(str(path), None, 2, data.parse_sft, True, max_rows=100)  # more than there are
    assert [r["row"] for r in train.records] == [1, 3, 4, 6] and train.skipped == 1
    eval_path = write(tmp_path, "eval.jsonl", [], raw="\n".join([good] * 5) + "\n")
    train, held_out, _ = data.load_train_eval(str(path), str(eval_path), 2, data.parse_sft, False, max_rows=2)
    assert [r["row"] for r in train.records] == [1, 3] and len(held_out.records) == 5
    with pytest.raises(ValueError, match="--max-rows must be >= 0"):
        data.load_train_eval(str(path), None, 2, data.parse_sft, False, max_rows=-1)


def test_script_names_the_line_after_blank_lines(demo_base, tmp_path):
    """Through a script (reward_model.py reads its data before loading a model, so this run is short): blank
    lines before a bad pair in the --eval-size tail; stderr names the file and the line."""
    from conftest import run_script

    good = json.dumps({"prompt": "Add 2 and 2.", "chosen": "4", "rejected": "5"})
    lines = [good] * 20 + [""] * 3 + [good] * 6 + [json.dumps({"prompt": "Add 2 and 2.", "chosen": "4"})] + [good] * 2
    path = write(tmp_path, "pairs.jsonl", [], raw="\n".join(lines) + "\n")  # the bad pair: the 27th, on line 30
    proc = run_script("reward_model.py", "--model-path", str(demo_base), "--data", str(path), "--eval-size", "4",
                      "--output-dir", str(tmp_path / "o"), check=False)  # fmt: skip
    assert proc.returncode != 0 and f"{path}: row 30, field 'rejected': missing" in proc.stderr, proc.stderr[-2000:]
    # one line for the user, no traceback (common.data.exit_on_data_error)
    assert "Traceback" not in proc.stderr and f"error: {path}: row 30, field 'rejected': missing\n" in proc.stderr


# --- SFT ----------------------------------------------------------------------------------------------------------


def test_parse_sft_prompt_completion_and_messages():
    r = data.parse_sft({"prompt": "hi", "completion": "hello"}, "f", 1)
    assert r["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert data.parse_sft({"messages": msgs}, "f", 1)["messages"] == msgs


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "hi"}, "f.jsonl: row 3, field 'completion': missing"),
        ({"prompt": "hi", "completion": ""}, "f.jsonl: row 3, field 'completion': empty"),
        ({"prompt": "hi", "completion": 5}, "f.jsonl: row 3, field 'completion': expected a string, got int"),
        ({"text": "hi"}, "f.jsonl: row 3: expected 'messages', or 'prompt' and 'completion' (found ['text'])"),
        (
            {"messages": []},
            "f.jsonl: row 3, field 'messages': expected a string or a non-empty list of messages, got an empty list",
        ),
        (
            {"messages": [{"role": "user", "content": "u"}]},
            "f.jsonl: row 3, field 'messages': no assistant turn to learn from",
        ),
        (
            {"messages": [{"role": "bot", "content": "u"}]},
            "f.jsonl: row 3, field 'messages[0].role': unknown role 'bot'",
        ),
        (
            {"messages": [{"role": "user"}]},
            "f.jsonl: row 3, field 'messages[0]': expected an object with 'role' and 'content'",
        ),
        (
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": " "}]},
            "f.jsonl: row 3, field 'messages[1].content': empty",
        ),
    ],
)
def test_parse_sft_errors(row, message):
    with pytest.raises(DataError) as e:
        data.parse_sft(row, "f.jsonl", 3)
    assert str(e.value).startswith(message)


def test_parse_rows_skips_and_counts_when_asked():
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": "c", "completion": "d"}]
    with pytest.raises(DataError, match="row 2"):
        data.parse_rows(rows, data.parse_sft, "f", skip_bad_rows=False)
    parsed = data.parse_rows(rows, data.parse_sft, "f", skip_bad_rows=True)
    assert len(parsed.records) == 2 and parsed.skipped == 1 and "row 2, field 'completion'" in parsed.errors[0]


def test_parse_rows_all_bad_is_an_error():
    with pytest.raises(DataError, match="no usable rows"):
        data.parse_rows([{"x": 1}], data.parse_sft, "f", skip_bad_rows=True)


# --- preferences --------------------------------------------------------------------------------------------------


def test_parse_preference_explicit_prompt_string_and_messages():
    r = data.parse_preference({"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2}, "f", 1)
    assert r["prompt"] == [{"role": "user", "content": "q"}] and (r["chosen"], r["rejected"], r["margin"]) == (
        "good",
        "bad",
        2.0,
    )
    prompt = [{"role": "user", "content": "q"}]
    row = {
        "prompt": prompt,
        "chosen": prompt + [{"role": "assistant", "content": "good"}],  # full-conversation form
        "rejected": [{"role": "assistant", "content": "bad"}],  # reply-only form
    }
    r = data.parse_preference(row, "f", 1)
    assert (r["chosen"], r["rejected"], r["margin"], r["chosen_reward"]) == ("good", "bad", None, None)


def test_parse_preference_anthropic_hh_multi_turn():
    """The prompt is everything before the last shared "\\n\\nAssistant:"; earlier turns become messages."""
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 2?\n\nAssistant:"
    row = {"chosen": shared + " It is 4.", "rejected": shared + " It is 5."}
    r = data.parse_preference(row, "hh.jsonl", 1)
    assert r["prompt"] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    assert (r["chosen"], r["rejected"]) == ("It is 4.", "It is 5.")


def test_parse_preference_hh_shared_response_prefix():
    """Responses that start alike must not move the split into the response."""
    shared = "\n\nHuman: Name a colour.\n\nAssistant:"
    r = data.parse_preference({"chosen": shared + " Blue is nice", "rejected": shared + " Blue, or red"}, "f", 1)
    assert (r["chosen"], r["rejected"]) == ("Blue is nice", "Blue, or red")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": "a"}, "f: row 7, field 'rejected': missing"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "f: row 7, field 'rejected': identical to 'chosen'"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "f: row 7, field 'chosen': empty"),
        (
            {"prompt": 3, "chosen": "a", "rejected": "b"},
            "f: row 7, field 'prompt': expected a string or a non-empty list of messages, got int",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"},
            "f: row 7, field 'margin': expected a number, got str",
        ),
        (
            {"chosen": "no turns here", "rejected": "nor here"},
            "f: row 7, field 'chosen': no shared '\\n\\nAssistant:' turn",
        ),
        (
            {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            "f: row 7, field 'chosen': the last message is not an assistant reply (role 'user')",
        ),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"},
            "f: row 7, field 'rejected': identical to 'chosen'",
        ),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"},
            "f: row 7, field 'chosen': empty response",
        ),
    ],
)
def test_parse_preference_errors(row, message):
    with pytest.raises(DataError) as e:
        data.parse_preference(row, "f", 7)
    assert str(e.value).startswith(message)


def test_parse_preference_strength_column(tmp_path):
    """Read from the named column only when asked; absent -> None (reward_model.py names the missing field);
    text (a CSV cell) is parsed; not a number -> a file/row/field error."""
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "strength": -2, "pref": "0.5"}
    assert "strength" not in data.parse_preference(row, "f", 1)  # only reward_model.py's margin/scaled BT ask
    assert data.parse_preference(row, "f", 1, strength_column="strength")["strength"] == -2.0
    assert data.parse_preference(row, "f", 1, strength_column="pref")["strength"] == 0.5
    assert data.parse_preference(row, "f", 1, strength_column="other")["strength"] is None
    for bad, message in [("big", "expected a number, got str"), (True, "expected a number, got bool"),
                         (float("nan"), "not finite")]:  # fmt: skip
        with pytest.raises(DataError, match=rf"^f: row 3, field 'strength': {message}$"):
            data.parse_preference(row | {"strength": bad}, "f", 3, strength_column="strength")


# --- prompts, KTO, attributes -------------------------------------------------------------------------------------


def test_parse_prompt_forms_and_errors():
    assert data.parse_prompt({"prompt": "q"}, "f", 1)["prompt"] == [{"role": "user", "content": "q"}]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "gold"}]
    assert data.parse_prompt({"messages": msgs}, "f", 1)["prompt"] == msgs[:1]  # SFT rows give their prompt
    with pytest.raises(DataError, match=r"^f: row 2, field 'prompt': missing$"):
        data.parse_prompt({"question": "q"}, "f", 2)
    with pytest.raises(DataError, match=r"^f: row 2, field 'prompt': empty$"):
        data.parse_prompt({"prompt": "  "}, "f", 2)


def test_parse_kto():
    r = data.parse_kto({"prompt": "q", "completion": "a", "label": False}, "f", 1)
    assert r["label"] is False and r["completion"] == "a"
    with pytest.raises(DataError, match=r"^f: row 4, field 'label': expected true/false, got int$"):
        data.parse_kto({"prompt": "q", "completion": "a", "label": 1}, "f", 4)
    with pytest.raises(DataError, match=r"^f: row 4, field 'label': missing$"):
        data.parse_kto({"prompt": "q", "completion": "a"}, "f", 4)


def test_parse_attributes_dict_with_missing_value():
    row = {"prompt": "q", "completion": "a", "attributes": {"verbosity": 2, "politeness": None}}
    r = data.parse_attributes(row, "f", 1)
    assert r["attributes"] == {"verbosity": 2.0, "politeness": None}  # None = missing, not 0
    assert r["messages"][-1] == {"role": "assistant", "content": "a"}


def test_parse_attributes_helpsteer_columns():
    row = {
        "prompt": "q",
        "response": "a",
        "helpfulness": 3,
        "correctness": 4,
        "coherence": 4,
        "complexity": 1,
        "verbosity": None,
    }
    r = data.parse_attributes(row, "f", 1)
    assert r["attributes"] == {
        "helpfulness": 3.0,
        "correctness": 4.0,
        "coherence": 4.0,
        "complexity": 1.0,
        "verbosity": None,
    }


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "q", "completion": "a", "attributes": {"verbosity": "high"}},
            "f: row 5, field 'attributes.verbosity': expected a number, got str",
        ),
        ({"prompt": "q", "completion": "a", "attributes": [1, 2]}, "f: row 5, field 'attributes': expected an object"),
        ({"prompt": "q", "completion": "a"}, "f: row 5, field 'attributes': missing"),
        (
            {"prompt": "q", "response": "a", "helpfulness": "x"},
            "f: row 5, field 'helpfulness': expected a number, got str",
        ),
    ],
)
def test_parse_attributes_errors(row, message):
    with pytest.raises(DataError) as e:
        data.parse_attributes(row, "f", 5)
    assert str(e.value).startswith(message)


# --- rendering and masking ----------------------------------------------------------------------------------------


def test_multi_turn_masking_labels_only_assistant_tokens(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Add 4 and 4."},
        {"role": "assistant", "content": "The answer is 8."},
    ]
    ids, labels = data.tokenize_conversation(tokenizer, msgs)
    assert ids == data.render(tokenizer, msgs) and len(labels) == len(ids)
    labelled = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert labels == [lab if lab == IGNORE_INDEX else t for t, lab in zip(ids, labels)]  # labels copy the ids
    # exactly the two replies, each with its end-of-turn token (and the template's newline after it)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.decode(labelled) == "5<|end|>\nThe answer is 8.<|end|>\n"
    assert labelled.count(end) == 2
    # nothing of the system or user turns is labelled
    assert "Be brief" not in tokenizer.decode(labelled) and "What is" not in tokenizer.decode(labelled)


def test_attribute_header_is_not_labelled(tokenizer):
    msgs = [
        {"role": "user", "content": "Add 4 and 4."},
        {"role": "assistant", "content": "8", "attributes": "verbosity:0"},
    ]
    ids, labels = data.tokenize_conversation(tokenizer, msgs)
    assert "[verbosity:0]" in tokenizer.decode(ids)
    assert tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == "8<|end|>\n"


def test_tokenize_sft_truncation_and_no_room(tokenizer):
    record = {
        "messages": [
            {"role": "user", "content": "What is 12 + 13?"},
            {"role": "assistant", "content": "The answer is 25."},
        ]
    }
    full = data.tokenize_sft(tokenizer, record, 128, "c")
    assert not full["truncated"]
    cut = data.tokenize_sft(tokenizer, record, len(full["input_ids"]) - 2, "c")
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][:-2]
    prompt_len = len(data.render(tokenizer, record["messages"][:1], add_generation_prompt=True))
    with pytest.raises(DataError, match=r"^c: no assistant token left within --max-seq-len"):
        data.tokenize_sft(tokenizer, record, prompt_len, "c")


def test_tokenize_pair_and_prompt_too_long(tokenizer):
    record = {"prompt": [{"role": "user", "content": "Add 4 and 4."}], "chosen": "8", "rejected": "The answer is 9."}
    out = data.tokenize_pair(tokenizer, record, 64, 32, "c")
    assert tokenizer.decode(out["chosen_ids"]) == "8<|end|>\n"
    assert out["prompt_ids"] + out["chosen_ids"] == data.render(
        tokenizer, record["prompt"] + [{"role": "assistant", "content": "8"}]
    )
    with pytest.raises(
        DataError,
        match=r"^c, field 'prompt': prompt is \d+ tokens, over --max-prompt-len 3 \(pass --prompt-truncation left",
    ):
        data.tokenize_pair(tokenizer, record, 64, 3, "c")
    n = len(out["prompt_ids"])
    with pytest.raises(DataError, match=r"^c: the prompt \(\d+ tokens\) leaves no room for a response"):
        data.tokenize_pair(tokenizer, record, n, 64, "c")


def test_template_that_is_not_prefix_stable_is_detected(tokenizer):
    """A template that renders earlier turns differently once a later turn exists cannot be masked by prefixes."""
    import copy

    tok = copy.deepcopy(tokenizer)
    # like templates that drop earlier assistant turns' reasoning: old replies render differently
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'assistant' and not loop.last %}[old]{% else %}{{ m['content'] }}{% endif %}|{% endfor %}"
    )
    with pytest.raises(DataError, match="not prefix-stable"):
        data.tokenize_conversation(
            tok,
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "b"},
            ],
        )


GEMMA_STYLE_TEMPLATE = (  # Gemma's structure: no system role, user/model turns that must alternate
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_template_without_a_system_role_masks_right_or_names_the_row(tokenizer):
    """A Gemma-style template: the assistant tokens are labelled exactly (the reply and its end-of-turn), and a row the
    template refuses (a system turn) is a DataError naming the row and the fix, never a traceback or a wrong mask."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_STYLE_TEMPLATE
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 1 + 1?"}, {"role": "assistant", "content": "2"}]  # fmt: skip
    ids, labels = data.tokenize_conversation(tok, messages, "f.jsonl: row 3")
    assert ids == data.render(tok, messages) and labels == [
        lab if lab == IGNORE_INDEX else t for t, lab in zip(ids, labels)
    ]
    spans, current = [], []  # the labelled runs of tokens, decoded
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    spans += [tok.decode(current)] if current else []
    assert spans == ["5<end_of_turn>\n", "2<end_of_turn>\n"]  # each reply with its end of turn, nothing else
    with pytest.raises(DataError, match=r"^f\.jsonl: row 4: the chat template refused the turns \(system/user\)"):
        data.tokenize_sft(tok, {"messages": [{"role": "system", "content": "Be brief."}, *messages[:2]]}, 64,
                          "f.jsonl: row 4")  # fmt: skip
    with pytest.raises(DataError, match=r"^f\.jsonl: row 5: .*System role not supported.*--chat-template"):
        data.tokenize_prompt(tok, [{"role": "system", "content": "Be brief."}, messages[0]], 64, "f.jsonl: row 5")


# --- collation and packing ----------------------------------------------------------------------------------------


def test_collate_right_and_left_padding():
    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = data.collate(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = data.collate(ex, pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]  # the real token sits at position 0


def test_pack_and_collate_packed():
    ex = [
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]},
    ]
    rows = data.pack(ex, max_len=5)
    assert [[e["input_ids"] for e in r] for r in rows] == [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9]]]
    b = data.collate_packed(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]
    # the first token of each sample is never a target (it would be predicted from the previous sample)
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9, -100]]


def test_packed_mask_is_block_diagonal_causal():
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    batch = {
        "input_ids": torch.zeros(1, 4, dtype=torch.long),
        "position_ids": torch.tensor([[0, 1, 0, 1]]),
        "segment_ids": torch.tensor([[1, 1, 2, 2]]),
    }
    mask = data.model_inputs(batch, model, torch.device("cpu"))["attention_mask"][0, 0]
    assert mask.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, True, True],
    ]


def test_step_indices_are_deterministic_and_cover_an_epoch():
    a = [data.step_indices(10, 3, s, seed=1) for s in range(3)]
    assert a == [data.step_indices(10, 3, s, seed=1) for s in range(3)]
    flat = [i for batch in a for i in batch]
    assert len(set(flat)) == 9  # one epoch: no repeats, remainder dropped
    assert data.step_indices(10, 3, 3, seed=1) != a[0]  # a new epoch is a new permutation
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.step_indices(2, 3, 0, seed=1)
