"""The built-in demo task: small instruction tasks with programmatic ground truth.

Every method in PlainAlign is measured on this task, so that "alignment worked" means "the model answers
more questions correctly, in the preferred style", graded by a program, not "the loss went down".

Four task families, each with an exact answer:
    add      "What is 42 + 5?"                                   -> "47"   (no carry)
    compare  "Which is larger, 318 or 381?"                      -> "381"
    reverse  "Reverse the letters: t r a p"                      -> "p a r t"
    count    "How many times does the letter a appear in b a n a n a?" -> "3"

Each answer can be written in 5 verbosity levels x 5 politeness levels, correctly or wrongly:
    verbosity 0  "47"
    verbosity 1  "The answer is 47."
    verbosity 2  "42 plus 5 makes 47. The answer is 47."
    verbosity 3  "Let me work this out. 42 plus 5 makes 47. The answer is 47."
    verbosity 4  "Let me work this out step by step. ... I checked this carefully, so I am confident. The answer ..."
    politeness k adds the first k of the markers POLITE_MARKERS ("Sure!", "Happy to help.", ...).

The hidden utility (what a human labeller would prefer) is `score`: 0 for a wrong or unreadable answer,
otherwise 1 - 0.1 * |verbosity - 2|. So correct beats wrong, and among correct answers a brief worked answer
(level 2) beats both a bare number and rambling; politeness is neutral. The preferred style is also the one
that helps a small model: writing the working out before the answer is a chain of thought (the demo SFT model
answers ~0.5 right after "Let me work this out." and ~0.3 after "The answer is"), so a method that learns the
preferred style gains accuracy too, while one that mistakes "short" for "good" loses it. From one seed the module makes:
    - SFT rows: imperfect demonstrations (a fraction wrong, verbosity and politeness uniform),
    - preference pairs ranked by the hidden utility (with per-response rewards for reward-aware losses),
    - KTO rows (one completion, desirable or not), prompt rows (PPO), attribute-labelled rows (SteerLM),
    - held-out evaluation prompts that never occur in the training data,
and `grade(prompt, response)` grades any generated text: score, correct, verbosity, politeness.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

TASKS = ("add", "compare", "reverse", "count")
ATTRIBUTES = ("correctness", "verbosity", "politeness")  # SteerLM's guiding signals, each 0..4
IDEAL_VERBOSITY = 2
POLITE_MARKERS = ("Sure!", "Happy to help.", "Hope this helps.", "Thanks for asking.")
LETTERS = "abcdefghijklmnoprstu"  # 20 letters: enough variety, few enough for a tiny model to master

# Prompt phrasings per task. `solve` parses these, so any prompt of the family can be graded.
_PROMPTS = {
    "add": ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}."],
    "compare": ["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"],
    "reverse": ["Reverse the letters: {w}", "Write {w} backwards."],
    "count": ["How many times does the letter {c} appear in {w}?", "Count the letter {c} in {w}."],
}
_EXPLAIN = {
    "add": "{a} plus {b} makes {ans}",
    "compare": "Of {a} and {b}, the larger is {ans}",
    "reverse": "Reading {w} backwards gives {ans}",
    "count": "The letter {c} appears in {w} {ans} times",
}
_PARSERS = [
    (
        "add",
        re.compile(r"^(?:What is (\d+) \+ (\d+)\?|Compute (\d+) \+ (\d+)\.|Add (\d+) and (\d+)\.)$"),
    ),
    ("compare", re.compile(r"^(?:Which is larger, (\d+) or (\d+)\?|Which number is bigger: (\d+) or (\d+)\?)$")),
    ("reverse", re.compile(r"^(?:Reverse the letters: ([a-z](?: [a-z])*)|Write ([a-z](?: [a-z])*) backwards\.)$")),
    (
        "count",
        re.compile(
            r"^(?:How many times does the letter ([a-z]) appear in ([a-z](?: [a-z])*)\?"
            r"|Count the letter ([a-z]) in ([a-z](?: [a-z])*)\.)$"
        ),
    ),
]


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str
    fields: dict  # the operands, used to write explanations and wrong answers


def _spaced(letters: str) -> str:
    return " ".join(letters)


def make_problem(rng: random.Random) -> Problem:
    task = rng.choice(TASKS)
    template = rng.choice(_PROMPTS[task])
    if task == "add":
        # two digits + one, without a carry: the one-digit addition table is what a ~1M-parameter model (and a
        # reward model made from it) can learn in minutes; with carries both stay near chance
        a = rng.randint(1, 9) * 10 + rng.randint(0, 8)
        b = rng.randint(1, 9 - a % 10)
        fields, answer = {"a": a, "b": b}, str(a + b)
    elif task == "compare":
        a, b = rng.sample(range(10, 1000), 2)
        fields, answer = {"a": a, "b": b}, str(max(a, b))
    elif task == "reverse":
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        fields, answer = {"w": _spaced(word)}, _spaced(word[::-1])
    else:
        c = rng.choice(LETTERS[:4])  # a small alphabet so the asked letter actually occurs
        word = "".join(rng.choice(LETTERS[:4]) for _ in range(rng.randint(3, 5)))
        fields, answer = {"c": c, "w": _spaced(word)}, str(word.count(c))
    return Problem(task, template.format(**fields), answer, fields)


def solve(prompt: str) -> str | None:
    """The exact answer to any prompt of the task family (None if the prompt is not one of ours)."""
    prompt = prompt.strip()
    for task, pattern in _PARSERS:
        m = pattern.match(prompt)
        if m is None:
            continue
        groups = [g for g in m.groups() if g is not None]
        if task == "add":
            return str(int(groups[0]) + int(groups[1]))
        if task == "compare":
            return str(max(int(groups[0]), int(groups[1])))
        if task == "reverse":
            return _spaced(groups[0].replace(" ", "")[::-1])
        return str(groups[1].split().count(groups[0]))
    return None


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A clear mistake: the tens digit off, the smaller number, the letters not reversed, a count off by 2+.

    Mistakes a checker can see without redoing the whole computation keep the hidden utility learnable by a
    ~1M-parameter reward model in minutes; near misses (off by one) left it near chance on add and count.
    """
    f = problem.fields
    if problem.task == "add":
        return str(int(problem.answer) + rng.choice([-20, -10, 10, 20]))
    if problem.task == "compare":
        return str(min(f["a"], f["b"]))
    if problem.task == "reverse":
        if f["w"] != problem.answer:
            return f["w"]
        letters = problem.answer.split()  # a palindrome: reversing changes nothing, so drop a letter
        return _spaced("".join(letters[:-1]))
    truth = int(problem.answer)
    return str(rng.choice([c for c in range(0, 7) if abs(c - truth) >= 2]))


