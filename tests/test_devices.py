"""The CPU pin of tests/conftest.py, checked with a faked GPU so that it is checked on CPU-only machines too.

On a GPU machine the scripts would pick CUDA and bf16 (golden and 1e-5 tests would fail) and two torchrun processes
would share one GPU. conftest.py hides CUDA from every script a test runs and from every in-process test not marked
`gpu`; tests marked `gpu` must still see it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT, run_script, script_env


def test_scripts_run_on_the_cpu_where_torch_sees_a_gpu(monkeypatch):
    """run_script's environment hides CUDA even when the test process has CUDA_VISIBLE_DEVICES set, so a script
    picks the CPU: here a stand-in that reports `common.dist.init_distributed`'s choice, run on 2 processes under
    torchrun (gloo on the CPU, not two NCCL ranks on one GPU), with torch faking a GPU unless CUDA_VISIBLE_DEVICES
    is empty (without the pin it picks cuda:0 / cuda:1 and fails to select it)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("PLAINALIGN_FAKE_CUDA", "1")
    proc = run_script("tests/data/device_report.py", nproc=2)
    # two ranks share the pipe: read each report by its marker and braces, not by line
    found = [json.loads(m) for m in re.findall(r"DEVICE_REPORT (\{[^{}]*\})", proc.stdout)]
    expected = [{"rank": r, "device": "cpu", "backend": "gloo", "CUDA_VISIBLE_DEVICES": ""} for r in (0, 1)]
    assert sorted(found, key=lambda r: r["rank"]) == expected


def test_in_process_tests_see_cuda_only_when_marked_gpu(tmp_path):
    """A pytest run with torch faking a GPU (tests/data/fake_cuda_plugin.py): of tests/data/device_pinning_cases.py
    the unmarked test sees no CUDA (and init_distributed picks the CPU), the `gpu` test sees it; and every test of
    test_kernels.py that runs Triton on that GPU (the `triton` cases, the two that use its device, the GPU-scale
    ones) is marked `gpu`, while the pure-CPU ones are not."""
    marks_file = tmp_path / "marks.json"
    env = script_env() | {"PYTHONPATH": str(ROOT / "tests" / "data"), "PLAINALIGN_MARKS_FILE": str(marks_file)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "fake_cuda_plugin", "-p", "no:cacheprovider", "-p", "no:xdist",
           "tests/data/device_pinning_cases.py", "tests/test_kernels.py"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    marked = json.loads(marks_file.read_text())
    on_gpu = ("bad_labels", "backend_choice", "gpu_scale")
    uses_gpu = {t for t in marked if "triton" in t.partition("[")[2] or any(s in t for s in on_gpu)}
    assert len(uses_gpu) >= 30 and len(marked) - len(uses_gpu) >= 30
    assert {t for t, m in marked.items() if m} == uses_gpu
