"""LoRA through `peft`: the flags, adapters on a loaded model, the reference model for free, and the exports.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a weight W and trains a
low-rank update: W x + (alpha / r) B A x, with A (r, in) random and B (out, r) zero at the start, so the adapted
model starts equal to the base. The adapters themselves are `peft`'s (`get_peft_model`), not written here; this
module holds what every script repeats around them:

- `LoraArgs`: the `--lora-*` flags, one nested dataclass that each script's `Args` carries as `lora` (tyro
  shows its fields without a prefix, so the flags read `--lora-r`, not `--lora.lora-r`).
- `apply_lora`: adapters on every linear layer of the decoder blocks (or the named ones, checked against the
  model's linear layers), a trainable copy of a reward/value model's score head, everything else frozen.
- `AdaptersOff`: the policy with its adapters switched off is the starting model, exactly (a disabled LoRA layer
  returns its base layer's output): the frozen reference of DPO/PPO/GRPO without a second copy of the weights.
- `export_model`: what `common.checkpoint.export_pretrained` writes for a LoRA model: the merged model (a plain
  `save_pretrained` directory) or the adapter directory that `peft` loads on the base.
Trainable-parameter selection (optimizer, clipping, trainer_state/) is by `requires_grad`, which `apply_lora`
sets: `common.training.make_optimizer` and `grad_norm_clip` and `common.checkpoint` select by it, so a full
fine-tuning run (everything trainable) goes through the same lines. FSDP2 shards a LoRA model like any other
(`common.dist.wrap_model`, after `apply_lora`) and reduces gradients only of the parameters that have them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Literal

import torch

ADAPTER = "default"  # peft's name of the one adapter


@dataclass
class LoraArgs:
    lora_r: int = 0
    """LoRA rank; 0 = off (full fine-tuning). With r > 0 only the adapters on --lora-target-modules (and a reward or
    value model's score head) are trained, the base weights are frozen, and a reference that is the starting model
    is the same network with its adapters switched off (no second copy is loaded)"""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the update is (alpha / r) B A"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input in train mode; 0 like every dropout here (`common.models.disable_dropout`):
    with it the train-mode forward differs from the no-grad one once B is non-zero (PPO's ratio on the same weights
    is not 1)"""
    lora_target_modules: list[str] | None = None
    """names of the linear layers that get adapters, e.g. `q_proj v_proj`; default: every linear layer of the
    decoder blocks. A name the model has not is an error that lists the names it has"""
    lora_export: Literal["merged", "adapter"] = "merged"
    """what the output directory holds: `merged` = the adapters folded into the weights, a save_pretrained
    directory that plain transformers loads; `adapter` = peft's adapter directory (adapter_config.json +
    adapter_model.safetensors), loaded with `peft.PeftModel.from_pretrained(base, dir)`"""


def enabled(args: LoraArgs) -> bool:
    return args.lora_r > 0


def is_lora(model) -> bool:
    """True for a model that `apply_lora` wrapped (also once FSDP2 has sharded it: its class derives from peft's)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def shares_reference(args: LoraArgs, ref_model_path: str | None, model_path: str) -> bool:
    """True when the reference is the starting model and LoRA is on: then it is the policy with its adapters off."""
    return enabled(args) and ref_model_path in (None, model_path)


REFERENCE_NOTE = "none loaded (LoRA: the policy with its adapters disabled, = the starting model)"


def linear_layer_names(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """The short names (the last part of the module path) of the model's `nn.Linear` layers: (those inside the
    decoder blocks, the others such as lm_head or score), each sorted."""
    from common.dist import decoder_layers

    inside = {n.rsplit(".", 1)[-1] for layer in decoder_layers(model) for n, m in layer.named_modules()
              if isinstance(m, torch.nn.Linear)}  # fmt: skip
    every = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(inside), sorted(every - inside)


def target_modules(model: torch.nn.Module, requested: list[str] | None) -> list[str]:
    """`--lora-target-modules` checked against the model's linear layers; default: every one in the decoder blocks."""
    inside, outside = linear_layer_names(model)
    if requested is None:
        if not inside:
            raise ValueError(f"{type(model).__name__}: no linear layers found in its decoder blocks for LoRA")
        return inside
    unknown = [n for n in requested if n not in inside + outside]
    if unknown:
        listing = ", ".join(inside) + " (decoder blocks)" + (f"; {', '.join(outside)}" if outside else "")
        raise ValueError(
            f"--lora-target-modules {' '.join(unknown)}: not a linear layer of {type(model).__name__}; "
            f"its linear layers are: {listing}"
        )
    return list(requested)