def write_response(problem: Problem, answer: str, verbosity: int, politeness: int) -> str:
    """Render `answer` in a given style; `grade` reads the style back from the text."""
    explain = _EXPLAIN[problem.task].format(ans=answer, **problem.fields)
    core = [
        answer,
        f"The answer is {answer}.",
        f"{explain}. The answer is {answer}.",
        f"Let me work this out. {explain}. The answer is {answer}.",
        f"Let me work this out step by step. {explain}. I checked this carefully, so I am confident. "
        f"The answer is {answer}.",
    ][verbosity]
    head = [m for m in POLITE_MARKERS[:politeness] if m in ("Sure!", "Happy to help.")]
    tail = [m for m in POLITE_MARKERS[:politeness] if m not in head]
    return " ".join(head + [core] + tail)


def _strip_markers(text: str) -> tuple[str, int]:
    found = 0
    for marker in POLITE_MARKERS:
        if marker.lower() in text.lower():
            found += 1
            text = re.sub(re.escape(marker), " ", text, flags=re.IGNORECASE)
    return " ".join(text.split()), found


def measure_verbosity(text: str) -> int:
    """0..4 from the word count without politeness markers; a run of spaced letters counts as one word."""
    core, _ = _strip_markers(text)
    core = re.sub(r"\b[a-z](?: [a-z]\b)+", "W", core)  # "t r a p" -> one word
    n = len(core.split())
    return 0 if n <= 2 else 1 if n <= 6 else 2 if n <= 12 else 3 if n <= 19 else 4


