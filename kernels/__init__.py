"""Fused log-prob / entropy / KL ops: Triton on CUDA, a chunked PyTorch path elsewhere (see DESIGN.md, Kernels).

Every op has a plain fp32 `*_reference` beside it, the ground truth of tests/test_kernels.py. Choose the path with
`backend="triton" | "torch"` or $PLAINALIGN_KERNEL_BACKEND; `import kernels` works without triton installed.
"""

from ._common import HAS_TRITON
from .full_kl import full_kl, full_kl_reference
from .kl_estimate import kl_estimate
from .selective_logprob import selective_logprob, selective_logprob_reference
from .selective_logprob_from_hidden import selective_logprob_from_hidden, selective_logprob_from_hidden_reference
from .topk_kl import topk_kl, topk_kl_reference, topk_logprob, topk_logprob_reference, topk_of

__all__ = [
    "HAS_TRITON",
    "full_kl",
    "full_kl_reference",
    "kl_estimate",
    "selective_logprob",
    "selective_logprob_from_hidden",
    "selective_logprob_from_hidden_reference",
    "selective_logprob_reference",
    "topk_kl",
    "topk_kl_reference",
    "topk_logprob",
    "topk_logprob_reference",
    "topk_of",
]