def apply_lora(model: torch.nn.Module, args: LoraArgs, task: Literal["causal_lm", "seq_cls"] = "causal_lm",
               seed: int = 0) -> torch.nn.Module:  # fmt: skip
    """`model` with LoRA adapters (a peft model), or `model` itself when --lora-r is 0. Call before `wrap_model`.

    Only the adapters are trainable; for a sequence classifier (`task="seq_cls"`: reward and value models) also a
    copy of the score head (peft's modules_to_save: a new head must learn, and the adapters alone cannot change
    it). The adapters' random init (A) is drawn from `seed` in a forked RNG, so it is the same on every rank and
    leaves the run's random stream as it was. Prints one line: what is trained, how many parameters.
    """
    if not enabled(args):
        return model
    from peft import LoraConfig, get_peft_model

    if args.lora_r < 0 or args.lora_alpha <= 0 or not 0 <= args.lora_dropout < 1:
        raise ValueError(f"LoRA: need --lora-r >= 0, --lora-alpha > 0, 0 <= --lora-dropout < 1; got {args}")
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules(model, args.lora_target_modules),
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS",
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = get_peft_model(model, config)
    model.lora_export = args.lora_export  # read by common.checkpoint.export_pretrained
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    head = " + score head" if task == "seq_cls" else ""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} dropout={args.lora_dropout:g} on "
              f"{', '.join(sorted(config.target_modules))}{head}: {trainable:,} trainable parameters of {total:,} "
              f"({100 * trainable / total:.2f}%), export {args.lora_export}", flush=True)  # fmt: skip
    return model


class AdaptersOff:
    """The frozen starting model for free: `model` (a LoRA policy, FSDP-sharded or not) called with its adapters
    disabled. A disabled LoRA layer returns its base layer's output unchanged, so this is the base model exactly,
    with no second copy of the weights. Use it where a reference model is called (under `torch.no_grad()`);
    attributes (config, parameters) are the policy's.
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def export_model(model, dist):
    """What to write for a LoRA model: (object with `save_pretrained`, the state dict to pass it, or None); the
    object is None on ranks other than 0. Collective under torchrun (the adapters are gathered from their shards).

    `merged` (the model's `lora_export`): the full state dict is gathered to rank 0's CPU, loaded (without a copy)
    into a skeleton of the same peft model built on the meta device, and peft's `merge_and_unload(safe_merge=True)`
    folds B A into new weight tensors: the training model is not touched (no merge/unmerge round trip) and rank 0
    holds one CPU copy of the weights, as for a full model's export. `adapter`: only the trainable tensors are
    gathered, and peft's adapter files are written (`AdapterExport`).
    """
    from peft import get_peft_model, get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from common.dist import reshard

    mode = getattr(model, "lora_export", "merged")
    reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=mode == "adapter")
    state_dict = get_model_state_dict(model, options=options)
    if not dist.is_main:
        return None, None
    config = copy.deepcopy(model.peft_config[ADAPTER])
    if mode == "adapter":
        return AdapterExport(config, get_peft_model_state_dict(model, state_dict=state_dict)), None
    base = model.get_base_model()
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        skeleton = get_peft_model(type(base)(copy.deepcopy(base.config)), config)
    skeleton.load_state_dict(state_dict, assign=True)
    merged = skeleton.merge_and_unload(safe_merge=True)
    if getattr(merged.config, "tie_word_embeddings", False):
        merged.tie_weights()  # the two keys were assigned as two tensors; tie them again as the base had them
    if getattr(base, "generation_config", None) is not None:  # causal LMs: pad id, EOS ids from --model-path
        merged.generation_config = copy.deepcopy(base.generation_config)
    return merged, None


class AdapterExport:
    """peft's adapter directory: adapter_config.json and adapter_model.safetensors (the tensors named as
    `peft.PeftModel.from_pretrained` expects them)."""

    def __init__(self, config, tensors: dict):
        self.config, self.tensors = config, tensors

    def save_pretrained(self, directory, state_dict=None):
        from safetensors.torch import save_file

        self.config.save_pretrained(str(directory))
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
