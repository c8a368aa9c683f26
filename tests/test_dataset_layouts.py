"""Real dataset layouts (issue 21): each written here as a small fixture in the published shape, parsed, and compared
with a hand-written list of the records it must give; splits of a hub-style directory; columns of the wrong shape;
--prompt-truncation; the skipped-row report; one script run on such a directory."""

from __future__ import annotations

import json
import re

import pytest

from common import data
from common.data import DataError


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def ultrafeedback_row(k: int, prompt: str, good: str, bad: str) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized's columns: chosen/rejected repeat the prompt as a user turn."""
    return {
        "prompt": prompt,
        "prompt_id": f"id{k}",
        "chosen": [user(prompt), assistant(good)],
        "rejected": [user(prompt), assistant(bad)],
        "messages": [user(prompt), assistant(good)],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }


def ultrafeedback_dir(root, n_train=6, n_test=3):
    """A local copy in the hub's layout: data/<split>-00000-of-00001.parquet for train_prefs and test_prefs."""
    train = [ultrafeedback_row(k, f"What is {k} + 1?", f"{k + 1}", f"{k + 2}") for k in range(n_train)]
    test = [ultrafeedback_row(k, f"What is {k} x 2?", f"{2 * k}", f"{2 * k + 1}") for k in range(n_test)]
    write_parquet(root / "data" / "train_prefs-00000-of-00001.parquet", train)
    write_parquet(root / "data" / "test_prefs-00000-of-00001.parquet", test)
    return root


def pair(prompt, chosen, rejected, row):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": None, "chosen_reward": None,
            "rejected_reward": None, "row": row}  # fmt: skip


# --- layouts ------------------------------------------------------------------------------------------------------


def test_ultrafeedback_directory_splits_parse_to_the_expected_pairs(tmp_path):
    root = ultrafeedback_dir(tmp_path / "uf", n_train=2, n_test=2)
    train, held_out, eval_source = data.load_train_eval(
        str(root), None, 256, data.parse_preference, False, split="train_prefs", eval_split="test_prefs"
    )
    assert train.records == [
        pair([user("What is 0 + 1?")], "1", "2", 1),
        pair([user("What is 1 + 1?")], "2", "3", 2),
    ]
    assert held_out.records == [
        pair([user("What is 0 x 2?")], "0", "1", 1),
        pair([user("What is 1 x 2?")], "2", "3", 2),
    ]
    assert train.source == f"{root} [train_prefs]" and eval_source == f"{root} [test_prefs]"
    # the SFT view of the same rows reads their `messages` column; the prompt view their `prompt`
    rows = data.load_rows(str(root), "train_prefs")
    assert data.parse_sft(rows[0], "f", 1) == {"messages": [user("What is 0 + 1?"), assistant("1")]}
    assert data.parse_prompt(rows[1], "f", 2) == {"prompt": [user("What is 1 + 1?")]}


def test_unknown_split_lists_the_splits(tmp_path):
    root = ultrafeedback_dir(tmp_path / "uf", n_train=2, n_test=1)
    with pytest.raises(DataError) as e:
        data.load_rows(str(root), "train")
    assert str(e.value) == (
        f"{root}: no split 'train' (the splits are ['test_prefs', 'train_prefs']); pass --split/--eval-split NAME"
    )
    # a jsonl-per-split directory resolves like the hub does; a single file is one split
    write_jsonl(tmp_path / "js" / "train.jsonl", [{"prompt": "a"}])
    write_jsonl(tmp_path / "js" / "test.jsonl", [{"prompt": "b"}, {"prompt": "c"}])
    assert data.load_rows(str(tmp_path / "js"), "test") == [{"prompt": "b"}, {"prompt": "c"}]
    with pytest.raises(DataError, match=r"no split 'validation' \(the splits are \['train', 'test'\]\)"):
        data.load_train_eval(str(tmp_path / "js"), None, 1, data.parse_prompt, False, eval_split="validation")
    with pytest.raises(DataError, match=r"--eval-split test is the training split \(--split\); hold out another"):
        data.load_train_eval(str(tmp_path / "js"), None, 1, data.parse_prompt, False, split="test", eval_split="test")
    single = tmp_path / "js" / "train.jsonl"
    with pytest.raises(DataError, match=re.escape(f"{single}: no split 'test' (a single file is one split, 'train')")):
        data.load_rows(str(single), "test")


