"""Run by tests/test_devices.py in a pytest of its own, with tests/data/fake_cuda_plugin.py making torch report a
GPU (not collected by the suite itself: the name does not start with test_)."""

import pytest
import torch

from conftest import script_env


def test_unmarked_sees_no_cuda():
    from common.dist import init_distributed

    assert not torch.cuda.is_available()
    assert init_distributed().device == torch.device("cpu")
    assert script_env()["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.gpu
def test_marked_gpu_sees_cuda():
    assert torch.cuda.is_available()
