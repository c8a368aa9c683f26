"""pytest plugin (-p fake_cuda_plugin) for tests/test_devices.py: torch reports one GPU, as on a GPU machine.

Loaded before tests/conftest.py, so the suite's CPU pin is what must hide it from tests not marked `gpu`. With
PLAINALIGN_MARKS_FILE set, the collected tests of tests/test_kernels.py are not run: which of them carry the `gpu`
mark is written to that file as JSON {test id: marked}.
"""

import json
import os

import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1


def pytest_collection_modifyitems(config, items):
    path = os.environ.get("PLAINALIGN_MARKS_FILE")
    if not path:
        return
    kernels = [item for item in items if item.nodeid.startswith("tests/test_kernels.py")]
    with open(path, "w") as f:
        json.dump({item.nodeid: item.get_closest_marker("gpu") is not None for item in kernels}, f)
    items[:] = [item for item in items if item not in kernels]
    config.hook.pytest_deselected(items=kernels)
