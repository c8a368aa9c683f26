"""Fault tests of the online RL scripts -- ppo (also with --adaptive-kl), grpo, rejection_sampling: kill -9 + resume,
SIGTERM, a NaN policy. What each checks, and the runs they use, are in tests/faults.py."""

from __future__ import annotations

import signal

import pytest

from conftest import run_script
from faults import (  # noqa: F401  (one set per file)
    check_kill9_then_resume,
    check_stop_signal,
    files_fixture,
    nan_model_fixture,
    spec,
    uninterrupted_fixture,
)

pytestmark = pytest.mark.slow

SCRIPTS = ["ppo", "grpo", "rejection_sampling"]


@pytest.mark.parametrize("name", [*SCRIPTS, "ppo_adaptive_kl"])
def test_kill9_then_resume_equals_uninterrupted(name, files, uninterrupted, tmp_path):
    check_kill9_then_resume(name, files, uninterrupted, tmp_path)


@pytest.mark.parametrize("name", SCRIPTS)
def test_stop_signal_checkpoints_exits_zero_and_resumes(name, files, uninterrupted, tmp_path):
    check_stop_signal(name, signal.SIGTERM, files, uninterrupted, tmp_path)


def test_ppo_nonfinite_loss(files, nan_model, tmp_path):
    """PPO with a NaN policy: the first update stops with its number, or is skipped and counted."""
    cmd, _ = spec("ppo", files, model=nan_model)
    proc = run_script(*cmd, "--output-dir", str(tmp_path / "stop"), check=False)
    assert proc.returncode != 0 and "non-finite logits at step 0 (rollout)" in proc.stderr


@pytest.mark.parametrize("name", ["grpo", "rejection_sampling"])
def test_online_nonfinite_policy(name, files, nan_model, tmp_path):
    """GRPO / rejection sampling with a NaN policy: the first update stops with its number (it cannot sample)."""
    cmd, _ = spec(name, files, model=nan_model)
    proc = run_script(*cmd, "--output-dir", str(tmp_path / "stop"), check=False)
    assert proc.returncode != 0 and "non-finite logits at update 0 (rollout)" in proc.stderr