def extract_answer(text: str) -> str:
    """The final answer: what follows the last "answer is", else the whole text without politeness."""
    core, _ = _strip_markers(text)
    idx = core.lower().rfind("answer is ")
    if idx >= 0:
        core = core[idx + len("answer is ") :]
    return core.strip().rstrip(".").strip()


def grade(prompt: str, response: str) -> dict:
    """Ground truth for one generated response: score (hidden utility in [0,1]), correct, attributes."""
    truth = solve(prompt)
    if truth is None:
        raise ValueError(f"not a demo-task prompt: {prompt!r}")
    correct = extract_answer(response) == truth
    verbosity = measure_verbosity(response)
    _, politeness = _strip_markers(response)
    return {
        "score": (1.0 - 0.1 * abs(verbosity - IDEAL_VERBOSITY)) if correct else 0.0,
        "correct": float(correct),
        "correctness": 4 if correct else 0,
        "verbosity": verbosity,
        "politeness": politeness,
    }


def utility(prompt: str, response: str) -> float:
    return grade(prompt, response)["score"]


# ---------------------------------------------------------------------------------------------------------------
# Datasets. All generators are pure functions of (seed, n); evaluation prompts are disjoint from training ones.
# ---------------------------------------------------------------------------------------------------------------


def _problems(seed: int, n: int, exclude: frozenset[str] = frozenset(), distinct: bool = False) -> list[Problem]:
    """n problems from `seed`, none of whose prompts is in `exclude`; `distinct` also forbids repeats.

    Training sets may repeat a prompt (with another answer): forbidding it would exhaust the small `add`
    family and skew the task mix. Evaluation prompts are distinct, and excluded from every training set.
    """
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        p = make_problem(rng)
        if p.prompt in exclude or (distinct and p.prompt in seen):
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


EVAL_SEED = 10_000  # evaluation prompts come from their own stream and are excluded from every training set


def eval_prompts(n: int = 256) -> list[str]:
    return [p.prompt for p in _problems(EVAL_SEED, n, distinct=True)]


_EVAL_EXCLUDED = frozenset(eval_prompts(1024))  # every evaluation uses a prefix of these 1024 prompts


def _train_problems(seed: int, n: int) -> list[Problem]:
    return _problems(seed, n, exclude=_EVAL_EXCLUDED)


def _style(rng: random.Random, wrong_fraction: float) -> tuple[bool, int, int]:
    return rng.random() >= wrong_fraction, rng.randint(0, 4), rng.randint(0, 4)


def sft_rows(seed: int = 0, n: int = 30_000, wrong_fraction: float = 0.25) -> list[dict]:
    """Imperfect demonstrations: `wrong_fraction` of answers are wrong, verbosity and politeness uniform."""
    rng = random.Random(seed + 1)
    rows = []
    for p in _train_problems(seed, n):
        correct, v, k = _style(rng, wrong_fraction)
        answer = p.answer if correct else wrong_answer(p, rng)
        rows.append({"prompt": p.prompt, "completion": write_response(p, answer, v, k)})
    return rows


def attribute_rows(seed: int = 0, n: int = 20_000, wrong_fraction: float = 0.25) -> list[dict]:
    """SFT rows in messages form with rule-computed attributes (SteerLM's guiding signals)."""
    rows = []
    for r in sft_rows(seed, n, wrong_fraction):
        g = grade(r["prompt"], r["completion"])
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["completion"]},
                ],
                "attributes": {a: g[a] for a in ATTRIBUTES},
            }
        )
    return rows


def _off_style(v: int) -> int:
    return abs(v - IDEAL_VERBOSITY)


