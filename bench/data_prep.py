"""Time to the end of data preparation for realistic multi-turn SFT rows: the plain loop vs `datasets` map + cache.

Not a test: prints a markdown table. What is timed is sft.py's step 2 as the script runs it, in a fresh process (so
nothing is warm in memory): read the jsonl (`data.load_rows`), validate every row (`data.parse_rows`), render and
tokenise every conversation with the chat template, assistant turns labelled (`data.tokenize_all` with
`data.tokenize_sft`). The training step that follows costs the same on both sides, so "data ready" is "first step
can start"; interpreter start-up, imports and the tokenizer load are excluded (timed separately: "start-up").

    python bench/data_prep.py                                  # 100k rows, 3 repeats (long on 2 cores)
    python bench/data_prep.py --rows 20000 --repeats 3         # scaled down
    python bench/data_prep.py --num-proc 8                     # the "after" side's --num-proc

Sides: before = `--num-proc 0` (the single-process loop, every run); after = `--num-proc N` (`datasets` map over N
forked workers, written to a fresh cache directory on the first run, read back on the second). Each repeat runs, in
order: before, after (cold cache), after (warm cache), and after with --num-proc 1 (cold cache: what the cache itself
costs, without workers), each in its own child process; the table shows medians.

Data (generated, seeded): conversations with a system turn in 30% of rows, 1-4 user/assistant exchanges, turns of
8-90 words drawn from an English word list with punctuation, numbers and the odd code line, a few hundred tokens a
row. Tokenizer: a byte-level BPE (asked for 8,000 tokens; the word list allows ~1,260) trained here on such text with Qwen2's pre-tokenizer regex, the
ChatML special tokens and Qwen2-Instruct's template (default system prompt), built like tests/test_real_tokenizers.py
does, without downloads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# As in tests/test_real_tokenizers.py: Qwen2's pre-tokenizer regex and Qwen2-Instruct's ChatML template
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<|fim_pad|>"]
WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can about what out up into them "
    "some time could only other new these two may first then do any like my now over such our man me even most made "
    "after also did many before must through years where much your way well down should because each just those "
    "people how too little state good very make world still see own men work long here get both between life being "
    "under never day same another know while last might us great old year off come since against go came right used "
    "take three himself few house use during without again place around however home small found thought went say "
    "part once general high upon school every does got united left number course war until always away something "
    "fact though water less public put think almost hand enough far took head yet government system better set told "
    "nothing night end why called eyes find going look asked later knew point next program city business give group "
    "toward young days let room president side social given present several order national possible rather second "
    "face per among form important often things looked early white case large become john big need four within felt "
    "along children saw best church ever least power development light thing seemed family interest want members "
    "function variable compute answer question explain example result value list string number sort reverse count "
    "compare model training data token language assistant user system prompt response reward policy gradient loss"
).split()


def generate_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def sentence() -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10 ** rng.randint(1, 6))))
        return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!", ":"])

    def turn(lo: int, hi: int) -> str:
        text, target = [], rng.randint(lo, hi)
        while sum(len(s.split()) for s in text) < target:
            text.append(sentence())
        out = " ".join(text)
        if rng.random() < 0.15:
            name = rng.choice(WORDS)
            out += f"\n\n```python\ndef {name}(x):\n    return [v * {rng.randint(2, 9)} for v in x]\n```\n"
        return out

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": turn(8, 30)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": turn(8, 50)})
            messages.append({"role": "assistant", "content": turn(15, 90)})
        rows.append({"messages": messages})
    return rows


def build_tokenizer(path: Path, seed: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=QWEN_SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [m["content"] for row in generate_rows(3000, seed + 1) for m in row["messages"]]
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.save_pretrained(path)


def prepare(args) -> tuple[Path, Path]:
    """The data file and the tokenizer directory (made once, reused)."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / f"rows_{args.rows}_seed{args.seed}.jsonl"
    tok_dir = work / f"tokenizer_seed{args.seed}"
    if not (tok_dir / "tokenizer.json").exists():
        build_tokenizer(tok_dir, args.seed)
    if not data_file.exists():
        tmp = data_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for row in generate_rows(args.rows, args.seed):
                f.write(json.dumps(row) + "\n")
        tmp.rename(data_file)
    return data_file, tok_dir


def child(spec: dict) -> None:
    """One measurement in this fresh process: sft.py's step 2; prints one JSON line."""
    started = time.perf_counter()
    from common import data, models

    tokenizer = models.load_tokenizer(spec["tokenizer"])
    startup = time.perf_counter() - started
    t0 = time.perf_counter()
    rows = data.load_rows(spec["data"])
    t1 = time.perf_counter()
    parsed = data.parse_rows(rows, data.parse_sft, spec["data"])
    t2 = time.perf_counter()
    max_len = spec["max_seq_len"]

    def tok(record, context):
        return data.tokenize_sft(tokenizer, record, max_len, context)

    train = data.tokenize_all(parsed.records, tok, spec["data"], False, spec["num_proc"], spec["cache_dir"])
    t3 = time.perf_counter()
    tokens = sum(len(r["input_ids"]) for r in train.records)
    result = {"startup": startup, "read": t1 - t0, "parse": t2 - t1, "tokenise": t3 - t2, "total": t3 - t0}
    result |= {"rows": len(train.records), "tokens": tokens, "vocab": len(tokenizer)}
    print("RESULT " + json.dumps(result), flush=True)


