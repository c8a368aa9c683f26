"""Tokenisation that scales: `datasets.Dataset.map` over worker processes, cached on disk under a fingerprint.

`data.tokenize_all(items, fn, source, skip_bad_rows)` calls `tokenize(...)` here. The plain loop (one process, no
cache, `num_proc=0`) tokenises every record again on every run and every rank: ~1.3 ms per short demo row, ~20
minutes per million before the first step. This module instead

- fingerprints everything the tokens depend on: the records (hence the data file and split), the tokenizer (its
  whole backend: vocabulary, merges, normalizer; the chat template; the special and added tokens), the tokenise
  function (its code, the source files of the module it is defined in and of every module it references, and the
  values it reads from its closure and globals: `args.max_seq_len`, the tokenizer ...) and the library versions;
- on a miss, runs `fn` over the records with `Dataset.map(num_proc=...)` and writes the results (token ids, or the
  row's error message) to `<cache dir>/<fingerprint>/` as Arrow files; on a hit, reads them back;
- under torchrun, tokenises on the main rank only while the others wait at a barrier and then read the cache.

Errors are the plain loop's: a worker catches a row's `DataError` and stores its message; the main process then
applies the same stop-or-skip policy in row order, so the first bad row (not the first a worker met) is the one
reported, and `Parsed(records, skipped, errors)` is the plain loop's. A cached run that failed fails again at once.

Why a fingerprint of our own and not `datasets`' hash of the function: datasets hashes a function with dill, which
sees neither the code of library functions it calls (so an edit to `common/data.py` would serve stale tokens) nor a
tokenizer stably (calling a fast tokenizer changes its pickled state). Here what is not understood is pickled, and
what cannot be pickled turns the cache off for that call (a printed note), so the cache can be cold but never stale.
Only attributes actually read from an object are hashed (`args.max_seq_len`, not all of `args`), found in the
bytecode, so a changed learning rate or `--resume` still hits.

The worker processes are forked and read the records and `fn` from this module's memory (nothing is pickled to
them): where the start method is not fork (macOS, Windows) tokenisation runs in one process, still cached.
"""

from __future__ import annotations

import dataclasses
import dis
import functools
import hashlib
import inspect
import json
import os
import pickle
import shutil
import sys
import types
from pathlib import Path
from typing import Callable

FORMAT_VERSION = 1  # bump when the cache layout or the meaning of a cached row changes
SMALL = 1000  # below this many records the plain loop is faster than starting workers and writing a cache
ROWS_PER_WORKER = 500  # the default never starts more workers than records / this


