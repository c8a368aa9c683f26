"""Data plumbing: reading every contract of DESIGN.md, rendering with the chat template, collating, packing.

Reading goes through `datasets.load_dataset` (local jsonl/json/parquet/csv files, also .jsonl.gz/.json.gz/.csv.gz,
local dataset directories and hub names, with their splits: `--split`/`--eval-split`). Each row is validated by a
`parse_*` function that returns a plain normalised record or raises `DataError` naming the file, the row (1-based,
= the line of a jsonl file) and the field. `parse_rows` applies one
of them to a whole dataset and either stops at the first bad row or, when the user asked for it, skips and counts.

Rendering always uses the tokenizer's chat template. The tokens an assistant turn contributes are found by
rendering prefixes of the conversation (the generation prompt before the turn, the conversation including
it): this works for any template whose renderings of a conversation's prefixes are prefixes of each other,
and the code checks that instead of assuming it.
"""

from __future__ import annotations

import gzip
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


class DataError(ValueError):
    """A malformed input row; the message names file, row and field."""


class MissingDataFile(DataError, FileNotFoundError):
    """A data file that does not exist (a FileNotFoundError too, as before)."""


def where(source: str, row: int, fld: str | None = None) -> str:
    return f"{source}: row {row}" + (f", field '{fld}'" if fld else "")


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_GZIP_READABLE = (".jsonl", ".json", ".csv")  # read like their plain forms when gzipped (parquet compresses inside)


def data_format(path: Path) -> tuple[str | None, bool]:
    """(".jsonl"/".json"/".parquet"/".csv", gzipped) of a data file name; (None, False) when it is not one
    (a directory or a hub name). `x.jsonl.gz` is (".jsonl", True)."""
    if path.suffix == ".gz" and len(path.suffixes) >= 2 and path.suffixes[-2] in _GZIP_READABLE:
        return path.suffixes[-2], True
    return (path.suffix, False) if path.suffix in _BUILDERS else (None, False)


def _open_text(path, **kwargs):
    """A data file opened as text, through gzip when its name ends in .gz."""
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", **kwargs)
    return open(path, **kwargs)


def _check_json_lines(path: str) -> list[int] | None:
    """Find the first unparseable line of a jsonl file (datasets' own error names no line).

    Returns the line number of each row: datasets skips blank lines, so the k-th row it returns is the k-th
    non-blank line, not line k. None for a JSON array (its rows are numbered by position)."""
    with _open_text(path) as f:
        first = f.read(1)
    if first == "[":
        try:
            with _open_text(path) as f:
                json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return None
    line_numbers = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            line_numbers.append(lineno)
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where(path, lineno)}: unparseable JSON line ({e.msg}): {line.strip()[:80]!r}"
                ) from None
            if not isinstance(value, dict):
                raise DataError(f"{where(path, lineno)}: expected a JSON object, got {type(value).__name__}")
    return line_numbers


def _csv_text_features(path: Path):
    import csv

    import datasets

    with _open_text(path, newline="") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


class Rows(list):
    """The rows of a data file (a list of dicts) and `line_numbers`: the file row of each, 1-based, the line
    of a jsonl file. `parse_rows` names these in its errors; a slice is a plain list (pass its numbers)."""

    def __init__(self, rows: list[dict], line_numbers: list[int] | None = None, source: str = "data"):
        super().__init__(rows)
        self.line_numbers = list(line_numbers) if line_numbers is not None else list(range(1, len(rows) + 1))
        self.source = source


def source_name(spec: str, split: str = "train") -> str:
    """How errors name a data source: a file by its path; a directory or hub dataset with its split."""
    return spec if data_format(Path(spec))[0] is not None else f"{spec} [{split}]"


def _unknown_split(spec: str, split: str, error: Exception) -> DataError:
    import re

    import datasets

    found = re.search(r"one of (\[.*?\])", str(error))
    try:
        names = found.group(1) if found else str(datasets.get_dataset_split_names(spec))
    except Exception:  # the names could not be listed: keep datasets' own explanation
        names = f"unknown ({error})"
    return DataError(f"{spec}: no split {split!r} (the splits are {names}); pass --split/--eval-split NAME")