def preference_rows(seed: int = 0, n: int = 20_000, style_fraction: float = 0.3) -> list[dict]:
    """Pairs of two answers to one prompt, chosen = the higher hidden utility, of three kinds:
        correctness pairs  the same style, one answer right and one wrong: chosen = right;
        trade-off pairs    a right answer against a wrong one in a better style: chosen = right (being correct
                           outweighs any amount of style);
        style pairs        both right, one nearer the preferred verbosity (politeness drawn for each): chosen =
                           the nearer.
    Same-style pairs isolate correctness, so a small reward model can learn it at all; the trade-off pairs fix
    its scale against style. Without them it learns style (the easy signal) with a larger weight than
    correctness, and PPO against it trades accuracy for style. `chosen_reward`/`rejected_reward` are the
    utilities, for reward-aware losses; `strength` is their gap (rounded to 6 decimals), the preference strength
    of reward_model.py's margin_bt/scaled_bt losses: 0.8-1.0 for a right-vs-wrong pair, 0.1-0.2 for a style pair.
    """
    rng = random.Random(seed + 2)
    rows = []
    for p in _train_problems(seed + 1, n):
        kind = rng.random()
        if kind < style_fraction:
            v1, v2 = rng.sample(range(5), 2)
            while _off_style(v1) == _off_style(v2):  # a tie is no preference
                v1, v2 = rng.sample(range(5), 2)
            a = write_response(p, p.answer, v1, rng.randint(0, 4))
            b = write_response(p, p.answer, v2, rng.randint(0, 4))
        elif kind < style_fraction + (1 - style_fraction) / 2:
            v, k = rng.randint(0, 4), rng.randint(0, 4)
            a, b = write_response(p, p.answer, v, k), write_response(p, wrong_answer(p, rng), v, k)
        else:
            v = rng.choice([u for u in range(5) if _off_style(u) > 0])
            better = [u for u in range(5) if _off_style(u) < _off_style(v)]
            k = rng.randint(0, 4)
            a = write_response(p, p.answer, v, k)
            b = write_response(p, wrong_answer(p, rng), rng.choice(better), k)
        (c, uc), (r, ur) = sorted([(a, utility(p.prompt, a)), (b, utility(p.prompt, b))], key=lambda x: -x[1])
        rows.append(
            {
                "prompt": p.prompt,
                "chosen": c,
                "rejected": r,
                "chosen_reward": uc,
                "rejected_reward": ur,
                "strength": round(uc - ur, 6),  # computed, not drawn: the rng stream and other fields are unchanged
            }
        )
    return rows


def kto_rows(seed: int = 0, n: int = 10_000) -> list[dict]:
    """Unpaired rows: desirable = correct and verbosity within 1 of the ideal (a human would approve), else not."""
    rng = random.Random(seed + 3)
    rows = []
    for p in _train_problems(seed + 1, n):
        correct, v, k = _style(rng, 0.5)
        completion = write_response(p, p.answer if correct else wrong_answer(p, rng), v, k)
        rows.append({"prompt": p.prompt, "completion": completion, "label": bool(correct and _off_style(v) <= 1)})
    return rows


def prompt_rows(seed: int = 0, n: int = 10_000) -> list[dict]:
    return [{"prompt": p.prompt} for p in _train_problems(seed + 2, n)]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def all_texts(seed: int = 0, n: int = 4000) -> list[str]:
    """Text covering every prompt and response style, to train the demo tokenizer on."""
    rng = random.Random(seed + 4)
    texts = []
    for p in _problems(seed + 5, n, distinct=True):
        v, k = rng.randint(0, 4), rng.randint(0, 4)
        texts += [p.prompt, write_response(p, p.answer, v, k), write_response(p, wrong_answer(p, rng), v, k)]
    return texts


DEMO_DATA_DIR = Path("out/demo/data")
# Bumped whenever a generator above changes, so that data cached by an older version is never read again.
# 4: preference pairs carry `strength` (every other set, and every other field of the pairs, as in version 3).
DEMO_DATA_VERSION = 4
_DEMO_SETS = {
    "sft": lambda: sft_rows(),
    "preference": lambda: preference_rows(),
    "kto": lambda: kto_rows(),
    "prompts": lambda: prompt_rows(),
    "attributes": lambda: attribute_rows(),
}


def demo_data_path(kind: str, directory: str | Path = DEMO_DATA_DIR) -> Path:
    if kind not in _DEMO_SETS:
        raise ValueError(f"unknown demo dataset {kind!r}; one of {sorted(_DEMO_SETS)}")
    return Path(directory) / f"{kind}.v{DEMO_DATA_VERSION}.jsonl"


def ensure_data(kind: str, directory: str | Path = DEMO_DATA_DIR) -> Path:
    """Write (once) the demo dataset `kind` as jsonl, so every script reads data the way a user's is read."""
    path = demo_data_path(kind, directory)
    if not path.exists():
        write_jsonl(_DEMO_SETS[kind](), path)
    return path