def test_ultrafeedback_leading_turns_must_match(tmp_path):
    good = ultrafeedback_row(0, "Hi?", "Hello.", "Go.")
    assert data.parse_preference(good, "f", 1) | {"row": 1} == pair([user("Hi?")], "Hello.", "Go.", 1)
    differs = good | {"chosen": [user("Hi!"), assistant("Hello.")]}
    with pytest.raises(DataError) as e:
        data.parse_preference(differs, "f", 3)
    assert str(e.value).startswith("f: row 3, field 'chosen[0]': the turns before the reply differ from 'prompt'")
    extra_turn = good | {"rejected": [system("Be rude."), user("Hi?"), assistant("Go.")]}
    with pytest.raises(DataError, match=r"^f: row 3, field 'rejected\[0\]': the turns before the reply differ"):
        data.parse_preference(extra_turn, "f", 3)
    ends_in_user = good | {"chosen": [user("Hi?")]}
    with pytest.raises(DataError, match=r"^f: row 3, field 'chosen': the last message is not an assistant reply"):
        data.parse_preference(ends_in_user, "f", 3)


def test_implicit_prompt_conversations_without_a_prompt_column():
    """TRL's implicit-prompt form: chosen/rejected are whole conversations; the prompt is their shared turns."""
    row = {
        "chosen": [system("Be brief."), user("2+2?"), assistant("4"), user("and 3+3?"), assistant("6")],
        "rejected": [system("Be brief."), user("2+2?"), assistant("4"), user("and 3+3?"), assistant("7")],
    }
    got = data.parse_preference(row, "f", 5) | {"row": 5}
    assert got == pair([system("Be brief."), user("2+2?"), assistant("4"), user("and 3+3?")], "6", "7", 5)
    bad = row | {"rejected": [system("Be long."), user("2+2?"), assistant("4"), user("and 3+3?"), assistant("7")]}
    with pytest.raises(DataError, match=r"^f: row 5, field 'rejected': its turns before the reply differ from those"):
        data.parse_preference(bad, "f", 5)
    with pytest.raises(DataError, match=r"^f: row 5, field 'chosen': without a 'prompt' column a conversation must"):
        data.parse_preference({"chosen": [assistant("6")], "rejected": [assistant("7")]}, "f", 5)


def test_helpsteer2_flat_columns(tmp_path):
    rows = [
        {"prompt": "Explain rain.", "response": "Water falls.", "helpfulness": 3, "correctness": 4, "coherence": 4,
         "complexity": 1, "verbosity": 0},
        {"prompt": "Name a prime.", "response": "7", "helpfulness": 4, "correctness": 4, "coherence": 4,
         "complexity": 0, "verbosity": 0},
        # HelpSteer2 writes earlier turns into `prompt`
        {"prompt": "c#\n<extra_id_1>Assistant\nC# is a language.\n<extra_id_1>User\nBy whom?", "response": "Microsoft.",
         "helpfulness": 2, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 1},
    ]  # fmt: skip
    write_jsonl(tmp_path / "hs" / "train.jsonl", rows)
    write_jsonl(tmp_path / "hs" / "validation.jsonl", rows[:1])
    train, held_out, _ = data.load_train_eval(
        str(tmp_path / "hs"), None, 1, data.parse_attributes, False, eval_split="validation"
    )
    assert train.records == [
        {"messages": [user("Explain rain."), assistant("Water falls.")], "row": 1, "attributes": {
            "helpfulness": 3.0, "correctness": 4.0, "coherence": 4.0, "complexity": 1.0, "verbosity": 0.0}},
        {"messages": [user("Name a prime."), assistant("7")], "row": 2, "attributes": {
            "helpfulness": 4.0, "correctness": 4.0, "coherence": 4.0, "complexity": 0.0, "verbosity": 0.0}},
        {"messages": [user("c#"), assistant("C# is a language."), user("By whom?"), assistant("Microsoft.")], "row": 3,
         "attributes": {"helpfulness": 2.0, "correctness": 3.0, "coherence": 4.0, "complexity": 1.0, "verbosity": 1.0}},
    ]  # fmt: skip
    assert held_out.records == train.records[:1]
    with pytest.raises(DataError, match=r"^f: row 2, field 'verbosity': expected a number, got str$"):
        data.parse_attributes(rows[0] | {"verbosity": "high"}, "f", 2)
    with pytest.raises(DataError, match=r"^f: row 2, field 'prompt': turn 1 of the HelpSteer2 conversation is not"):
        data.parse_attributes(rows[0] | {"prompt": "a\n<extra_id_1>User\nb"}, "f", 2)
    with pytest.raises(DataError, match=r"^f: row 2, field 'prompt': the HelpSteer2 conversation ends with an assis"):
        data.parse_attributes(rows[0] | {"prompt": "a\n<extra_id_1>Assistant\nb"}, "f", 2)