def load_rows(spec: str, split: str = "train") -> Rows:
    """Rows of a local file (jsonl/json/parquet/csv, and jsonl/json/csv gzipped: `x.jsonl.gz`), a local dataset
    directory or a `datasets` hub name, as a list of dicts that knows the file row of each (`Rows.line_numbers`:
    past blank lines of a jsonl file, the line; else the position) and how errors name it (`Rows.source`).

    `split` picks a split of a directory or hub dataset as `datasets.load_dataset(spec, split=...)` resolves them
    (`train.jsonl`/`test.jsonl`, `data/train_prefs-00000-of-00001.parquet`, ...); an unknown split is an error that
    lists the splits there are. A single file is one split, "train".
    """
    import datasets

    datasets.disable_progress_bars()
    path = Path(spec)
    line_numbers = None
    suffix, gzipped = data_format(path)
    if suffix is not None:
        if not path.exists():
            raise MissingDataFile(f"{spec}: no such data file")
        if split != "train":
            raise DataError(
                f"{spec}: no split {split!r} (a single file is one split, 'train'); pass a dataset directory with "
                "a file per split, or the held-out file as --eval-data"
            )
        try:
            if _BUILDERS[suffix] == "json":
                line_numbers = _check_json_lines(spec)
            # CSV cells are read as text: a completion "3" must stay the string "3" (numbers are parsed per field)
            kwargs = {"features": _csv_text_features(path)} if suffix == ".csv" else {}
        except (gzip.BadGzipFile, EOFError) as e:  # not gzip, or cut short
            raise DataError(f"{spec}: not a readable gzip file ({e})") from None
        try:  # datasets decompresses a .gz data file itself (it infers the compression from the name)
            ds = datasets.load_dataset(_BUILDERS[suffix], data_files=str(path), split="train", **kwargs)
        except Exception as e:  # arrow type conflicts etc.: keep datasets' explanation, add the file
            raise DataError(f"{spec}: could not be read as {suffix[1:]}{'.gz' if gzipped else ''}: {e}") from e
    else:  # a local dataset directory or a hub name: datasets resolves the split's files
        try:
            ds = datasets.load_dataset(str(path) if path.is_dir() else spec, split=split)
        except ValueError as e:
            if "Unknown split" not in str(e):
                raise
            raise _unknown_split(spec, split, e) from None
    rows = ds.to_list()
    if line_numbers is not None and len(line_numbers) != len(rows):  # datasets read the lines differently
        warnings.warn(
            f"{spec}: {len(rows)} rows from {len(line_numbers)} non-blank lines; rows numbered by position",
            stacklevel=2,
        )
        line_numbers = None
    return Rows(rows, line_numbers, source_name(spec, split))


@dataclass
class Parsed:
    records: list
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    source: str = ""  # how errors name the data (parse_rows sets it; scripts pass it on to tokenize_all)


def parse_rows(
    rows: list[dict], parse: Callable, source: str, skip_bad_rows: bool = False, line_numbers: list[int] | None = None
) -> Parsed:
    """Apply `parse(row, source, row_number)` to every row; stop at the first DataError unless skipping.

    `line_numbers` are the file rows of `rows` (default: `rows.line_numbers` for what `load_rows` returned, else
    1, 2, ...), so errors name the line of the file, also past blank lines and in a held-out tail.
    """
    if line_numbers is None:
        line_numbers = getattr(rows, "line_numbers", range(1, len(rows) + 1))
    out = Parsed([], source=source)
    for i, row in zip(line_numbers, rows, strict=True):
        try:
            out.records.append(parse(row, source, i) | {"row": i})
        except DataError as e:
            if not skip_bad_rows:
                raise
            out.skipped += 1
            out.errors.append(str(e))
    if not out.records:
        raise DataError(
            f"{source}: no usable rows ({out.skipped} skipped)" + (f"; first: {out.errors[0]}" if out.errors else "")
        )
    return out


def parse_first_rows(
    rows: Rows, parse: Callable, skip_bad_rows: bool, max_rows: int = 0, end: int | None = None
) -> Parsed:
    """`parse_rows` on the first `max_rows` of `rows[:end]` (0 = all of them), with their file line numbers: rows past
    them are never read (--max-rows: a quick run on a big file does not parse all of it, nor stop at a bad row it would
    not use)."""
    if max_rows < 0:
        raise ValueError(f"--max-rows must be >= 0 (0 = all), got {max_rows}")
    n = len(rows) if end is None else end
    n = min(n, max_rows) if max_rows else n
    return parse_rows(rows[:n], parse, rows.source, skip_bad_rows, rows.line_numbers[:n])


def load_train_eval(
    data_path: str,
    eval_data: str | None,
    eval_size: int,
    parse: Callable,
    skip_bad_rows: bool,
    split: str = "train",
    eval_split: str | None = None,
    max_rows: int = 0,
) -> tuple[Parsed, Parsed, str]:
    """Parsed training rows and held-out rows. The held-out rows are `eval_data` when given (its split
    `eval_split`, default "train"), else the split `eval_split` of `data_path` when given (e.g. `test_prefs`),
    else the last `eval_size` rows of the split `split` of `data_path` (not trained on).
    `max_rows` > 0 keeps the first `max_rows` training rows, before parsing (`parse_first_rows`).
    Returns (train, eval, eval_source); `train.source` names the training data in errors."""
    if max_rows < 0:  # before any data is read
        raise ValueError(f"--max-rows must be >= 0 (0 = all), got {max_rows}")
    rows = load_rows(data_path, split)
    if eval_data is None and eval_split is None:
        if eval_size < 1:
            raise ValueError(f"--eval-size must be at least 1 (got {eval_size}), or pass --eval-data/--eval-split")
        if len(rows) <= eval_size:
            raise ValueError(f"{rows.source}: {len(rows)} rows, not more than --eval-size {eval_size}")
        # the held-out tail keeps the row numbers of the file
        train = parse_first_rows(rows, parse, skip_bad_rows, max_rows, end=len(rows) - eval_size)
        held_out = parse_rows(rows[-eval_size:], parse, rows.source, skip_bad_rows, rows.line_numbers[-eval_size:])
        return train, held_out, rows.source
    if eval_data is None and eval_split == split:
        raise DataError(f"{data_path}: --eval-split {eval_split} is the training split (--split); hold out another one")
    train = parse_first_rows(rows, parse, skip_bad_rows, max_rows)
    eval_rows = load_rows(eval_data or data_path, eval_split or "train")
    held_out = parse_rows(eval_rows, parse, eval_rows.source, skip_bad_rows)
    return train, held_out, eval_rows.source


