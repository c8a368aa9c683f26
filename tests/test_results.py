"""The paired score difference behind the results table's "vs SFT" column and the scripts' "score a -> b" lines."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from conftest import ROOT


def load_results():
    spec = importlib.util.spec_from_file_location("results", ROOT / "examples" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["results"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_paired_difference_by_hand():
    # differences 1, 0, 1: mean 2/3; sample std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = sqrt(1/3); s.e. = std / sqrt(3)
    from common.generation import paired_difference

    mean, se = paired_difference([1.0, 0.5, 0.9], [0.0, 0.5, -0.1])
    assert mean == pytest.approx(2 / 3)
    assert se == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0, 0.0], [1.0])


def test_results_script_uses_the_shared_helper():
    from common.generation import paired_difference

    assert load_results().paired_difference is paired_difference


def test_demo_eval_per_prompt_scores_average_to_the_score(demo_base, tokenizer):
    from common.dist import init_distributed
    from common.generation import demo_eval
    from common.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(str(demo_base), torch.device("cpu"), "float32").eval()
    result = demo_eval(model, tokenizer, init_distributed(), 12, 8, per_prompt=True)
    assert len(result["scores"]) == 12
    assert sum(result["scores"]) / 12 == pytest.approx(result["eval/score"])
    assert "scores" not in demo_eval(model, tokenizer, init_distributed(), 4, 4)
