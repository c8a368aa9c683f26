"""bench/gpu_suite.sh --dry-run: the whole prepared GPU check on the CPU at tiny shapes, so that the one call a lent GPU
allows runs code that has already run. Plus its pure helpers: which carried wheels get installed, and the floors."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench import gpu_suite
from conftest import ROOT, script_env

# What the device tool brings back from $OUT: at most 8 files, plain names.
OUT_FILES = {
    "summary.md",
    "summary.json",
    "1_kernel_correctness.md",
    "2_kernel_speed.md",
    "3_ppo_step.md",
    "3_grpo_step.md",
    "4_training.md",
    "logs.tar.gz",
}


def run_suite(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / "out"
    cmd = ["bash", "bench/gpu_suite.sh", str(out), "--dry-run", "--work-dir", str(tmp / "work"), *args]
    env = script_env() | {"PYTHON": sys.executable}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def parts(out: Path) -> dict:
    return {r["part"]: r for r in json.loads((out / "summary.json").read_text())["parts"]}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("gpu_suite"))


def test_dry_run_every_part_passes_and_writes_its_table(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    found = parts(out)
    assert {name: r["status"] for name, r in found.items()} == dict.fromkeys(gpu_suite.PARTS, "passed")
    for name, table in gpu_suite.TABLES.items():
        assert found[name]["table"] == table and (out / table).stat().st_size > 0, name
    assert {p.name for p in out.iterdir()} == OUT_FILES
    # the summary is the last thing printed (the device tool returns the end of the output)
    assert proc.stdout.rstrip().endswith((out / "summary.md").read_text().rstrip())
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/{p}.log" for p in gpu_suite.PARTS} <= names
    assert {"training/sft/metrics.jsonl", "training/grpo/metrics.jsonl", "training/sft_fsdp/metrics.jsonl"} <= names


def test_dry_run_tables(dry_run):
    _, out = dry_run
    correctness = (out / "1_kernel_correctness.md").read_text()
    rows = [line for line in correctness.splitlines() if line.startswith("| ") and not line.startswith("| op")][1:]
    # 4 ops x 2 dtypes x 2 vocabularies; 2 + 3 + 3 + 4 quantities each, and one information row per bf16 from_hidden
    assert len(rows) == 2 * 2 * (2 + 3 + 3 + 4) + 2
    assert all(row.endswith(("| yes |", "| info |")) for row in rows), correctness
    speed = (out / "2_kernel_speed.md").read_text()
    assert "### logprob: N=128, V=1531" in speed and "## Floors" in speed and "## torch.compile rows" in speed
    training = (out / "4_training.md").read_text()
    runs = [line for line in training.splitlines() if line.startswith(("| sft", "| grpo"))]
    assert len(runs) == 3 and all(line.endswith("| ok |") for line in runs), training


def test_part_out_of_time_stops_nothing(tmp_path):
    """A part past its limit is killed and reported; the parts after it still run (setup's failure included)."""
    proc, out = run_suite(tmp_path, "--parts", "correctness,compile", "--limit", "setup=1", "--limit", "correctness=1")
    assert proc.returncode == 1
    found = parts(out)
    assert [(name, r["status"]) for name, r in found.items()] == [
        ("setup", "timed out"),
        ("correctness", "timed out"),
        ("compile", "passed"),
    ]
    assert "stopped at its 1 s limit" in found["correctness"]["headline"]
    assert "| correctness | timed out |" in (out / "summary.md").read_text()


def fake_dist(site: Path, name: str, version: str, requires: list[str]) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"] + [
        f"Requires-Dist: {r}" for r in requires
    ]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def test_needed_extras(tmp_path):
    """A carried if-needed wheel is installed only where the version found misses a requirement."""
    import fsspec

    have = fsspec.__version__
    fake_dist(
        tmp_path / "base",
        "datasets",
        "9.0",
        [
            f"fsspec>={have}",
            "typing-extensions>=99",
            "not-a-package>=1",
            "tyro>=1.0",
            'pyarrow>=99; python_version < "3"',
        ],
    )
    fake_dist(tmp_path / "base", "tyro", "1.0.17", [])
    extras = [
        tmp_path / f"{n}-py3-none-any.whl" for n in (f"fsspec-{have}", "typing_extensions-100.0", "pyarrow-100.0")
    ]
    install, unmet = gpu_suite.needed_extras(extras, [str(tmp_path / "base")])
    assert install == [extras[1]]  # fsspec is satisfied here; pyarrow's requirement does not apply (marker)
    assert unmet == ["datasets 9.0 needs `not-a-package>=1`, found nothing"]


KERNELS_OUTPUT = """# kernels benchmark
- device: NVIDIA H200
- dtype bfloat16, time = min of 5 interleaved rounds, H = 4096 for from_hidden
- measured memory bandwidth (copy, read + write): 4300.0 GB/s

### logprob: N=16384, V=152064 (ideal: fwd 1.16 ms, fwd+bwd 3.48 ms at the measured bandwidth)

| method | fwd ms | fwd+bwd ms | fwd peak extra MiB | fwd+bwd peak extra MiB | fwd+bwd time vs eager |
| --- | ---: | ---: | ---: | ---: | ---: |
| eager | 9.00 | 30.0 | 9500 | 19000 | 1.00x |
| ours (triton) | 1.50 | 4.67 | 0 | 0 | 0.16x |
| liger | skipped: ImportError: no | | | | |

### from_hidden: N=16384, V=152064

| method | fwd ms | fwd+bwd ms | fwd peak extra MiB | fwd+bwd peak extra MiB | fwd+bwd time vs eager |
| --- | ---: | ---: | ---: | ---: | ---: |
| ours (triton) | 50.0 | 200.0 | 10 | 20 | 1.00x |
"""


def test_floor_table():
    """Floors by hand: logprob reads N V bf16 logits once forward (16384 x 152064 x 2 B = 4.983 GB; / 4.8 TB/s =
    1.038 ms) and 3x that with backward (3.114 ms); from_hidden 6 N H V = 6.123e13 FLOP / 989e12 = 61.9 ms."""
    parsed = gpu_suite.parse_kernels_output(KERNELS_OUTPUT)
    assert parsed["device"] == "NVIDIA H200" and parsed["h"] == 4096 and parsed["bandwidth"] == 4.3e12
    assert parsed["tables"][("logprob", 16384, 152064)]["liger"] == {"error": "skipped: ImportError: no"}
    table, headline = gpu_suite.floor_table(parsed)
    assert "| logprob | 16384 | 152064 | 1.04 | 3.11 | 3.48 | 1.5 | 4.67 | 1.50 | — | 30 |" in table
    assert "| from_hidden | 16384 | 152064 | 20.6 | 61.9 | — | 50 | 200 | 3.23 |" in table
    assert headline == "ours fwd+bwd: logprob V=152064 4.67 ms (1.5x floor), from_hidden V=152064 200 ms (3.2x floor)"
    assert gpu_suite.datasheet("NVIDIA H100 80GB HBM3")["bandwidth"] == 3.35e12
    assert gpu_suite.datasheet("NVIDIA H100 PCIe")["bandwidth"] == 2.0e12
    assert gpu_suite.datasheet("Intel Xeon") is None