MIN_HELD_OUT = 16  # fewer surviving held-out rows than this (after skips) gets a warning: the eval is noise


def skip_report(train: Parsed, train_tok: Parsed, held_out: Parsed | None = None, held_out_tok: Parsed | None = None,
                show: int = 5) -> list[str]:  # fmt: skip
    """The lines a script prints about skipped rows (--skip-bad-rows, --prompt-truncation skip): the count per
    reason (malformed = the parse stage, too long = the tokenisation stage) for the training and the held-out
    data, the first `show` errors, and a warning when the held-out set lost rows and few survive."""
    lines = []
    parts = [("train", train, train_tok)] + ([("held-out", held_out, held_out_tok)] if held_out is not None else [])
    counts = [f"{name} {p.skipped} malformed, {t.skipped} too long" for name, p, t in parts]
    if any(p.skipped + t.skipped for _, p, t in parts):
        lines.append("skipped rows: " + "; ".join(counts))
    for name, p, t in parts:
        lines += [
            f"skipped{'' if name == 'train' else ' (' + name + ')'}: {err}" for err in (p.errors + t.errors)[:show]
        ]
    if held_out is not None:
        read = held_out.skipped + len(held_out.records)
        kept = len(held_out_tok.records)
        if kept < read and (kept < MIN_HELD_OUT or kept < read / 2):
            lines.append(
                f"warning: only {kept} of {read} held-out rows are usable ({held_out.skipped} malformed, "
                f"{held_out_tok.skipped} too long): the eval metrics rest on few examples; fix those rows, raise "
                "--max-seq-len/--max-prompt-len, or pass a larger --eval-size, --eval-data or --eval-split"
            )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Row parsers (one per contract). They return plain dicts with normalised fields.
# ---------------------------------------------------------------------------------------------------------------


def _present(row: dict, key: str) -> bool:
    return key in row and row[key] is not None


def _text(value, source: str, row: int, fld: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where(source, row, fld)}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where(source, row, fld)}: empty")
    return value


def _messages(value, source: str, row: int, fld: str) -> list[dict]:
    """A string (one user turn) or a list of {"role", "content"} messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, source, row, fld)}]
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where(source, row, fld)}: expected a string or a non-empty list of messages, got "
            f"{type(value).__name__ if not isinstance(value, list) else 'an empty list'}"
        )
    out = []
    for j, m in enumerate(value):
        sub = f"{fld}[{j}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise DataError(f"{where(source, row, sub)}: expected an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where(source, row, sub + '.role')}: unknown role {m['role']!r} (expected one of {ROLES})"
            )
        msg = {"role": m["role"], "content": _text(m["content"], source, row, sub + ".content")}
        if m.get("attributes"):
            msg["attributes"] = m["attributes"]
        out.append(msg)
    return out


def parse_sft(row: dict, source: str, i: int) -> dict:
    """{"messages": [...]} or {"prompt": str|messages, "completion": str} -> {"messages": [...]}."""
    if _present(row, "messages"):
        messages = _messages(row["messages"], source, i, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where(source, i, 'messages')}: no assistant turn to learn from")
        return {"messages": messages}
    if _present(row, "prompt") or _present(row, "completion"):
        for key in ("prompt", "completion"):
            if not _present(row, key):
                raise DataError(f"{where(source, i, key)}: missing")
        prompt = _messages(row["prompt"], source, i, "prompt")
        completion = _text(row["completion"], source, i, "completion")
        return {"messages": prompt + [{"role": "assistant", "content": completion}]}
    raise DataError(f"{where(source, i)}: expected 'messages', or 'prompt' and 'completion' (found {sorted(row)})")


def split_hh(chosen: str, rejected: str, source: str, i: int) -> tuple[list[dict], str, str]:
    """Anthropic HH form: the prompt is everything up to the last shared "\\n\\nAssistant:"."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(f"{where(source, i, 'chosen')}: no shared '\\n\\nAssistant:' turn (not Anthropic HH format)")
    prompt_text = chosen[:cut]
    parts, role, pos = [], None, 0
    while pos < len(prompt_text):
        nxt = [(prompt_text.find(tag, pos), tag) for tag in (HH_HUMAN, HH_ASSISTANT)]
        nxt = [(k, tag) for k, tag in nxt if k >= 0]
        k, tag = min(nxt) if nxt else (len(prompt_text), None)
        if role is not None:
            parts.append({"role": role, "content": prompt_text[pos:k].strip()})
        elif prompt_text[pos:k].strip():
            raise DataError(f"{where(source, i, 'chosen')}: text before the first '\\n\\nHuman:' turn")
        if tag is None:
            break
        role, pos = ("user" if tag == HH_HUMAN else "assistant"), k + len(tag)
    if not parts or parts[0]["role"] != "user":
        raise DataError(f"{where(source, i, 'chosen')}: the prompt has no '\\n\\nHuman:' turn")
    for j, m in enumerate(parts):
        if not m["content"]:
            raise DataError(f"{where(source, i, 'chosen')}: turn {j} of the prompt is empty")
    return parts, chosen[cut + len(HH_ASSISTANT) :].strip(), rejected[cut + len(HH_ASSISTANT) :].strip()


