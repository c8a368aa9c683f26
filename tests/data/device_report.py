"""A stand-in for a top-level script, for tests/test_devices.py: prints the device `common.dist` picks, as JSON.

With PLAINALIGN_FAKE_CUDA=1 it first makes torch report a GPU unless CUDA_VISIBLE_DEVICES is empty (the CUDA
runtime's rule), so that a missing CPU pin shows on a machine without a GPU: the script then picks CUDA (and a CPU
build of torch fails to select it).
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, as for a top-level script

if os.environ.get("PLAINALIGN_FAKE_CUDA") == "1":
    torch.cuda.is_available = lambda: os.environ.get("CUDA_VISIBLE_DEVICES") != ""

from common.dist import cleanup, init_distributed  # noqa: E402

if __name__ == "__main__":
    dist = init_distributed()
    backend = torch.distributed.get_backend() if dist.enabled else None
    report = {"rank": dist.rank, "device": str(dist.device), "backend": backend}
    line = "DEVICE_REPORT " + json.dumps(report | {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")})
    sys.stdout.write(line + "\n")  # one write: unbuffered print() writes the newline separately, and ranks interleave
    sys.stdout.flush()
    cleanup(dist)
