"""Checkpoints: exact round trip, and a crash at any point of a save leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from common import checkpoint
from common.dist import Dist


def single() -> Dist:
    return Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_restores_model_optimizer_rng_and_extra(tmp_path):
    model, opt = make(0)
    gen = torch.Generator().manual_seed(7)
    checkpoint.save_trainer_state(tmp_path, single(), {"m": model}, {"m": opt}, {"step": 5, "note": "x"}, {"g": gen})
    expected_draw, expected_torch = torch.rand(3, generator=gen), torch.rand(3)
    saved_weights = weights(model)
    other, other_opt = make(1)
    extra = checkpoint.load_trainer_state(tmp_path, single(), {"m": other}, {"m": other_opt}, {"g": gen})
    assert extra == {"step": 5, "note": "x"}
    for k, v in weights(other).items():
        assert torch.equal(v, saved_weights[k])
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3, generator=gen), expected_draw)  # the sampling stream continues exactly
    assert torch.equal(torch.rand(3), expected_torch)  # so does the global one


def test_kill_while_writing_keeps_the_previous_state(tmp_path, monkeypatch):
    model, opt = make(0)
    checkpoint.save_trainer_state(tmp_path, single(), {"m": model}, {"m": opt}, {"step": 1})
    first = weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = torch.save

    def dies_on_state(obj, path, *a, **k):  # the process "dies" after the shards, before the COMPLETE marker
        if str(path).endswith("state.pt"):
            raise KeyboardInterrupt("killed")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", dies_on_state)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_trainer_state(tmp_path, single(), {"m": model}, {"m": opt}, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "trainer_state.tmp").exists() and not (tmp_path / "trainer_state.tmp" / "COMPLETE").exists()
    fresh, fresh_opt = make(3)
    assert checkpoint.load_trainer_state(tmp_path, single(), {"m": fresh}, {"m": fresh_opt})["step"] == 1
    for k, v in weights(fresh).items():
        assert torch.equal(v, first[k])
    # the next save cleans the leftovers and proceeds
    checkpoint.save_trainer_state(tmp_path, single(), {"m": model}, {"m": opt}, {"step": 3})
    assert not (tmp_path / "trainer_state.tmp").exists()
    assert json.loads((tmp_path / "trainer_state" / "COMPLETE").read_text())["step"] == 3


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    """The swap moves the old state aside before moving the new one in; a kill in between leaves only .old."""
    model, opt = make(0)
    checkpoint.save_trainer_state(tmp_path, single(), {"m": model}, {"m": opt}, {"step": 4})
    (tmp_path / "trainer_state").rename(tmp_path / "trainer_state.old")
    assert checkpoint.find_trainer_state(tmp_path) == tmp_path / "trainer_state.old"
    fresh, fresh_opt = make(2)
    assert checkpoint.load_trainer_state(tmp_path, single(), {"m": fresh}, {"m": fresh_opt})["step"] == 4


def test_missing_state_is_a_clear_error(tmp_path):
    model, opt = make(0)
    with pytest.raises(FileNotFoundError, match="--resume: no complete trainer_state/"):
        checkpoint.load_trainer_state(tmp_path, single(), {"m": model}, {"m": opt})


def test_export_is_loadable_and_a_failed_export_leaves_the_old_model(demo_base, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_base)
    checkpoint.export_pretrained(model, tokenizer, tmp_path, single(), {"custom_field": 1})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.custom_field == 1 and loaded.config.architectures == ["LlamaForCausalLM"]
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken)  # dies after the weights were staged
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.export_pretrained(model, tokenizer, tmp_path, single())
    assert (tmp_path / "model.safetensors").read_bytes() == before  # staged in .export.tmp, never moved in
    AutoModelForCausalLM.from_pretrained(tmp_path)
    shutil.rmtree(tmp_path / ".export.tmp")
