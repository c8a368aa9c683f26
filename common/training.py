"""Training-loop plumbing shared by every script: optimiser and LR schedule, graceful stop on signals, the
non-finite-loss policy, and the argument checks every script repeats. The algorithm (loss, update) stays in
the scripts.
"""

from __future__ import annotations

import math
import signal
from typing import Literal

import torch

Schedule = Literal["cosine", "linear", "constant"]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW; no weight decay on biases and norms (1-D parameters), the usual GPT practice.

    The fused implementation (one kernel per parameter instead of ~10 ops; torch has it for floating-point
    parameters on CPU and CUDA, FSDP2's DTensors included) whenever every parameter qualifies: on a CPU the
    optimizer step of the demo model takes 1.3 ms instead of 4.0. Same update rule, last-bit differences only.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def optimizer_step(model: torch.nn.Module, optimizer, scheduler, max_grad_norm: float) -> float:
    """The end of a training step: clip the gradient norm (0 = no clipping), step the optimizer and the LR
    schedule, clear the gradients. Returns the norm before clipping (logged as train/grad_norm)."""
    grad_norm = grad_norm_clip(model, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def make_scheduler(optimizer, schedule: Schedule, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Linear warmup for `warmup_steps`, then cosine or linear decay to `min_lr_ratio` x lr, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits 0.

    A second SIGINT interrupts at once (for a user who really means it). `requested(dist)` agrees across
    ranks, so every rank stops at the same step.
    """

    def __init__(self):
        self.flag = False
        self.signal_name = None
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        self.signal_name = signal.Signals(signum).name

    def requested(self, dist) -> bool:
        return dist.sum(float(self.flag)) > 0

    def exit_if_requested(self, dist, save, where: str, output_dir, tracker) -> None:
        """If a stop was requested (on any rank): `save()` the checkpoint, say where it is (`where`, e.g. "at step
        12"), close the tracker and the process group, and exit 0. Every script's loop ends with this."""
        if not self.requested(dist):
            return
        save()
        self.exit(dist, where, output_dir, tracker)

    def exit(self, dist, where: str, output_dir, tracker) -> None:
        """The end of a stopped run whose checkpoint is saved: one line naming it, tracker and process group closed."""
        from common.dist import cleanup

        tracker.print(f"{self.signal_name}: checkpoint saved {where} in {output_dir}; resume with --resume")
        tracker.finish()
        cleanup(dist)
        raise SystemExit(0)


class NonFiniteLoss(RuntimeError):
    pass


def nonfinite_step(loss_sum: torch.Tensor, step: int, dist, skip: bool) -> bool:
    """True when this step must be skipped (some rank's loss was NaN/Inf and --skip-nonfinite is on).

    Without --skip-nonfinite, raises an error naming the step: a silent continue would poison the weights.
    All ranks agree, so all skip (or all stop) together.
    """
    bad = dist.sum(float(not torch.isfinite(loss_sum.detach()).all())) > 0
    if bad and not skip:
        raise NonFiniteLoss(
            f"non-finite loss at step {step} (NaN or Inf); pass --skip-nonfinite to skip such steps, or lower the "
            "learning rate / check the data"
        )
    return bad


def grad_norm_clip(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm of the trainable parameters (a LoRA model: the adapters; works on FSDP2's sharded
    DTensor gradients); returns the norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
