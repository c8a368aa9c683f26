"""Shared fixtures: the demo tokenizer and tiny model built once per session, and a script runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Without CUDA, the Triton kernels are tested on CPU tensors through Triton's interpreter. triton.jit reads
# TRITON_INTERPRET when a kernel is decorated, i.e. when `kernels` is first imported -- which may be by any test
# module (the scripts import it), so it is set here, before collection, not in test_kernels.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory) -> Path:
    """The demo tokenizer + randomly initialised tiny Llama, as an HF directory."""
    from common.models import ensure_demo_base

    return ensure_demo_base(tmp_path_factory.mktemp("demo") / "base")


@pytest.fixture(scope="session")
def tokenizer(demo_base):
    from common.models import load_tokenizer

    return load_tokenizer(str(demo_base))


def script_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env.pop("PLAINALIGN_KERNEL_BACKEND", None)
    return env


def run_script(script: str, *args: str, nproc: int = 1, timeout: int = 600, check: bool = True):
    """Run a top-level script as a user would (`python x.py` or `torchrun`), from the repository root."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script]
    else:
        cmd = [sys.executable, script]
    proc = subprocess.run(cmd + list(args), cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd + list(args))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