def run_child(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True, cwd=ROOT
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="conversations to generate and prepare")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side (medians are shown)")
    p.add_argument("--num-proc", type=int, default=None, help="the after side's --num-proc (default: min(8, CPUs))")
    p.add_argument("--max-seq-len", type=int, default=2048, help="sft.py's --max-seq-len")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="out/bench/data_prep", help="data, tokenizer and caches")
    p.add_argument("--note", default="", help="a line for the header (e.g. what else ran on the machine)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))

    from common import prep

    num_proc = args.num_proc or max(1, prep.default_num_proc(10**9))
    load_start = os.getloadavg()
    data_file, tok_dir = prepare(args)
    base = {"data": str(data_file), "tokenizer": str(tok_dir), "max_seq_len": args.max_seq_len}
    one = "after, first run, --num-proc 1"  # the cache's own cost, without parallelism
    runs: dict[str, list[dict]] = {"before": [], "after, first run": [], "after, second run": []}
    if num_proc > 1:
        runs[one] = []
    for r in range(args.repeats):
        cache = Path(args.work_dir) / f"cache_{os.getpid()}_{r}"
        shutil.rmtree(cache, ignore_errors=True)
        runs["before"].append(run_child(base | {"num_proc": 0, "cache_dir": None}))
        runs["after, first run"].append(run_child(base | {"num_proc": num_proc, "cache_dir": str(cache)}))
        runs["after, second run"].append(run_child(base | {"num_proc": num_proc, "cache_dir": str(cache)}))
        shutil.rmtree(cache, ignore_errors=True)
        if num_proc > 1:
            runs[one].append(run_child(base | {"num_proc": 1, "cache_dir": str(cache)}))
            shutil.rmtree(cache, ignore_errors=True)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]['total']:.1f} s" for k, v in runs.items()))
    load_end = os.getloadavg()

    import datasets
    import tokenizers
    import transformers

    first = runs["before"][0]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cmd = "python bench/data_prep.py " + " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
    print(f"# Data preparation: the plain loop vs datasets map + cache ({args.rows} rows)\n")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"- command: `{cmd.strip()}`")
    print(f"- machine: {cpu_name()}, {cpus} CPU cores; OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false in the children")
    print(f"- python {platform.python_version()}, transformers {transformers.__version__}, tokenizers "
          f"{tokenizers.__version__}, datasets {datasets.__version__}")  # fmt: skip
    print(f"- load average at start (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load_start)}; at the end: "
          f"{', '.join(f'{x:.2f}' for x in load_end)}")  # fmt: skip
    if max(load_start[0], load_end[0]) > 0.5 * cpus:
        print("- **the machine was shared with other jobs while this ran** (load average above): timings are noisy")
    if args.note:
        print(f"- note: {args.note}")
    print(f"- data: {first['rows']} SFT conversations, {first['tokens'] / first['rows']:.0f} tokens a row on average "
          f"({first['tokens']} in all), ChatML-templated byte-level BPE ({first['vocab']} tokens), --max-seq-len "
          f"{args.max_seq_len}; after = --num-proc {num_proc}; {args.repeats} repeat(s), medians")  # fmt: skip
    print(
        "- timed: read + parse + tokenise the training rows (sft.py's step 2) in a fresh process, i.e. until the "
        "first training step can start; start-up = interpreter, imports and tokenizer load (not in total)\n"
    )
    cols = ["read", "parse", "tokenise", "total", "startup"]
    print("| | read s | parse s | tokenise s | **data ready s** | start-up s | ms / row (total) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    medians = {}
    for name, rs in runs.items():
        med = {c: statistics.median(r[c] for r in rs) for c in cols}
        medians[name] = med
        print(f"| {name} | {med['read']:.2f} | {med['parse']:.2f} | {med['tokenise']:.2f} | **{med['total']:.2f}** | "
              f"{med['startup']:.2f} | {1000 * med['total'] / first['rows']:.3f} |")  # fmt: skip
    before = medians["before"]["total"]
    print()
    for name in [n for n in runs if n != "before"]:
        print(f"- {name}: {before / medians[name]['total']:.2f}x faster than before to data ready "
              f"(tokenise alone: {medians['before']['tokenise'] / medians[name]['tokenise']:.1f}x)")  # fmt: skip
    print("- every run, in order (data ready s): " + "; ".join(
        f"{name} " + ", ".join(f"{r['total']:.1f}" for r in rs) for name, rs in runs.items()))  # fmt: skip


if __name__ == "__main__":
    main()