def _response(value, prompt: list[dict], source: str, i: int, fld: str) -> str:
    """A response given as a string, or as messages ending in one assistant reply: the reply alone, or the
    whole conversation repeating the prompt turn(s) first (UltraFeedback-binarized), which must then be the
    prompt exactly."""
    if isinstance(value, str):
        return _text(value, source, i, fld)
    messages = _messages(value, source, i, fld)
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where(source, i, fld)}: the last message is not an assistant reply (role {messages[-1]['role']!r})"
        )
    if len(messages) > 1 and messages[:-1] != prompt:
        first = next(
            (j for j, (a, b) in enumerate(zip(messages[:-1], prompt)) if a != b), min(len(messages) - 1, len(prompt))
        )
        raise DataError(
            f"{where(source, i, f'{fld}[{first}]')}: the turns before the reply differ from 'prompt' (a response "
            "given as a conversation must repeat the prompt exactly, then end in one assistant message)"
        )
    return messages[-1]["content"]


def _implicit_prompt(row: dict, source: str, i: int) -> tuple[list[dict], str, str]:
    """chosen/rejected as whole conversations without a `prompt` column (TRL's implicit-prompt form): the prompt
    is their shared leading turns, which must be the same in both, each followed by one assistant reply."""
    chosen = _messages(row["chosen"], source, i, "chosen")
    rejected = _messages(row["rejected"], source, i, "rejected")
    for fld, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError(
                f"{where(source, i, fld)}: without a 'prompt' column a conversation must be the prompt turns, then "
                "one assistant reply"
            )
    if chosen[:-1] != rejected[:-1]:
        raise DataError(
            f"{where(source, i, 'rejected')}: its turns before the reply differ from those of 'chosen' (the two "
            "conversations must share the prompt)"
        )
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _number(row: dict, key: str, source: str, i: int) -> float | None:
    if not _present(row, key):
        return None
    value = row[key]
    if isinstance(value, str):  # CSV cells arrive as text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where(source, i, key)}: expected a number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise DataError(f"{where(source, i, key)}: not finite")
    return float(value)


def parse_preference(row: dict, source: str, i: int, strength_column: str | None = None) -> dict:
    """{"prompt", "chosen", "rejected"} (strings or messages), or Anthropic HH {"chosen", "rejected"} text.

    Returns {"prompt": messages, "chosen": str, "rejected": str, "margin", "chosen_reward", "rejected_reward"}
    (the last three None when absent). With `strength_column` (reward_model.py's margin_bt/scaled_bt), also
    "strength": the number in that column (None when absent; the script that needs it says so).
    """
    for key in ("chosen", "rejected"):
        if not _present(row, key):
            raise DataError(f"{where(source, i, key)}: missing")
    if _present(row, "prompt"):
        prompt = _messages(row["prompt"], source, i, "prompt")
        chosen = _response(row["chosen"], prompt, source, i, "chosen")
        rejected = _response(row["rejected"], prompt, source, i, "rejected")
    elif isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
        prompt, chosen, rejected = _implicit_prompt(row, source, i)
    else:
        chosen_text = _text(row["chosen"], source, i, "chosen")
        rejected_text = _text(row["rejected"], source, i, "rejected")
        prompt, chosen, rejected = split_hh(chosen_text, rejected_text, source, i)
        if not chosen:
            raise DataError(f"{where(source, i, 'chosen')}: empty response after the last Assistant turn")
        if not rejected:
            raise DataError(f"{where(source, i, 'rejected')}: empty response after the last Assistant turn")
    if chosen == rejected:
        raise DataError(f"{where(source, i, 'rejected')}: identical to 'chosen' (the pair carries no preference)")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "margin": _number(row, "margin", source, i),
        "chosen_reward": _number(row, "chosen_reward", source, i),
        "rejected_reward": _number(row, "rejected_reward", source, i),
    } | ({"strength": _number(row, strength_column, source, i)} if strength_column else {})


def parse_prompt(row: dict, source: str, i: int) -> dict:
    """{"prompt": str|messages} -> {"prompt": messages}. SFT rows are accepted too (their prompt part), and then
    "field": "messages" says where the prompt came from, for the errors about it (a prompt over --max-prompt-len)."""
    if _present(row, "prompt"):
        return {"prompt": _messages(row["prompt"], source, i, "prompt")}
    if _present(row, "messages"):
        messages = _messages(row["messages"], source, i, "messages")
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(f"{where(source, i, 'messages')}: no prompt turn before the assistant turn")
        return {"prompt": messages, "field": "messages"}
    raise DataError(f"{where(source, i, 'prompt')}: missing")


