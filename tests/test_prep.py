"""Tokenisation through `datasets` map with a fingerprint cache (common/prep.py): a second run reads the cache and
calls no tokenise function; any change to the data, the tokenizer (template, special tokens) or the settings the
function reads misses; the records, skips and error messages are the plain loop's, also from worker processes."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading

import pytest

from common import data, demo_task, prep


@dataclasses.dataclass
class Args:
    max_seq_len: int = 48
    learning_rate: float = 1e-5


def records(n: int = 40, first_row: int = 1) -> list[dict]:
    rows = demo_task.sft_rows(seed=3, n=n)
    return data.parse_rows(rows, data.parse_sft, "f.jsonl", line_numbers=range(first_row, first_row + n)).records


def sft_fn(tokenizer, args):
    def tok(record, context):
        return data.tokenize_sft(tokenizer, record, args.max_seq_len, context)

    return tok


@pytest.fixture(autouse=True)
def small_workers(monkeypatch):
    """Tiny test data still reaches forked workers (the default starts one per 500 records)."""
    monkeypatch.setattr(prep, "ROWS_PER_WORKER", 1)


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of data.tokenize_sft in this process (a hit makes none; a module is fingerprinted by its
    source file, so the patch does not change the fingerprint)."""
    calls = []
    real = data.tokenize_sft

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(data, "tokenize_sft", counting)
    return calls


def test_second_call_is_a_cache_hit(tokenizer, tmp_path, counted, capsys):
    items, fn = records(), sft_fn(tokenizer, Args())
    plain = data.tokenize_all(items, fn, "f.jsonl", False, num_proc=0)
    assert len(counted) == len(items)
    first = data.tokenize_all(items, fn, "f.jsonl", False, num_proc=1, cache_dir=str(tmp_path))
    assert len(counted) == 2 * len(items) and "computed" in capsys.readouterr().out
    second = data.tokenize_all(items, fn, "f.jsonl", False, num_proc=1, cache_dir=str(tmp_path))
    assert len(counted) == 2 * len(items), "the second call tokenised again"
    assert "cached" in capsys.readouterr().out
    assert plain.records == first.records == second.records
    # a later run with another number of workers reads the same entry
    data.tokenize_all(items, fn, "f.jsonl", False, num_proc=2, cache_dir=str(tmp_path))
    assert len(counted) == 2 * len(items)


def test_every_change_misses(tokenizer):
    items, args = records(), Args()
    base = prep.fingerprint(items, sft_fn(tokenizer, args), "f.jsonl", False)
    assert prep.fingerprint(items, sft_fn(tokenizer, Args()), "f.jsonl", False) == base  # same inputs: same key
    # a setting the function does not read (learning rate, --resume ...) keeps the key
    assert prep.fingerprint(items, sft_fn(tokenizer, Args(learning_rate=1.0)), "f.jsonl", False) == base
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = tokenizer.chat_template.replace("<|end|>", " <|end|>", 1)
    special = copy.deepcopy(tokenizer)
    special.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    one_row = copy.deepcopy(items)
    one_row[7]["messages"][-1]["content"] += "!"
    changed = {
        "template": prep.fingerprint(items, sft_fn(templated, args), "f.jsonl", False),
        "special token": prep.fingerprint(items, sft_fn(special, args), "f.jsonl", False),
        "max length": prep.fingerprint(items, sft_fn(tokenizer, Args(max_seq_len=49)), "f.jsonl", False),
        "one row": prep.fingerprint(one_row, sft_fn(tokenizer, args), "f.jsonl", False),
        "row order": prep.fingerprint(items[::-1], sft_fn(tokenizer, args), "f.jsonl", False),
        "function": prep.fingerprint(items, lambda r, c: data.tokenize_sft(tokenizer, r, 48, c), "f.jsonl", False),
        "skip policy": prep.fingerprint(items, sft_fn(tokenizer, args), "f.jsonl", True),
        "source": prep.fingerprint(items, sft_fn(tokenizer, args), "g.jsonl", False),
    }
    assert all(fp != base for fp in changed.values()), [k for k, fp in changed.items() if fp == base]
    assert len(set(changed.values())) == len(changed)


def test_a_changed_max_length_retokenises(tokenizer, tmp_path):
    items = records()
    short = data.tokenize_all(items, sft_fn(tokenizer, Args(max_seq_len=30)), "f", False, 1, str(tmp_path))
    long = data.tokenize_all(items, sft_fn(tokenizer, Args(max_seq_len=60)), "f", False, 1, str(tmp_path))
    assert max(len(r["input_ids"]) for r in short.records) <= 30 < max(len(r["input_ids"]) for r in long.records)
    assert long.records == data.tokenize_all(items, sft_fn(tokenizer, Args(max_seq_len=60)), "f", False, 0).records


def test_unfingerprintable_reads_run_uncached(tokenizer, tmp_path, capsys):
    lock = threading.Lock()  # cannot be pickled, so cannot be hashed

    def fn(record, context):
        with lock:
            return data.tokenize_sft(tokenizer, record, 48, context)

    items = records(10)
    got = data.tokenize_all(items, fn, "f", False, num_proc=1, cache_dir=str(tmp_path))
    assert "without the cache" in capsys.readouterr().out
    assert got.records == data.tokenize_all(items, fn, "f", False, num_proc=0).records
    assert not any(tmp_path.iterdir())


def bad_rows(n: int = 40) -> list[dict]:
    """File rows 109, 131 and 137 (a held-out tail's numbering: positions 9, 31, 37) have no assistant token within
    48 tokens: two of them in the second worker's half."""
    items = records(n, first_row=101)
    for k in (8, 30, 36):
        items[k]["messages"][0]["content"] = "padding " * 60
    return items