class Uncacheable(Exception):
    """Something `fn` reads cannot be fingerprinted: tokenise without the cache."""


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_digest(path: str | None) -> str:
    """Content hash of a source file ('-' when there is none, e.g. code typed into `python -c`)."""
    if not path or not os.path.isfile(path):
        return "-"
    st = os.stat(path)
    return _file_digest(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def is_tokenizer(obj) -> bool:
    return hasattr(obj, "apply_chat_template") and hasattr(obj, "get_vocab") and hasattr(obj, "convert_ids_to_tokens")


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what a tokenizer's output depends on: the backend (vocabulary, merges, normalizer, pre-tokenizer,
    post-processor; not its truncation/padding state, which calling the tokenizer changes), the chat template, the
    special and added tokens and the class."""
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}\0".encode())
    h.update(json.dumps(tokenizer.chat_template, sort_keys=True, default=str).encode() + b"\0")
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode() + b"\0")
    added = sorted((i, str(t), repr(t)) for i, t in tokenizer.added_tokens_decoder.items())
    h.update(json.dumps(added).encode() + b"\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:  # a slow (Python) tokenizer: its vocabulary and every plain attribute
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(repr(sorted((k, repr(v)) for k, v in vars(tokenizer).items() if not k.startswith("_"))).encode())
    return h.hexdigest()


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _reads(code: types.CodeType) -> dict[str, set[str] | None]:
    """The global and closure names a function's code (nested code included) loads, each with the attributes read
    from it, or None where the object itself is used (passed on, indexed, ...)."""
    out: dict[str, set[str] | None] = {}
    for c in _codes(code):
        instrs = list(dis.get_instructions(c))
        for k, ins in enumerate(instrs):
            if ins.opname not in ("LOAD_GLOBAL", "LOAD_DEREF", "LOAD_NAME", "LOAD_CLASSDEREF"):
                continue
            name = ins.argval
            nxt = instrs[k + 1] if k + 1 < len(instrs) else None
            if nxt is not None and nxt.opname in ("LOAD_ATTR", "LOAD_METHOD"):
                if name not in out:
                    out[name] = set()
                if out[name] is not None:
                    out[name].add(nxt.argval)
            else:
                out[name] = None
    return out


def _code_key(code: types.CodeType) -> str:
    consts = [_code_key(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return repr((code.co_name, code.co_code.hex(), consts, code.co_names, code.co_varnames, code.co_freevars))


class _Hasher:
    def __init__(self):
        self.h = hashlib.sha256()
        self.seen: set[int] = set()

    def feed(self, *parts) -> None:
        for part in parts:
            self.h.update(str(part).encode() + b"\0")

    def value(self, v, attrs: set[str] | None = None) -> None:
        """Feed a value; with `attrs`, only those attributes of it (what the code reads)."""
        if attrs is not None and not isinstance(v, types.ModuleType):
            self.feed("attrs", type(v).__qualname__, sorted(attrs))
            for a in sorted(attrs):
                self.value(getattr(v, a, "<missing>"))
            return
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
            self.feed(type(v).__name__, repr(v))
        elif isinstance(v, (list, tuple, set, frozenset)):
            items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
            self.feed(type(v).__name__, len(items))
            for x in items:
                self.value(x)
        elif isinstance(v, dict):
            self.feed("dict", len(v))
            for key, x in v.items():
                self.value(key)
                self.value(x)
        elif isinstance(v, Path):
            self.feed("path", str(v))
        elif is_tokenizer(v):
            self.feed("tokenizer", tokenizer_fingerprint(v))
        elif isinstance(v, types.ModuleType):
            self.feed("module", v.__name__, file_digest(getattr(v, "__file__", None)))
        elif isinstance(v, type):
            self.feed(
                "class",
                v.__module__,
                v.__qualname__,
                file_digest(getattr(sys.modules.get(v.__module__), "__file__", None)),
            )
        elif callable(v) and (inspect.isfunction(v) or inspect.ismethod(v) or isinstance(v, functools.partial)):
            self.function(v)
        elif dataclasses.is_dataclass(v):
            self.feed("dataclass", type(v).__module__, type(v).__qualname__)
            for f in dataclasses.fields(v):
                self.feed(f.name)
                self.value(getattr(v, f.name))
        else:
            try:
                self.feed("pickle", hashlib.sha256(pickle.dumps(v)).hexdigest())
            except Exception as e:
                raise Uncacheable(f"cannot fingerprint a {type(v).__name__} ({e})") from None

    def function(self, fn) -> None:
        if id(fn) in self.seen:
            self.feed("seen", getattr(fn, "__qualname__", ""))
            return
        self.seen.add(id(fn))
        if isinstance(fn, functools.partial):
            self.feed("partial")
            self.function(fn.func)
            self.value(list(fn.args))
            self.value(dict(fn.keywords))
            return
        if inspect.ismethod(fn):
            self.feed("method")
            self.value(fn.__self__)
            self.function(fn.__func__)
            return
        code = getattr(fn, "__code__", None)
        if code is None:  # a builtin or a C function: its name (its behaviour comes with the library versions)
            self.feed("builtin", getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)))
            return
        self.feed("function", fn.__module__, fn.__qualname__, file_digest(code.co_filename), _code_key(code))
        self.value(fn.__defaults__)
        self.value(fn.__kwdefaults__)
        reads = _reads(code)
        cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
        for name in sorted(reads):
            if name in cells:
                try:
                    obj = cells[name].cell_contents
                except ValueError:  # an empty cell (assigned later)
                    self.feed("empty", name)
                    continue
            elif name in fn.__globals__:
                obj = fn.__globals__[name]
            else:
                continue  # a builtin
            self.feed("read", name)
            self.value(obj, reads[name])


def versions() -> dict[str, str]:
    import datasets
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "datasets": datasets.__version__,
        "format": str(FORMAT_VERSION),
    }


def fingerprint(items: list, fn: Callable, source: str, skip_bad_rows: bool) -> str:
    """What the tokenised result depends on: records (every field, row numbers included), the function with what
    it reads, the source files of common/, the source name (it is in the error messages), the skip policy and the
    library versions.
    Raises `Uncacheable` when part of it cannot be hashed."""
    hasher = _Hasher()
    hasher.feed(json.dumps(versions(), sort_keys=True), source, skip_bad_rows, len(items))
    # every file of common/ (the rendering and tokenising code, and whatever it calls), not only the ones `fn` names
    hasher.feed(*(f"{p.name}:{file_digest(str(p))}" for p in sorted(Path(__file__).parent.glob("*.py"))))
    hasher.function(fn)
    records = hashlib.sha256()
    for item in items:
        try:
            records.update(pickle.dumps(item, protocol=4))
        except Exception as e:
            raise Uncacheable(f"cannot fingerprint a record ({e})") from None
    hasher.feed(records.hexdigest())
    return hasher.h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`<HF_DATASETS_CACHE>/plainalign_tokens`: next to datasets' own cache (~/.cache/huggingface/datasets)."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "plainalign_tokens"


def default_num_proc(num_items: int) -> int:
    """0 (the plain loop) below SMALL records, else min(8, CPUs, records / ROWS_PER_WORKER), at least 1."""
    if num_items < SMALL:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus, num_items // ROWS_PER_WORKER))


def _can_fork() -> bool:
    import multiprocess

    return multiprocess.get_start_method(allow_none=False) == "fork"


# ---------------------------------------------------------------------------------------------------------------
# Tokenising
# ---------------------------------------------------------------------------------------------------------------

_JOB: tuple | None = None  # (items, fn, source) of the running map: forked workers read it from memory


def _map_batch(batch: dict) -> dict:
    """Per record: its pickled output, or its pickled DataError and message (the `error` column)."""
    from common.data import DataError

    items, fn, source = _JOB
    outs, errors = [], []
    for position in batch["position"]:
        item = items[position]
        try:
            outs.append(pickle.dumps(fn(item, f"{source}: row {item.get('row', position + 1)}"), protocol=5))
            errors.append(None)
        except DataError as e:
            try:
                outs.append(pickle.dumps(e, protocol=5))
            except Exception:  # an unpicklable subclass: its message is kept
                outs.append(None)
            errors.append(str(e))
    return {"out": outs, "error": errors}


def _results(outs: list, errors: list) -> list:
    """Unpickled outputs, with each bad row's DataError in its place (rebuilt from the message if need be)."""
    from common.data import DataError

    results = []
    for out, error in zip(outs, errors, strict=True):
        if error is None:
            results.append(pickle.loads(out))
            continue
        try:
            e = pickle.loads(out)
        except Exception:
            e = None
        results.append(e if isinstance(e, DataError) and str(e) == error else DataError(error))
    return results