def parse_prompt_row(row: dict, source: str, i: int) -> dict:
    """A prompt row for online RL (grpo.py, rejection_sampling.py): the prompt as messages, the prompt field as
    given (what reward functions receive), and every other field (the columns reward functions may read, e.g. an
    `answer`)."""
    parsed = parse_prompt(row, source, i)
    given = row["prompt"] if row.get("prompt") is not None else parsed["prompt"]
    columns = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    return parsed | {"given": given, "columns": columns}


def parse_kto(row: dict, source: str, i: int) -> dict:
    """{"prompt", "completion", "label": bool} -> {"prompt": messages, "completion": str, "label": bool}."""
    for key in ("prompt", "completion", "label"):
        if not _present(row, key):
            raise DataError(f"{where(source, i, key)}: missing")
    if not isinstance(row["label"], bool):
        raise DataError(f"{where(source, i, 'label')}: expected true/false, got {type(row['label']).__name__}")
    return {
        "prompt": _messages(row["prompt"], source, i, "prompt"),
        "completion": _text(row["completion"], source, i, "completion"),
        "label": row["label"],
    }


HELPSTEER_TURN = "<extra_id_1>"  # HelpSteer2 writes earlier turns into `prompt` as "\n<extra_id_1>Assistant\n..."


def helpsteer_turns(text: str, source: str, i: int) -> list[dict]:
    """A HelpSteer2 multi-turn `prompt` ("first user turn\n<extra_id_1>Assistant\nreply\n<extra_id_1>User\nnext
    user turn") as messages: user and assistant turns alternating, ending with a user turn."""
    import re

    parts = re.split(r"\n?<extra_id_1>(User|Assistant)\n", text)
    messages = [{"role": "user", "content": parts[0]}]
    messages += [{"role": role.lower(), "content": content} for role, content in zip(parts[1::2], parts[2::2])]
    for j, m in enumerate(messages):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected or not m["content"].strip() or HELPSTEER_TURN in m["content"]:
            raise DataError(
                f"{where(source, i, 'prompt')}: turn {j} of the HelpSteer2 conversation is not a non-empty "
                f"{expected} turn (expected user/assistant turns separated by '\\n<extra_id_1>Assistant\\n' and "
                "'\\n<extra_id_1>User\\n', ending with a user turn)"
            )
    if messages[-1]["role"] != "user":
        raise DataError(f"{where(source, i, 'prompt')}: the HelpSteer2 conversation ends with an assistant turn")
    return [{"role": m["role"], "content": m["content"].strip()} for m in messages]


def parse_attributes(row: dict, source: str, i: int) -> dict:
    """SFT row + {"attributes": {name: number}}, or HelpSteer's flat columns (prompt, response, 0-4 scores).

    Returns {"messages": [...], "attributes": {name: float or None}}; None = missing, never 0.
    """
    if _present(row, "attributes"):
        attrs = row["attributes"]
        if not isinstance(attrs, dict):
            raise DataError(f"{where(source, i, 'attributes')}: expected an object of name: number")
        values = {}
        for name, value in attrs.items():
            if value is None:
                values[name] = None
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(
                    f"{where(source, i, 'attributes.' + name)}: expected a number, got {type(value).__name__}"
                )
            else:
                values[name] = float(value)
        return {"messages": parse_sft(row, source, i)["messages"], "attributes": values}
    if _present(row, "prompt") and _present(row, "response"):
        prompt = (
            helpsteer_turns(row["prompt"], source, i)
            if isinstance(row["prompt"], str) and HELPSTEER_TURN in row["prompt"]
            else _messages(row["prompt"], source, i, "prompt")
        )
        response = _text(row["response"], source, i, "response")
        values = {name: _number(row, name, source, i) for name in HELPSTEER_ATTRIBUTES if name in row}
        if not values:
            raise DataError(f"{where(source, i, 'attributes')}: missing (no 'attributes' and no HelpSteer columns)")
        return {"messages": prompt + [{"role": "assistant", "content": response}], "attributes": values}
    raise DataError(f"{where(source, i, 'attributes')}: missing (no 'attributes' and no HelpSteer columns)")


# ---------------------------------------------------------------------------------------------------------------
# Rendering with the chat template
# ---------------------------------------------------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    # The chat template already writes BOS etc.; adding special tokens again would double them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(
    tokenizer, messages: list[dict], add_generation_prompt: bool = False, context: str = "conversation", **kwargs
) -> list[int]:
    """The token ids of `messages` rendered by the tokenizer's chat template. A template that refuses the turns (e.g.
    Gemma's: no system role, roles must alternate) is a DataError naming `context` (file and row) and what to do."""
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except TemplateError as e:
        roles = "/".join(m.get("role", "?") for m in messages)
        raise DataError(
            f"{context}: the chat template refused the turns ({roles}): {e}; a template without a system role (Gemma's) "
            "needs the system text folded into the first user turn, or pass --chat-template chatml|llama3|plain|FILE"
        ) from None
    return encode(tokenizer, text)


