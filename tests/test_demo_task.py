"""The demo task: exact answers, the grader reads back every style, datasets are deterministic and disjoint."""

from __future__ import annotations

import random

import pytest

from common import demo_task as d


def test_solve_and_grade_every_style():
    rng = random.Random(0)
    for _ in range(2000):
        p = d.make_problem(rng)
        assert d.solve(p.prompt) == p.answer
        v, k, wrong = rng.randint(0, 4), rng.randint(0, 4), rng.random() < 0.5
        answer = d.wrong_answer(p, rng) if wrong else p.answer
        assert (answer == p.answer) != wrong
        g = d.grade(p.prompt, d.write_response(p, answer, v, k))
        assert (g["verbosity"], g["politeness"], g["correct"]) == (v, k, float(not wrong))
        assert g["score"] == pytest.approx(0.0 if wrong else 1 - 0.1 * abs(v - 2))


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("Add 4 and 4.", "8", {"score": 0.8, "correct": 1.0, "verbosity": 0, "politeness": 0}),
        ("Add 4 and 4.", "Sure! The answer is 8.", {"score": 0.9, "correct": 1.0, "verbosity": 1, "politeness": 1}),
        ("What is 47 + 8?", "The answer is 54.", {"score": 0.0, "correct": 0.0, "verbosity": 1, "politeness": 0}),
        ("Reverse the letters: t r a p", "p a r t", {"score": 0.8, "correct": 1.0, "verbosity": 0, "politeness": 0}),
        (
            "Which is larger, 318 or 381?",
            "381 Hope this helps. Thanks for asking.",
            {"score": 0.8, "correct": 1.0, "verbosity": 0, "politeness": 2},
        ),
        (
            "Add 4 and 4.",
            "4 plus 4 makes 8. The answer is 8.",
            {"score": 1.0, "correct": 1.0, "verbosity": 2, "politeness": 0},
        ),
        (
            "Count the letter a in b a n a n a.",
            "banana has many letters",
            {"score": 0.0, "correct": 0.0, "verbosity": 1, "politeness": 0},
        ),
    ],
)
def test_grade_known_answers(prompt, response, expected):
    g = d.grade(prompt, response)
    assert {k: g[k] for k in expected} == expected


def test_grade_rejects_foreign_prompts():
    with pytest.raises(ValueError, match="not a demo-task prompt"):
        d.grade("Tell me a joke.", "no")


def test_datasets_are_deterministic_and_eval_prompts_held_out():
    assert d.sft_rows(seed=1, n=50) == d.sft_rows(seed=1, n=50)
    assert d.sft_rows(seed=1, n=50) != d.sft_rows(seed=2, n=50)
    held_out = set(d.eval_prompts(256))
    assert len(held_out) == 256
    for rows in (d.sft_rows(n=3000), d.preference_rows(n=2000), d.prompt_rows(n=2000), d.kto_rows(n=1000)):
        assert not held_out & {r["prompt"] for r in rows}


def test_preference_pairs_follow_the_hidden_utility():
    for r in d.preference_rows(seed=3, n=300):
        assert (
            d.utility(r["prompt"], r["chosen"])
            == r["chosen_reward"]
            > r["rejected_reward"]
            == d.utility(r["prompt"], r["rejected"])
        )


def test_preference_strength_is_the_utility_gap():
    """reward_model.py --loss margin_bt/scaled_bt read it: 0.8-1.0 for a right-vs-wrong pair, 0.1-0.2 for style."""
    rows = d.preference_rows(seed=3, n=300)
    for r in rows:
        assert r["strength"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"], abs=1e-6)
    assert {r["strength"] for r in rows} == {0.1, 0.2, 0.8, 0.9, 1.0}  # rounded: no 0.09999999999999998


def test_preference_pairs_cover_each_kind():
    """Correctness at a fixed style, style among right answers, and right-in-a-worse-style over wrong-in-a-better."""
    kinds = {"correctness": 0, "style": 0, "trade_off": 0}
    off = lambda g: abs(g["verbosity"] - d.IDEAL_VERBOSITY)  # noqa: E731
    for r in d.preference_rows(seed=3, n=600):
        c, w = d.grade(r["prompt"], r["chosen"]), d.grade(r["prompt"], r["rejected"])
        assert c["correct"] == 1
        if w["correct"]:
            assert off(c) < off(w)
            kinds["style"] += 1
        elif c["verbosity"] == w["verbosity"]:
            kinds["correctness"] += 1
        else:
            assert off(c) > off(w)
            kinds["trade_off"] += 1
    assert all(n > 100 for n in kinds.values()), kinds


def test_sft_rows_are_imperfect_demonstrations():
    grades = [d.grade(r["prompt"], r["completion"]) for r in d.sft_rows(seed=0, n=4000)]
    wrong = sum(g["correct"] == 0 for g in grades) / len(grades)
    assert 0.2 < wrong < 0.3  # wrong_fraction = 0.25
    assert {g["verbosity"] for g in grades} == {0, 1, 2, 3, 4}


def test_attribute_and_kto_rows():
    row = d.attribute_rows(seed=0, n=5)[0]
    g = d.grade(row["messages"][0]["content"], row["messages"][1]["content"])
    assert row["attributes"] == {
        "correctness": g["correctness"],
        "verbosity": g["verbosity"],
        "politeness": g["politeness"],
    }
    for r in d.kto_rows(seed=0, n=200):
        g = d.grade(r["prompt"], r["completion"])
        assert r["label"] == bool(g["correct"] and abs(g["verbosity"] - 2) <= 1)