def _run_map(items: list, fn: Callable, source: str, num_proc: int, directory: Path) -> None:
    """Tokenise into Arrow files under `directory` (written whole elsewhere, then renamed into place)."""
    import datasets

    global _JOB
    datasets.disable_progress_bars()
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    features = datasets.Features({"out": datasets.Value("large_binary"), "error": datasets.Value("large_string")})
    positions = datasets.Dataset.from_dict({"position": list(range(len(items)))})
    _JOB = (items, fn, source)
    try:
        positions.map(
            _map_batch,
            batched=True,
            batch_size=100,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=["position"],
            features=features,
            cache_file_name=str(tmp / "tokens.arrow"),
            load_from_cache_file=False,
        )
    finally:
        _JOB = None
    files = sorted(p.name for p in tmp.glob("tokens*.arrow"))
    (tmp / "done.json").write_text(json.dumps({"files": files, "rows": len(items), "source": source}))
    try:
        tmp.rename(directory)
    except OSError:  # another process finished the same fingerprint first: its result is the same
        shutil.rmtree(tmp, ignore_errors=True)


def _read(directory: Path) -> list | None:
    """The results of a finished cache entry (see `tokenize`), or None when there is none or it is unreadable."""
    import datasets
    import pyarrow as pa

    done = directory / "done.json"
    if not done.is_file():
        return None
    try:
        meta = json.loads(done.read_text())
        tables = [datasets.Dataset.from_file(str(directory / f)).data.table for f in meta["files"]]
        table = pa.concat_tables(tables)
        if table.num_rows != meta["rows"]:
            return None
        return _results(table.column("out").to_pylist(), table.column("error").to_pylist())
    except Exception:
        return None


