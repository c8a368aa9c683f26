"""Shared fixtures: the demo tokenizer and tiny model built once per session, a script runner, and the CPU pin.

CPU pin: the suite's numbers (golden losses, 1e-5 parity, 2-process torchrun runs) are CPU fp32 numbers, while the
scripts pick CUDA (and bf16) whenever `torch.cuda.is_available()`. So on a machine with a GPU:
- every subprocess (`script_env`, hence `run_script`) gets CUDA_VISIBLE_DEVICES="" and sees no GPU, so two
  torchrun processes never share one GPU and a script runs exactly as on a CPU-only machine;
- every in-process test not marked `gpu` sees `torch.cuda.is_available() == False` (`cpu_unless_marked_gpu`),
  so code that chooses its device (`common.dist.init_distributed`) chooses the CPU;
- tests marked `gpu` see CUDA as it is, use it explicitly, and are skipped where there is none.
tests/test_devices.py checks all three with a faked CUDA, so that they are checked on CPU-only machines too.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
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


# The slowest files first (serial seconds on the 2-core machine, 2026-12-02). With `--dist loadfile` xdist hands the
# files out in collection order, so the long ones start early on both workers and the short ones fill the end; in
# alphabetical order two long files could start last on one worker.
SLOWEST_FIRST = ["test_real_shapes.py", "test_real_shapes_llama.py", "test_faults_supervised.py", "test_dpo.py", "test_faults_online.py",
                 "test_gpu_suite.py", "test_steerlm.py", "test_grpo.py", "test_sft.py", "test_distill.py",
                 "test_rejection_sampling.py", "test_spin.py", "test_ppo.py", "test_reward_model.py", "test_bf16.py"]  # fmt: skip


def pytest_collection_modifyitems(config, items):
    """Files in SLOWEST_FIRST order, the rest after them as collected; `gpu` tests need CUDA: skipped without it (the
    marker's meaning in pyproject.toml)."""
    rank = {name: k for k, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Tests not marked `gpu` run as on a CPU-only machine: torch reports no CUDA to the code they call."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


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
    """The environment of every script a test runs: one thread, offline, default kernels, and no GPU (see above)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env["CUDA_VISIBLE_DEVICES"] = ""  # an empty list hides every GPU from the CUDA runtime: the scripts pick the CPU
    env.pop("PLAINALIGN_KERNEL_BACKEND", None)
    return env


class ScriptServer:
    """The warm interpreter of tests/script_server.py, one per test process: `python SCRIPT ARGS` as a fork of a
    process that has already imported torch, transformers and the project (~5 s saved per run; the suite is mostly
    such runs). PLAINALIGN_TEST_FORK=0 runs every script as a plain subprocess instead."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "script_server.py"), str(ROOT)], cwd=ROOT,
                                     env=script_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], timeout: int, tmp: Path) -> subprocess.CompletedProcess:
        out, err = tmp / "stdout", tmp / "stderr"
        self.proc.stdin.write(json.dumps({"argv": argv, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:  # as subprocess.run: kill the run, then raise
            os.kill(pid, signal.SIGKILL)
            self.proc.stdout.readline()
            raise subprocess.TimeoutExpired(argv, timeout)
        returncode = json.loads(self.proc.stdout.readline())["returncode"]
        return subprocess.CompletedProcess(
            argv, returncode, out.read_text(errors="replace"), err.read_text(errors="replace")
        )


_server: ScriptServer | None = None


def run_script(script: str, *args: str, nproc: int = 1, timeout: int = 600, check: bool = True):
    """Run a top-level script as a user would (`python x.py` or `torchrun`), from the repository root, on the CPU.
    One process: a fork of the warm `ScriptServer` (the same command, environment, exit status and output)."""
    global _server
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script]
    else:
        cmd = [sys.executable, script]
    if nproc == 1 and os.environ.get("PLAINALIGN_TEST_FORK", "1") != "0":
        if _server is None or _server.proc.poll() is not None:
            _server = ScriptServer()
        with tempfile.TemporaryDirectory() as tmp:
            proc = _server.run([script, *args], timeout, Path(tmp))
    else:
        proc = subprocess.run(
            cmd + list(args), cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout
        )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd + list(args))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