def test_errors_and_skips_equal_the_plain_loop_in_workers(tokenizer, tmp_path):
    items, fn = bad_rows(), sft_fn(tokenizer, Args())
    with pytest.raises(data.DataError) as plain:
        data.tokenize_all(items, fn, "f.jsonl", False, num_proc=0)
    assert str(plain.value).startswith("f.jsonl: row 109: no assistant token left within --max-seq-len 48")
    # in this process, in two forked workers, and from the cache (a failed run fails again at once)
    for num_proc, cache in ((1, "one"), (2, "two"), (2, "two")):
        with pytest.raises(data.DataError) as mapped:
            data.tokenize_all(items, fn, "f.jsonl", False, num_proc=num_proc, cache_dir=str(tmp_path / cache))
        assert str(mapped.value) == str(plain.value)
    plain_skip = data.tokenize_all(items, fn, "f.jsonl", True, num_proc=0)
    for num_proc, cache in ((1, "one"), (2, "two"), (2, "two")):
        skip = data.tokenize_all(items, fn, "f.jsonl", True, num_proc=num_proc, cache_dir=str(tmp_path / cache))
        assert dataclasses.asdict(skip) == dataclasses.asdict(plain_skip)
    assert plain_skip.skipped == 3 and [e.split(":")[1] for e in plain_skip.errors] == [
        " row 109",
        " row 131",
        " row 137",
    ]


def test_all_rows_bad_is_the_same_error(tokenizer, tmp_path):
    items = records(2)
    for item in items:
        item["messages"][0]["content"] = "padding " * 60
    fn = sft_fn(tokenizer, Args())
    with pytest.raises(data.DataError) as plain:
        data.tokenize_all(items, fn, "f", True, num_proc=0)
    with pytest.raises(data.DataError) as mapped:
        data.tokenize_all(items, fn, "f", True, num_proc=2, cache_dir=str(tmp_path))
    assert str(mapped.value) == str(plain.value) == "f: no usable examples after tokenization (2 skipped)"


def test_default_workers():
    assert prep.default_num_proc(prep.SMALL - 1) == 0  # tiny data: the plain loop, process start-up would dominate
    assert prep.default_num_proc(prep.SMALL) >= 1
    assert prep.default_num_proc(10**7) <= 8


class TooLong(data.DataError):
    """A DataError subclass (as a reason for skipping might be): it comes back from a worker as itself."""


def test_error_subclasses_come_back_as_raised(tokenizer, tmp_path):
    def fn(record, context):
        if record["row"] == 5:
            raise TooLong(f"{context}: too long")
        return data.tokenize_sft(tokenizer, record, 48, context)

    for num_proc in (0, 2, 2):
        with pytest.raises(TooLong, match=r"^f: row 5: too long$"):
            data.tokenize_all(records(), fn, "f", False, num_proc=num_proc, cache_dir=str(tmp_path))


def test_other_ranks_read_the_main_ranks_cache(tokenizer, tmp_path, counted):
    """In-process stand-in for torchrun (the 2-process run is below): a non-main rank after the barrier reads the
    main rank's entry without tokenising, and tokenises itself when there is none (never a wrong result)."""
    from types import SimpleNamespace

    items, fn = records(), sft_fn(tokenizer, Args())
    main = SimpleNamespace(is_main=True, barrier=lambda: None)
    waited = []

    def barrier():  # the main rank prepares while this one waits
        waited.append(len(counted))
        data.tokenize_all(items, fn, "f", False, 1, str(tmp_path), main)

    other = SimpleNamespace(is_main=False, barrier=barrier)
    got = data.tokenize_all(items, fn, "f", False, 1, str(tmp_path), other)
    assert waited == [0], "the non-main rank tokenised before the barrier"
    assert len(counted) == len(items) and got.records == data.tokenize_all(items, fn, "f", False, 0).records
    lone = SimpleNamespace(is_main=False, barrier=lambda: None)
    assert data.tokenize_all(items, fn, "f", False, 1, str(tmp_path / "empty"), lone).records == got.records


TWO_RANKS = """
import json, sys
sys.path.insert(0, {root!r})
from common import data, demo_task, models
from common.dist import cleanup, init_distributed

dist = init_distributed()
tokenizer = models.load_tokenizer({base!r})
items = data.parse_rows(demo_task.sft_rows(seed=3, n=40), data.parse_sft, "f").records
calls = []
real = data.tokenize_sft
data.tokenize_sft = lambda *a: calls.append(1) or real(*a)
out = data.tokenize_all(items, lambda r, c: data.tokenize_sft(tokenizer, r, 48, c), "f", False, 1, {cache!r})
sys.stdout.write("REPORT " + json.dumps({{"rank": dist.rank, "calls": len(calls), "records": out.records}}) + "\\n")
sys.stdout.flush()
cleanup(dist)
"""


def test_torchrun_main_rank_prepares_the_other_reads(demo_base, tmp_path):
    from conftest import ROOT, run_script

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(root=str(ROOT), base=str(demo_base), cache=str(tmp_path / "cache")))
    proc = run_script(str(script), nproc=2, timeout=300)
    reports = {}
    for line in proc.stdout.splitlines():
        if line.startswith("REPORT "):
            report = json.loads(line[len("REPORT ") :])
            reports[report["rank"]] = report
    assert sorted(reports) == [0, 1], proc.stdout[-2000:]
    assert reports[0]["calls"] == 40 and reports[1]["calls"] == 0
    assert reports[0]["records"] == reports[1]["records"]