def _loop(items: list, fn: Callable, source: str) -> list:
    """The plain in-process loop, as results (see `tokenize`)."""
    from common.data import DataError

    results = []
    for i, item in enumerate(items, 1):
        try:
            results.append(fn(item, f"{source}: row {item.get('row', i)}"))
        except DataError as e:
            results.append(e)
    return results


def tokenize(
    items: list,
    fn: Callable,
    source: str,
    skip_bad_rows: bool,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
    dist=None,
    log: Callable[[str], None] = print,
) -> tuple[list, str]:
    """`fn(record, context)` over `items`: (results, how) with, per record in order, its output or the DataError
    it raised; how = "loop", "cached" or "computed" (plus a reason when the cache was off).

    num_proc: None = `default_num_proc`; 0 = the plain loop in this process, no cache; n >= 1: `Dataset.map`
    with up to n processes (one per ROWS_PER_WORKER records at most), cached under `cache_dir` (default
    `default_cache_dir()`).
    """
    num_proc = default_num_proc(len(items)) if num_proc is None else num_proc
    if num_proc < 0:
        raise ValueError(f"--num-proc must be >= 0 (got {num_proc})")
    if num_proc == 0:
        return _loop(items, fn, source), "loop"
    try:
        fp = fingerprint(items, fn, source, skip_bad_rows)
    except Uncacheable as e:
        log(f"data: tokenising {source} without the cache: {e}")
        return _loop(items, fn, source), "loop (uncacheable)"
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = directory / fp
    is_main, barrier = (dist.is_main, dist.barrier) if dist is not None else _torch_dist()
    how = "cached"
    if is_main and not (directory / "done.json").is_file():
        # a worker per ROWS_PER_WORKER records at most: on a small split (a held-out set) start-up would dominate
        workers = max(1, min(num_proc, len(items) // ROWS_PER_WORKER)) if _can_fork() else 1
        _run_map(items, fn, source, workers, directory)
        how = f"computed ({workers} process{'es' if workers > 1 else ''})"
    barrier()
    result = _read(directory)
    if result is None:  # unreadable, or this rank fingerprinted differently: never wrong, just slower
        return _loop(items, fn, source), "loop (cache unreadable)"
    return result, how


def _torch_dist() -> tuple[bool, Callable[[], None]]:
    """(is main rank, barrier) of the default process group, or (True, no-op) outside torchrun."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        return torch_dist.get_rank() == 0, torch_dist.barrier
    return True, lambda: None
