"""Checkpoints: a `save_pretrained` directory to hand to the next stage, and `trainer_state/` to resume.

Layout of an output directory (e.g. out/sft):
    config.json, model.safetensors, tokenizer files   the model, loadable by transformers alone
    trainer_state/                                     exact-resume state (see save_trainer_state)
    metrics.jsonl, eval.json                           logs (common.tracking)

Writes are crash-safe. The exported model files are each written beside their target and moved into place
with an atomic rename. `trainer_state/` is written whole into `trainer_state.tmp/`, marked COMPLETE, and
then swapped in (old -> trainer_state.old, tmp -> trainer_state, old deleted); a kill at any moment leaves
either the previous or the new state complete on disk, and `load_trainer_state` finds it.

Resume state is saved with torch.distributed.checkpoint (DCP): every rank writes its own shards of the model
and optimizer, nothing is gathered on one rank, and a checkpoint can be loaded on a different number of ranks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from common.dist import reshard

STATE_DIR = "trainer_state"


def _full_state_dict(model: torch.nn.Module) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_pretrained(model, tokenizer, output_dir: str | Path, dist, config_updates: dict | None = None) -> None:
    """Write `model` (gathered from its shards) and `tokenizer` as an HF directory; collective under torchrun.

    A LoRA model (`common.lora`) is written merged (a plain model) or as peft's adapter directory (--lora-export)."""
    from common import lora

    if lora.is_lora(model):
        model, state_dict = lora.export_model(model, dist)  # collective; the merged model or adapters on rank 0
    else:
        state_dict = _full_state_dict(model)  # every rank takes part in the gather; rank 0 receives it
    if dist.is_main:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        if config_path.exists():  # not in a LoRA adapter directory
            config = json.loads(config_path.read_text())
            # FSDP2 renames the class (FSDPLlamaForCausalLM); transformers must see the real architecture name.
            config["architectures"] = [type(model).__name__.removeprefix("FSDP")]
            config.update(config_updates or {})
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in sorted(tmp.iterdir()):
            os.replace(f, output_dir / f.name)  # atomic per file; the old file stays valid until replaced
        tmp.rmdir()
    dist.barrier()


def _rng_state(generators: dict[str, torch.Generator]) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for k, g in generators.items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])


def _dcp_state(models: dict, optimizers: dict) -> dict:
    """The trainable parameters (and buffers) of each model and its optimizer's state: a LoRA model's frozen base
    weights are not saved, they are reloaded from --model-path (`common.lora`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    for m in models.values():
        reshard(m)
    state = {}
    for k, m in models.items():
        # every name of a frozen tensor: a tied one (lm_head.weight = the embeddings) is listed once by
        # named_parameters(), and ignore_frozen_params misses its second name
        frozen = {n for n, p in m.named_parameters(remove_duplicate=False) if not p.requires_grad}
        full = get_model_state_dict(m, options=StateDictOptions(ignore_frozen_params=True))
        state[f"model.{k}"] = {name: t for name, t in full.items() if name not in frozen}
    for k, opt in optimizers.items():
        state[f"optim.{k}"] = get_optimizer_state_dict(models[k], opt)
    return state


def save_trainer_state(
    output_dir: str | Path,
    dist,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    extra: dict,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Everything needed to continue exactly: model + optimizer shards, RNG per rank, and `extra` (step,
    scheduler state, data position, controllers...). Optimizers are keyed like the model they update."""
    import torch.distributed.checkpoint as dcp

    final = Path(output_dir) / STATE_DIR
    tmp = staging_dir(final, dist)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that a single process "assumes no distributed intent"
        dcp.save(_dcp_state(models, optimizers), checkpoint_id=str(tmp))
    torch.save(_rng_state(generators or {}), tmp / f"rng_rank{dist.rank}.pt")
    dist.barrier()
    if dist.is_main:
        torch.save(extra, tmp / "state.pt")
        (tmp / "COMPLETE").write_text(json.dumps({"world_size": dist.world_size, "step": extra.get("step")}))
        swap_in(final)
    dist.barrier()
    return final


def staging_dir(final: Path, dist) -> Path:
    """`final.tmp`, emptied and created by the main process, for a directory written whole before `swap_in`."""
    tmp = final.with_name(final.name + ".tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def swap_in(final: Path) -> None:
    """Make the complete staging directory `final.tmp` the new `final` (main process): final -> final.old,
    final.tmp -> final, final.old deleted. A kill at any moment leaves a complete directory at `final` or at
    `final.old` (`find_trainer_state` looks there too; distill.py then rebuilds its top-K cache)."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_trainer_state(output_dir: str | Path) -> Path | None:
    """The newest complete trainer state in output_dir (also after a kill in the middle of a swap)."""
    output_dir = Path(output_dir)
    for name in (STATE_DIR, STATE_DIR + ".old"):
        if (output_dir / name / "COMPLETE").exists():
            return output_dir / name
    return None


def load_trainer_state(
    output_dir: str | Path,
    dist,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator] | None = None,
) -> dict:
    """Restore what `save_trainer_state` wrote, in place; returns its `extra` dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = find_trainer_state(output_dir)
    if path is None:
        raise FileNotFoundError(f"--resume: no complete {STATE_DIR}/ in {output_dir} (nothing to resume from)")
    state = _dcp_state(models, optimizers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path))
    for k, m in models.items():
        # dcp.load above failed on any missing trainable key; what is not in the state is the frozen base
        frozen = any(not p.requires_grad for p in m.parameters())
        set_model_state_dict(m, state[f"model.{k}"], options=StateDictOptions(strict=not frozen))
    for k, opt in optimizers.items():
        set_optimizer_state_dict(models[k], opt, state[f"optim.{k}"])
    saved_world = json.loads((path / "COMPLETE").read_text())["world_size"]
    rng_file = path / f"rng_rank{dist.rank}.pt"
    if saved_world == dist.world_size and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False), generators or {})
    else:
        warnings.warn(
            f"resuming on {dist.world_size} ranks from a {saved_world}-rank checkpoint: RNG streams restart",
            stacklevel=2,
        )
    return torch.load(path / "state.pt", weights_only=False)


def save_run(
    output_dir, dist, model, optimizer, scheduler, tokenizer, extra: dict, config_updates=None, generators=None
):
    """Checkpoint of a one-model run: trainer state (model, optimizer, LR schedule, RNG, `extra`) for --resume,
    and the exported HF model beside it. Collective under torchrun."""
    state = extra | {"scheduler": scheduler.state_dict()}
    save_trainer_state(output_dir, dist, {"model": model}, {"model": optimizer}, state, generators)
    export_pretrained(model, tokenizer, output_dir, dist, config_updates)


def resume_run(output_dir, dist, model, optimizer, scheduler, generators=None) -> dict:
    """Restore what `save_run` wrote (the LR schedule included), in place; returns its `extra` dict."""
    state = load_trainer_state(output_dir, dist, {"model": model}, {"model": optimizer}, generators)
    scheduler.load_state_dict(state["scheduler"])
    return state