def _check_prefix(prefix: list[int], full: list[int], context: str) -> None:
    if full[: len(prefix)] != prefix:
        raise DataError(
            f"{context}: the chat template is not prefix-stable (rendering the conversation up to a turn is not a "
            "prefix of rendering it with the turn), so assistant tokens cannot be located"
        )


def tokenize_conversation(
    tokenizer, messages: list[dict], context: str = "conversation"
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = input_ids on every assistant turn (content + end-of-turn), else -100.

    An assistant message's `attributes` (SteerLM) are part of the turn's header, so they are not labelled.
    """
    labels: list[int] = []
    ids: list[int] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header_kwargs = {"attributes": message["attributes"]} if message.get("attributes") else {}
        head = render(tokenizer, messages[:k], add_generation_prompt=True, context=context, **header_kwargs)
        full = render(tokenizer, messages[: k + 1], context=context)
        _check_prefix(ids, head, context)
        _check_prefix(head, full, context)
        labels += [IGNORE_INDEX] * (len(head) - len(ids)) + full[len(head) :]
        ids = full
    whole = render(tokenizer, messages, context=context)
    _check_prefix(ids, whole, context)
    labels += [IGNORE_INDEX] * (len(whole) - len(ids))
    return whole, labels


def tokenize_sft(tokenizer, record: dict, max_len: int, context: str) -> dict:
    """An SFT example, truncated on the right to max_len; an error when no assistant token survives."""
    ids, labels = tokenize_conversation(tokenizer, record["messages"], context)
    truncated = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise DataError(f"{context}: no assistant token left within --max-seq-len {max_len} ({len(ids)} tokens)")
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


PROMPT_TRUNCATION = ("left", "skip", "error")
TOO_LONG = "over --max-prompt-len"  # in every too-long-prompt error: how `tokenize_rows` tells them apart


def fit_prompt(
    tokenizer,
    prompt: list[dict],
    max_prompt_len: int,
    context: str,
    truncation: str = "error",
    fld: str = "prompt",
    **template_kwargs,
) -> tuple[list[dict], list[int], int]:
    """Fit a prompt into `max_prompt_len` tokens. Returns (messages, ids, cut): the turns kept, their rendering
    with the generation prompt, and how many tokens to drop from its left (`ids[cut:]` is what the model reads;
    responses are rendered after the whole `ids`, so the template's prefix check still holds).

    truncation "left" keeps the last turns: it drops whole leading turns (a leading system turn stays; the kept
    conversation starts at a user turn) until the prompt fits, and only when the last user turn alone is too long
    cuts tokens from the left, so the prompt always ends with the assistant header. "error" and "skip" raise a
    DataError naming the field and the flag ("skip" rows are then dropped by `tokenize_rows`).
    """
    if truncation not in PROMPT_TRUNCATION:
        raise ValueError(f"--prompt-truncation must be one of {PROMPT_TRUNCATION}, got {truncation!r}")
    ids = render(tokenizer, prompt, add_generation_prompt=True, context=context, **template_kwargs)
    if len(ids) <= max_prompt_len:
        return prompt, ids, 0
    if truncation != "left":
        raise DataError(
            f"{context}, field '{fld}': prompt is {len(ids)} tokens, {TOO_LONG} {max_prompt_len} "
            "(pass --prompt-truncation left to keep its last turns, or skip to drop such rows; or raise the limit)"
        )
    messages = prompt
    for messages in shorter_prompts(prompt):
        ids = render(tokenizer, messages, add_generation_prompt=True, context=context, **template_kwargs)
        if len(ids) <= max_prompt_len:
            return messages, ids, 0
    return messages, ids, len(ids) - max_prompt_len


def shorter_prompts(prompt: list[dict]):
    """The prompts --prompt-truncation left tries, longest first: whole leading turns dropped one exchange at a
    time (a leading system turn stays; each starts at a user turn), down to the last turn."""
    system = prompt[:1] if prompt[0]["role"] == "system" else []
    turns = prompt[len(system) :]
    while len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
        yield system + turns


def tokenize_prompt(
    tokenizer,
    prompt: list[dict],
    max_prompt_len: int,
    context: str,
    truncation: str = "error",
    fld: str = "prompt",
    **template_kwargs,
) -> list[int]:
    """The prompt's ids with the generation prompt, at most `max_prompt_len` (see `fit_prompt`)."""
    _, ids, cut = fit_prompt(tokenizer, prompt, max_prompt_len, context, truncation, fld, **template_kwargs)
    return ids[cut:]


def tokenize_prompt_row(tokenizer, record: dict, max_prompt_len: int, context: str, truncation: str = "error") -> dict:
    """An online script's prompt record with its ids ("ids"); under --prompt-truncation left its "prompt" becomes
    the turns kept, so what the policy and the reward see agree."""
    fld = record.get("field", "prompt")
    prompt, ids, cut = fit_prompt(tokenizer, record["prompt"], max_prompt_len, context, truncation, fld)
    return record | {"prompt": prompt, "ids": ids[cut:]}


def tokenize_response(tokenizer, prompt: list[dict], prompt_ids: list[int], response: str, context: str) -> list[int]:
    """The tokens of one assistant reply after `prompt_ids` (content + end-of-turn), via the template."""
    full = render(tokenizer, prompt + [{"role": "assistant", "content": response}], context=context)
    _check_prefix(prompt_ids, full, context)
    return full[len(prompt_ids) :]


def tokenize_pair(
    tokenizer, record: dict, max_len: int, max_prompt_len: int, context: str, truncation: str = "error"
) -> dict:
    """Prompt, chosen and rejected token ids; responses truncated to fit max_len after the prompt, the prompt
    fitted to max_prompt_len by `truncation` (see `fit_prompt`)."""
    prompt, full_prompt_ids, cut = fit_prompt(tokenizer, record["prompt"], max_prompt_len, context, truncation)
    prompt_ids = full_prompt_ids[cut:]
    room = max_len - len(prompt_ids)
    if room < 1:
        raise DataError(f"{context}: the prompt ({len(prompt_ids)} tokens) leaves no room for a response in {max_len}")
    chosen = tokenize_response(tokenizer, prompt, full_prompt_ids, record["chosen"], context)
    rejected = tokenize_response(tokenizer, prompt, full_prompt_ids, record["rejected"], context)
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen[:room],
        "rejected_ids": rejected[:room],
        "truncated": len(chosen) > room or len(rejected) > room,
    }


def _result(fn: Callable, item: dict, context: str):
    """fn's output, or the DataError it raised."""
    try:
        return fn(item, context)
    except DataError as e:
        return e


def tokenize_all(
    items: list[dict],
    fn: Callable,
    source: str,
    skip_bad_rows: bool,
    num_proc: int | None = None,
    cache_dir: str | None = None,
    dist=None,
) -> Parsed:
    """Tokenize parsed records with `fn(record, context)`, with the same stop-or-skip policy as parsing.

    num_proc (`--num-proc`): 0 = this plain loop, in this process, every run; n >= 1 = `datasets` map with n
    worker processes, cached under `cache_dir` (`--data-cache-dir`, default next to datasets' cache) by a
    fingerprint of the records, the tokenizer, `fn` and what it reads, so a second run reads the tokens back
    (common/prep.py); None = 0 for fewer than 1000 records, else min(8, CPUs). Under torchrun the main rank
    tokenises and the others read its cache. Errors and skips are the plain loop's, in row order.
    """
    from common import prep

    num_proc = prep.default_num_proc(len(items)) if num_proc is None else num_proc
    if num_proc == 0:  # lazily, so that a bad row stops the loop where it is
        results = (_result(fn, item, f"{source}: row {item.get('row', i)}") for i, item in enumerate(items, 1))
    else:
        is_main = dist.is_main if dist is not None else prep._torch_dist()[0]
        started = time.perf_counter()
        results, how = prep.tokenize(items, fn, source, skip_bad_rows, num_proc, cache_dir, dist)
        if is_main:
            print(f"data: {source}: {len(items)} records tokenised, {how}, {time.perf_counter() - started:.1f} s")
    out = Parsed([])
    for result in results:
        if not isinstance(result, DataError):
            out.records.append(result)
        elif not skip_bad_rows:
            raise result
        else:
            out.skipped += 1
            out.errors.append(str(result))
    if not out.records:
        raise DataError(f"{source}: no usable examples after tokenization ({out.skipped} skipped)")
    return out


def tokenize_rows(
    items: list[dict],
    fn: Callable,
    source: str,
    skip_bad_rows: bool,
    truncation: str = "error",
    num_proc: int | None = None,
    cache_dir: str | None = None,
) -> Parsed:
    """`tokenize_all` under --prompt-truncation: with "skip" a prompt over --max-prompt-len drops its row (counted
    with the skipped rows) even without --skip-bad-rows; any other bad row still stops the run unless skipping."""
    if truncation != "skip" or skip_bad_rows:
        return tokenize_all(items, fn, source, skip_bad_rows, num_proc, cache_dir)
    out = tokenize_all(items, fn, source, True, num_proc, cache_dir)
    other = [err for err in out.errors if TOO_LONG not in err]
    if other:
        raise DataError(other[0])
    return out


def tokenize_train_eval(
    train: Parsed, held_out: Parsed, held_out_source: str, fn: Callable, args
) -> tuple[Parsed, Parsed]:
    """The parsed training and held-out rows tokenised by `fn(record, context)` under a script's data flags:
    --skip-bad-rows, --prompt-truncation (scripts without it: "error"), --num-proc and --data-cache-dir."""
    flags = {"truncation": getattr(args, "prompt_truncation", "error"), "num_proc": args.num_proc,
             "cache_dir": args.data_cache_dir}  # fmt: skip
    return (
        tokenize_rows(train.records, fn, train.source, args.skip_bad_rows, **flags),
        tokenize_rows(held_out.records, fn, held_out_source, args.skip_bad_rows, **flags),
    )


def exit_on_data_error() -> None:
    """Make a data error (`DataError`: a bad row, field, file or split) end the run as its one line on stderr
    (file, row, field, what to do), not a traceback: the fix is in the data or the flags, not in the code. The
    exit status stays 1; other errors keep their traceback."""
    import sys

    previous = sys.excepthook

    def hook(kind, error, tb):
        if issubclass(kind, DataError):
            print(f"error: {error}", file=sys.stderr, flush=True)
        else:
            previous(kind, error, tb)

    sys.excepthook = hook


# ---------------------------------------------------------------------------------------------------------------
# Collation and packing
# ---------------------------------------------------------------------------------------------------------------


def pad(seqs: list[list[int]], value: int, side: str = "right", length: int | None = None) -> torch.Tensor:
    """(B, T) LongTensor of `seqs` padded with `value` on `side` to `length` (default: the longest)."""
    length = length or max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
    return out


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift a sequence (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def collate(examples: list[dict], pad_id: int, side: str = "right") -> dict:
    """Padded batch of {"input_ids", "labels"} examples: input_ids, labels, attention_mask, position_ids (B, T)."""
    input_ids = pad([e["input_ids"] for e in examples], pad_id, side)
    labels = pad([e["labels"] for e in examples], IGNORE_INDEX, side)
    attention_mask = pad([[1] * len(e["input_ids"]) for e in examples], 0, side)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
    }


def pack(examples: list[dict], max_len: int) -> list[list[dict]]:
    """Greedy packing in order: consecutive examples share a row while they fit in max_len tokens."""
    rows, row, used = [], [], 0
    for e in examples:
        n = len(e["input_ids"])
        if row and used + n > max_len:
            rows.append(row)
            row, used = [], 0
        row.append(e)
        used += n
    if row:
        rows.append(row)
    return rows


def collate_packed(rows: list[list[dict]], pad_id: int) -> dict:
    """Packed rows: input_ids, labels, position_ids restarting per sample, and segment_ids (B, T).

    segment_ids number the samples of a row from 1 (0 = padding); `model_inputs` turns them into a
    block-diagonal causal mask. Each sample's first label is dropped so no sample is trained to predict
    the start of the next one.
    """
    seqs, labels, positions, segments = [], [], [], []
    for row in rows:
        s, lab, pos, seg = [], [], [], []
        for k, e in enumerate(row, 1):
            n = len(e["input_ids"])
            s += e["input_ids"]
            lab += [IGNORE_INDEX] + e["labels"][1:]
            pos += list(range(n))
            seg += [k] * n
        seqs.append(s)
        labels.append(lab)
        positions.append(pos)
        segments.append(seg)
    return {
        "input_ids": pad(seqs, pad_id),
        "labels": pad(labels, IGNORE_INDEX),
        "position_ids": pad(positions, 0),
        "segment_ids": pad(segments, 0),
    }


def model_inputs(batch: dict, model: torch.nn.Module, device: torch.device) -> dict:
    """The keyword arguments for an HF model call, on `device`.

    Padded batches pass a 2-D attention mask and explicit position ids. Packed batches (with segment_ids)
    pass position ids that restart per sample and a 4-D block-diagonal causal mask: restarting positions
    alone does NOT keep samples apart under sdpa/eager attention. Flash-attention's variable-length path
    instead reads the sample boundaries from the restarting position ids, so it gets no mask.
    """
    out = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device)}
    if "segment_ids" not in batch:
        out["attention_mask"] = batch["attention_mask"].to(device)
        return out
    impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
    if impl.startswith("flash"):
        return out
    seg = batch["segment_ids"].to(device)  # (B, T)
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    same = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    allowed = (same & causal) | torch.eye(T, dtype=torch.bool, device=device)  # padding attends to itself only
    allowed = allowed[:, None]  # (B, 1, T, T)
    if impl == "eager":  # eager adds the mask to the scores: it needs the additive float form
        dtype = next(model.parameters()).dtype
        return out | {
            "attention_mask": torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        }
    return out | {"attention_mask": allowed}


