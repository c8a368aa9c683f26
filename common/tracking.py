"""Logging: console, `metrics.jsonl`, optional Weights & Biases, and `eval.json`.

Only rank 0 logs. Other ranks get a `NullTracker` with the same methods, so training loops never branch on
the rank to decide whether to log.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically: a crash mid-write leaves the previous file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Tracker:
    def __init__(self, output_dir: str, args, track: bool = False, project: str = "plainalign", resume_step: int = -1):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._bar = None
        self._start = time.time()
        config = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args)
        if resume_step >= 0:
            self._truncate_after(resume_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh log
        self._file = open(self.metrics_path, "a")
        self.wandb = None
        if track:
            import wandb  # optional: only imported when asked for; WANDB_MODE=offline works

            self.wandb = wandb.init(
                project=project,
                name=config.get("exp_name"),
                config=config,
                dir=str(self.output_dir),
                resume="allow",
            )

    def _truncate_after(self, step: int) -> None:
        """On resume, drop what the killed run logged after its last checkpoint (it will be logged again)."""
        if not self.metrics_path.exists():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", -1) <= step
        ]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def print(self, *parts) -> None:
        msg = " ".join(str(p) for p in parts)
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, metrics: dict, step: int, echo: bool = True) -> None:
        row = {"step": step, "time": round(time.time() - self._start, 3)} | {
            k: _jsonable(v) for k, v in metrics.items()
        }
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
        if echo:
            short = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            self.print(f"[step {step}] {short}")

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A small table (e.g. sample generations): printed, and logged to wandb as a Table."""
        width = 60
        lines = [f"--- {name} (step {step}) ---"]
        for row in rows:
            lines.append(" | ".join(str(c).replace("\n", " ")[:width] for c in row))
        self.print("\n".join(lines))
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def progress(self, total: int, initial: int = 0, desc: str = "train"):
        self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
        return self._bar

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def write_eval(self, metrics: dict) -> None:
        write_json(self.output_dir / "eval.json", {k: _jsonable(v) for k, v in metrics.items()})
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def finish(self) -> None:
        self.close_progress()
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullTracker:
    """What non-zero ranks get: every method exists and does nothing (progress bars are disabled)."""

    def print(self, *parts) -> None:
        pass

    def log(self, metrics: dict, step: int, echo: bool = True) -> None:
        pass

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def progress(self, total: int, initial: int = 0, desc: str = "train"):
        return tqdm(total=total, initial=initial, disable=True)

    def close_progress(self) -> None:
        pass

    def write_eval(self, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        pass


def make_tracker(dist, output_dir: str, args, track: bool = False, project: str = "plainalign", resume_step: int = -1):
    if not dist.is_main:
        return NullTracker()
    return Tracker(output_dir, args, track=track, project=project, resume_step=resume_step)
