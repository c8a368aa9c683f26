"""Plumbing shared by the kernels: the optional Triton import, backend choice, row layout and chunk sizes."""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the chunked PyTorch path still works.
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for `triton` / `triton.language` so the kernel modules still import; never launched."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

# triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when the kernel modules are imported just
# after this one; setting the variable later has no effect on them.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

IGNORE_INDEX = -100
BACKENDS = ("triton", "torch")
BACKEND_ENV = "PLAINALIGN_KERNEL_BACKEND"

# Bytes of fp32 work per chunk of the PyTorch path (a chunk holds a few such temporaries). Smaller chunks use less
# memory but launch more ops, and every op is an OpenMP parallel region. On a quiet machine 0.5-4 MiB all ran
# faster than eager at N=4096, V=32k (2 cores). With more busy threads than cores (other processes; torchrun
# avoids this by setting OMP_NUM_THREADS=1) each region waits for a descheduled thread: at load ~6 on 2 cores the
# forward measured 60x (1 MiB), 17x (4 MiB), 5x (16 MiB) slower than eager. Module constants so tests can shrink them.
TORCH_CHUNK_BYTES_CPU = 4 << 20
TORCH_CHUNK_BYTES_CUDA = 256 << 20


def resolve_backend(backend, tensor):
    """`backend` argument, else $PLAINALIGN_KERNEL_BACKEND, else Triton for CUDA tensors and PyTorch otherwise."""
    name = backend or os.environ.get(BACKEND_ENV) or ("triton" if tensor.is_cuda and HAS_TRITON else "torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend 'triton' was requested but triton is not installed")
        if not tensor.is_cuda and not TRITON_INTERPRETED:
            raise RuntimeError(
                "backend 'triton' on a non-CUDA tensor needs TRITON_INTERPRET=1 set before `kernels` is imported"
            )
    return name


def check_temperature(temperature):
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


def as_rows(x):
    """View x (..., V) as (O, I, V) with unit last stride, copying only when no such view exists.

    Row r of the flattened (N, V) problem sits at x3[r // I, r % I]. Two row strides instead of one let kernels
    read common views like `logits[:, :-1]` (B, T-1, V), whose rows cannot be flattened to one stride, without
    a copy of the whole tensor.
    """
    V = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    inner = x.shape[-2] if x.dim() > 1 else 1
    for shape in ((1, -1, V), (-1, inner, V)):
        try:
            return x.view(shape)
        except RuntimeError:
            pass
    return x.contiguous().view(-1, inner, V)


def as_rows_pair(x, y):
    """as_rows for two tensors of one shape, with a common (O, I, V) so one row index addresses both."""
    x3, y3 = as_rows(x), as_rows(y)
    # as_rows gives (1, N, V) or (N / I, I, V) with I = shape[-2]; a (1, N, V) view can always be split further.
    if x3.shape[0] == 1 and y3.shape[0] != 1:
        x3 = x3.view(y3.shape)
    elif y3.shape[0] == 1 and x3.shape[0] != 1:
        y3 = y3.view(x3.shape)
    return x3, y3


def flat_labels(labels, leading_shape):
    if labels.shape != leading_shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(leading_shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    return labels.reshape(-1).to(torch.int64).contiguous()


def torch_chunk_rows(V, device):
    budget = TORCH_CHUNK_BYTES_CUDA if device.type == "cuda" else TORCH_CHUNK_BYTES_CPU
    return max(1, budget // (4 * V))


def row_chunks(x3, rows):
    """Yield (r0, r1, chunk) over x3 (O, I, V): chunk = rows r0:r1 of the flattened problem, a view of x3."""
    n_outer, n_inner, _ = x3.shape
    for o in range(n_outer):
        for i0 in range(0, n_inner, rows):
            i1 = min(n_inner, i0 + rows)
            yield o * n_inner + i0, o * n_inner + i1, x3[o, i0:i1]


def triton_block_v(V, device):
    """Vocabulary tile. Under the CPU interpreter tiles are small so that tests at V ~ 1k still run several tiles."""
    cap = 4096 if device.type == "cuda" else 512
    return min(cap, triton.next_power_of_2(V))
