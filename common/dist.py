"""Distributed plumbing: one code path for `python script.py` and `torchrun --nproc_per_node N script.py`.

The mode is read from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). With one process there is
no process group at all and every collective below is the identity, so single-process runs stay simple and
fast. With several, CPU runs use gloo and CUDA runs nccl, and models are sharded with FSDP2 (`fully_shard`).
"""

from __future__ import annotations

import os
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as torch_dist

MixedPrecision = Literal["auto", "bf16", "off"]
"""`--mixed-precision`: bf16 compute with fp32 master weights; `auto` = bf16 on CUDA, off on CPU"""


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mixed_precision: bool | None = None
    """bf16 compute (autocast on one process, FSDP2's MixedPrecisionPolicy on several); None = on CUDA only"""

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda" if self.mixed_precision is None else self.mixed_precision

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (sum, max, min, or mean); returns the tensor."""
        if self.enabled:
            if op == "mean":
                torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
                tensor /= self.world_size
            else:
                torch_dist.all_reduce(tensor, op=getattr(torch_dist.ReduceOp, op.upper()))
        return tensor

    def sum(self, value: float | int) -> float:
        return self.all_reduce(torch.tensor(float(value), dtype=torch.float64, device=self.device)).item()

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=src)
        return box[0]

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of a list whose length is a multiple of world_size."""
        n = exact_div(len(items), self.world_size, "items to shard across ranks")
        return items[self.rank * n : (self.rank + 1) * n]


def exact_div(a: int, b: int, what: str = "value") -> int:
    """a // b, raising when b does not divide a (batch-size arithmetic must never silently round)."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{what}: {a} is not divisible by {b}")
    return a // b


def init_distributed(mixed_precision: MixedPrecision = "auto") -> Dist:
    """The process's rank and device from torchrun's environment (one process without it), and its precision."""
    if mixed_precision not in ("auto", "bf16", "off"):
        raise ValueError(f"--mixed-precision {mixed_precision!r}: use auto, bf16 or off")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    bf16 = device.type == "cuda" if mixed_precision == "auto" else mixed_precision == "bf16"
    return Dist(rank, world_size, local_rank, device, bf16)


def cleanup(dist: Dist) -> None:
    """End of a run on every rank: wait until all ranks are here, tear the process group down, and, under torchrun,
    leave at once with exit status 0 (the run's outputs are saved and its files closed by then).

    Without the barrier a rank that finishes first destroys its end of gloo's connections while another is still
    tearing down. Even with it, a rank aborted now and then at interpreter exit, after the run had saved everything
    ("terminate called without an active exception": twice in some hundreds of 2-process test runs, the second on a
    loaded machine with the barrier in place), and torchrun then reports the whole job as failed. The abort comes from
    C++ objects that outlive `destroy_process_group` (FSDP's device mesh keeps its process groups) being destroyed
    during interpreter finalisation; `os._exit` skips that finalisation. stdout and stderr are flushed first."""
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def seed_everything(seed: int) -> None:
    """The same seed on every rank: model initialisation and data order must agree across ranks."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sampling_generator(seed: int, dist: Dist) -> torch.Generator:
    """A per-rank generator for sampling (rollouts, SPIN generations): ranks must not draw the same tokens."""
    g = torch.Generator(device=dist.device)
    g.manual_seed(seed * 1000 + dist.rank + 1)
    return g


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of an HF model (every architecture names them `...DecoderLayer` or `...Block`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is not None:
        return list(layers)
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]


def wrap_model(
    model: torch.nn.Module,
    dist: Dist,
    mixed_precision: bool | None = None,
    activation_checkpointing: bool = False,
    trainable: bool = True,
) -> torch.nn.Module:
    """FSDP2 on several processes (one `fully_shard` per decoder block, then the root); plain model on one.

    `mixed_precision` (default: `dist.bf16`, i.e. `--mixed-precision`, bf16 on CUDA under `auto`) computes in bf16
    with fp32 master weights and fp32 gradient reduction. Frozen models (reference, reward) get `trainable=False`: sharded the same way, eval mode,
    no gradients.
    """
    if activation_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    if not dist.enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision is None:
        mixed_precision = dist.bf16
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def autocast(dist: Dist):
    """bf16 autocast for single-process runs with `dist.bf16` (FSDP's mixed precision covers multi-process ones).

    On CPU too when asked (`--mixed-precision bf16`): CPU autocast runs matmuls in bf16 with fp32 accumulation, as
    CUDA does, so tests check the bf16 path on machines without a GPU."""
    enabled = dist.bf16 and not dist.enabled
    return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16, enabled=enabled)


def reshard(model: torch.nn.Module) -> None:
    """Put an FSDP2 model's parameters back in sharded form (a no-op without FSDP).

    After a forward, FSDP2's root module keeps its parameters unsharded, expecting a backward. After a no-grad
    forward (evaluation, reference log-probs) none comes; a state dict taken then (checkpoint) or an optimizer
    built then would see the unsharded tensors instead of the sharded parameters.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextmanager
def gathered_for_generation(model: torch.nn.Module):
    """Unshard an FSDP2 model once for a whole generation, instead of all-gathering at every token.

    Outside FSDP this does nothing. Inside, every sharded module is unsharded and told not to reshard after
    forward, so the token-by-token loop runs on full parameters with no collectives; on exit the parameters
    are resharded and the training-time behaviour restored.
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules:
        yield model
        return
    blocks = [m for m in fsdp_modules if m is not model]  # the root never reshards after forward anyway
    for m in fsdp_modules:
        m.unshard()
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in blocks:
            m.set_reshard_after_forward(True, recurse=False)
        for m in fsdp_modules:
            m.reshard()