# ---------------------------------------------------------------------------------------------------------------
# Deterministic batching: the examples of optimizer step `step` depend only on (seed, step), so resuming at a
# step reproduces the uninterrupted run, and the global batch is the same whatever the number of ranks.
# ---------------------------------------------------------------------------------------------------------------


def steps_per_epoch(num_items: int, global_batch_size: int) -> int:
    n = num_items // global_batch_size
    if n == 0:
        raise ValueError(f"{num_items} examples are fewer than one global batch of {global_batch_size}")
    return n


def step_indices(num_items: int, global_batch_size: int, step: int, seed: int, shuffle: bool = True) -> list[int]:
    """The global batch of example indices for optimizer step `step` (0-based); drops each epoch's remainder."""
    per_epoch = steps_per_epoch(num_items, global_batch_size)
    epoch, k = divmod(step, per_epoch)
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_items, generator=g).tolist()
    else:
        order = list(range(num_items))
    return order[k * global_batch_size : (k + 1) * global_batch_size]


def micro_batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def resolve_data_path(spec: str, kind: str, dist) -> str:
    """`demo` -> the demo task's jsonl for `kind` (written by the main process); anything else unchanged."""
    if spec != "demo":
        return spec
    from common import demo_task

    if dist.is_main:
        demo_task.ensure_data(kind)
    dist.barrier()
    return str(demo_task.demo_data_path(kind))