def test_openai_messages_with_system_turns():
    row = {"messages": [system("You are terse."), user("Capital of France?"), assistant("Paris."),
                        user("And of Spain?"), assistant("Madrid.")]}  # fmt: skip
    assert data.parse_sft(row, "f", 1) == {"messages": row["messages"]}
    assert data.parse_prompt(row, "f", 1) == {"prompt": row["messages"][:4], "field": "messages"}
    assert data.parse_prompt_row(row | {"answer": "Madrid"}, "f", 1) == {"prompt": row["messages"][:4],
        "field": "messages", "given": row["messages"][:4], "columns": {"answer": "Madrid"}}  # fmt: skip


def test_anthropic_hh_several_turns():
    shared = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2 + 2?\n\nAssistant: 4.\n\n"
    shared += "Human: And doubled?\n\nAssistant:"
    row = {"chosen": shared + " 8.", "rejected": shared + " 9."}
    assert data.parse_preference(row, "f", 2) | {"row": 2} == pair(
        [user("Hi there."), assistant("Hello! How can I help?"), user("What is 2 + 2?"), assistant("4."),
         user("And doubled?")], "8.", "9.", 2)  # fmt: skip


@pytest.mark.parametrize(
    "parse, row, message",
    [
        (data.parse_preference, {"prompt": "q", "chosen": 3, "rejected": "b"},
         "f: row 4, field 'chosen': expected a string or a non-empty list of messages, got int"),
        (data.parse_preference, {"chosen": 3.5, "rejected": "b"}, "f: row 4, field 'chosen': expected a string, got float"),
        (data.parse_preference, {"prompt": {"text": "q"}, "chosen": "a", "rejected": "b"},
         "f: row 4, field 'prompt': expected a string or a non-empty list of messages, got dict"),
        (data.parse_sft, {"messages": ["hi", "there"]},
         "f: row 4, field 'messages[0]': expected an object with 'role' and 'content'"),
        (data.parse_sft, {"messages": {"role": "user", "content": "hi"}},
         "f: row 4, field 'messages': expected a string or a non-empty list of messages, got dict"),
        (data.parse_sft, {"messages": [{"role": None, "content": "hi"}]},
         "f: row 4, field 'messages[0]': expected an object with 'role' and 'content'"),
        (data.parse_sft, {"messages": [user("hi"), {"role": "assistant", "content": [{"type": "text"}]}]},
         "f: row 4, field 'messages[1].content': expected a string, got list"),
        (data.parse_sft, {"prompt": "q", "completion": ["a"]}, "f: row 4, field 'completion': expected a string, got list"),
        (data.parse_prompt, {"prompt": 7}, "f: row 4, field 'prompt': expected a string or a non-empty list"),
        (data.parse_kto, {"prompt": "q", "completion": "a", "label": "yes"},
         "f: row 4, field 'label': expected true/false, got str"),
        (data.parse_attributes, {"messages": [user("q"), assistant("a")], "attributes": [1, 2]},
         "f: row 4, field 'attributes': expected an object of name: number"),
        (data.parse_preference, {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_reward": [1]},
         "f: row 4, field 'chosen_reward': expected a number, got list"),
    ],
)  # fmt: skip
def test_a_column_of_the_wrong_shape_names_file_row_and_field(parse, row, message):
    with pytest.raises(DataError) as e:
        parse(row, "f", 4)
    assert str(e.value).startswith(message), str(e.value)


# --- --prompt-truncation ------------------------------------------------------------------------------------------


def test_prompt_truncation_left_drops_leading_turns_then_tokens(tokenizer):
    convo = [system("Be brief."), user("What is 12 + 13?"), assistant("25."), user("And 30 + 40?"), assistant("70."),
             user("And 5 + 5?")]  # fmt: skip
    kept = [convo[0], convo[5]]  # the system turn and the last user turn
    full = data.render(tokenizer, convo, add_generation_prompt=True)
    fits = data.render(tokenizer, kept, add_generation_prompt=True)
    limit = len(fits) + 1  # too short for the system turn and the last exchange (checked next)
    assert len(data.render(tokenizer, [convo[0]] + convo[3:], add_generation_prompt=True)) > limit
    messages, ids, cut = data.fit_prompt(tokenizer, convo, limit, "c", "left")
    assert (messages, ids, cut) == (kept, fits, 0)
    assert data.tokenize_prompt(tokenizer, convo, limit, "c", "left") == fits
    # with a looser limit the last exchange stays, starting at a user turn
    middle = data.render(tokenizer, [convo[0]] + convo[3:], add_generation_prompt=True)
    assert data.fit_prompt(tokenizer, convo, len(middle), "c", "left")[0] == [convo[0]] + convo[3:]
    # nothing to drop: tokens are cut from the left, the assistant header (the end) stays
    assert data.tokenize_prompt(tokenizer, convo, 5, "c", "left") == fits[-5:]
    assert data.fit_prompt(tokenizer, convo, len(full), "c", "left") == (convo, full, 0)
    # pairs render the responses after the kept turns
    record = {"prompt": convo, "chosen": "10.", "rejected": "11."}
    t = data.tokenize_pair(tokenizer, record, 64, limit, "c", "left")
    assert t["prompt_ids"] + t["chosen_ids"] == data.render(tokenizer, kept + [assistant("10.")])
    cut_pair = data.tokenize_pair(tokenizer, record, 64, 5, "c", "left")
    assert cut_pair["prompt_ids"] == fits[-5:] and cut_pair["chosen_ids"] == t["chosen_ids"]


def test_prompt_truncation_error_and_skip(tokenizer):
    long = {"prompt": [user("word " * 40)], "chosen": "a", "rejected": "b", "row": 2}
    short = {"prompt": [user("hi")], "chosen": "a", "rejected": "b", "row": 1}
    with pytest.raises(DataError) as e:
        data.fit_prompt(tokenizer, long["prompt"], 16, "f: row 2", "error")
    assert re.fullmatch(
        r"f: row 2, field 'prompt': prompt is \d+ tokens, over --max-prompt-len 16 \(pass --prompt-truncation left to "
        r"keep its last turns, or skip to drop such rows; or raise the limit\)", str(e.value)
    )  # fmt: skip

    def tok(record, context):
        return data.tokenize_pair(tokenizer, record, 64, 16, context, "skip")

    out = data.tokenize_rows([short, long], tok, "f", skip_bad_rows=False, truncation="skip")
    assert len(out.records) == 1 and out.skipped == 1 and "over --max-prompt-len 16" in out.errors[0]
    with pytest.raises(DataError, match="over --max-prompt-len"):  # "error" without --skip-bad-rows stops
        data.tokenize_rows([short, long], lambda r, c: data.tokenize_pair(tokenizer, r, 64, 16, c), "f", False)
    no_room = short | {"row": 3}  # another tokenisation error still stops a "skip" run without --skip-bad-rows
    n = len(data.render(tokenizer, short["prompt"], add_generation_prompt=True))
    with pytest.raises(DataError, match=r"^f: row 3: the prompt .* leaves no room"):
        data.tokenize_rows([short, long, no_room], lambda r, c: data.tokenize_pair(tokenizer, r, n if r["row"] == 3
                           else 64, 16, c, "skip"), "f", False, "skip")  # fmt: skip


def test_a_too_long_prompt_from_messages_rows_names_the_messages_field(tokenizer):
    """Online scripts read SFT `messages` rows as prompts (their turns before the last answer): the over-length error
    names the field the row has, not `prompt`."""
    row = {"messages": [user("word " * 40), assistant("ok")], "answer": "ok"}
    record = data.parse_prompt_row(row, "f", 5)
    with pytest.raises(DataError, match=r"^f: row 5, field 'messages': prompt is \d+ tokens, over --max-prompt-len 16"):
        data.tokenize_prompt_row(tokenizer, record, 16, "f: row 5")  # grpo.py, rejection_sampling.py
    parsed = data.parse_prompt(row, "f", 5)
    with pytest.raises(DataError, match=r"^f: row 5, field 'messages': prompt is"):  # ppo.py's call
        data.tokenize_prompt(tokenizer, parsed["prompt"], 16, "f: row 5", "error", parsed.get("field", "prompt"))
    with pytest.raises(DataError, match=r"^f: row 5, field 'prompt': prompt is"):  # a `prompt` row names `prompt`
        data.tokenize_prompt_row(tokenizer, data.parse_prompt_row({"prompt": "word " * 40}, "f", 5), 16, "f: row 5")


# --- the skipped-row report ---------------------------------------------------------------------------------------


def test_skip_report_separates_reasons_and_warns_on_a_small_held_out_set():
    train, train_tok = data.Parsed([1] * 50, 2, ["p1", "p2"]), data.Parsed([1] * 47, 3, ["t1", "t2", "t3"])
    held_out, held_out_tok = data.Parsed([1] * 12, 8, ["e1"] * 8), data.Parsed([1] * 10, 2, ["l1", "l2"])
    lines = data.skip_report(train, train_tok, held_out, held_out_tok, show=2)
    assert lines[0] == "skipped rows: train 2 malformed, 3 too long; held-out 8 malformed, 2 too long"
    assert lines[1:5] == ["skipped: p1", "skipped: p2", "skipped (held-out): e1", "skipped (held-out): e1"]
    assert lines[5].startswith("warning: only 10 of 20 held-out rows are usable (8 malformed, 2 too long)")
    assert data.skip_report(train, train_tok, data.Parsed([1] * 40), data.Parsed([1] * 40))[-1] == "skipped: t3"
    assert data.skip_report(data.Parsed([1]), data.Parsed([1])) == []


# --- through a script ---------------------------------------------------------------------------------------------


def test_dpo_reads_splits_of_a_hub_style_directory(demo_base, tmp_path):
    """dpo.py on an UltraFeedback-shaped directory: --split/--eval-split, a too-long prompt in each split dropped by
    --prompt-truncation skip and reported per split, a malformed held-out row skipped and reported."""
    from conftest import run_script

    root = ultrafeedback_dir(tmp_path / "uf", n_train=16, n_test=4)
    train = [ultrafeedback_row(k, f"What is {k} + 1?", f"{k + 1}", f"{k + 2}") for k in range(16)]
    train[3] = ultrafeedback_row(3, "Say " + "yes " * 80, "yes", "no")
    write_parquet(root / "data" / "train_prefs-00000-of-00001.parquet", train)
    test = [ultrafeedback_row(k, f"What is {k} x 2?", f"{2 * k}", f"{2 * k + 1}") for k in range(4)]
    test[1] = ultrafeedback_row(1, "Say " + "no " * 80, "no", "yes")
    test[2]["chosen"] = [user("Not the prompt"), assistant("0")]
    write_parquet(root / "data" / "test_prefs-00000-of-00001.parquet", test)
    proc = run_script("dpo.py", "--model-path", str(demo_base), "--data", str(root), "--split", "train_prefs",
                      "--eval-split", "test_prefs", "--prompt-truncation", "skip", "--skip-bad-rows",
                      "--max-prompt-len", "48", "--total-steps", "1", "--eval-every", "0", "--save-every", "0",
                      "--demo-eval-prompts", "0", "--local-micro-batch-size", "5", "--output-dir", str(tmp_path / "o"))  # fmt: skip
    out = proc.stdout
    assert "train=15 eval=2 " in out, out[-3000:]
    assert "skipped rows: train 0 malformed, 1 too long; held-out 1 malformed, 1 too long" in out
    assert f"skipped: {root} [train_prefs]: row 4, field 'prompt': prompt is" in out
    assert f"skipped (held-out): {root} [test_prefs]: row 3, field 'chosen[0]': the turns before" in out
    assert "warning: only 2 of 4 held-out rows are usable (1 malformed, 1 too long)" in out


def test_every_script_that_reads_data_has_the_data_flags():
    """--split everywhere data is read, --eval-split beside --eval-data, --prompt-truncation beside --max-prompt-len,
    and the one-line data-error handler installed right after the flags are parsed."""
    import dataclasses
    import importlib
    from pathlib import Path

    import steerlm

    classes = [importlib.import_module(name).Args for name in
               ("sft", "dpo", "reward_model", "spin", "distill", "ppo", "grpo", "rejection_sampling")]  # fmt: skip
    classes += [steerlm.LabelArgs, steerlm.TrainArgs, steerlm.AllArgs, steerlm.Steer2Args]
    for cls in classes:
        names = {f.name: f.default for f in dataclasses.fields(cls)}
        assert names.get("split") == "train", cls
        if "eval_data" in names:
            assert "eval_split" in names and names["eval_split"] is None, cls
        if "max_prompt_len" in names:
            assert names.get("prompt_truncation") == "error", cls
    root = Path(__file__).resolve().parent.parent
    for script in ("sft", "dpo", "reward_model", "spin", "distill", "ppo", "grpo", "rejection_sampling", "steerlm"):
        body = (root / f"{script}.py").read_text().split('if __name__ == "__main__":')[1]
        assert re.match(r"\n    args = tyro\.cli\(.*\)\n    data\.exit_on_data_error\(\)", body), script
