"""`common.dist` plumbing that the 2-process script tests do not pin down by themselves."""

from __future__ import annotations

import pytest
import torch


def test_cleanup_under_torchrun_tears_down_then_exits_without_finalisation(monkeypatch):
    """`common.dist.cleanup` with a process group: barrier, destroy, flush stdout/stderr, then `os._exit(0)` (the
    interpreter's finalisation is where gloo could abort a finished run); without one it does nothing."""
    from common import dist as dist_module

    calls = []
    monkeypatch.setattr(dist_module.torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist_module.torch_dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist_module.torch_dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(dist_module.sys.stdout, "flush", lambda: calls.append("flush stdout"))
    monkeypatch.setattr(dist_module.sys.stderr, "flush", lambda: calls.append("flush stderr"))

    def fake_exit(status):
        calls.append(f"exit {status}")
        raise SystemExit(status)  # the real os._exit never returns

    monkeypatch.setattr(dist_module.os, "_exit", fake_exit)
    enabled = dist_module.Dist(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    with pytest.raises(SystemExit):
        dist_module.cleanup(enabled)
    assert calls == ["barrier", "destroy", "flush stdout", "flush stderr", "exit 0"]
    calls.clear()
    dist_module.cleanup(dist_module.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert calls == []
