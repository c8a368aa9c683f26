"""Top-K distillation: the student's log-probs at the teacher's K token ids, and the KL on that support.

For student logits x (..., V), teacher token ids y (..., K) and temperature T, with z = x / T and
lse = logsumexp(z) over the whole vocabulary:

    s_k = z[y_k] - lse                      (0 where y_k == -100)

`topk_logprob` is that gather of a full-vocabulary log-softmax without a (N, V) fp32 copy: Triton streams each row
once over vocabulary tiles with an online logsumexp; the PyTorch path walks row chunks. Only lse is saved per row;
backward recomputes p tile by tile. `topk_kl` turns s (N, K) and the teacher's log-probs t (N, K) (cached, or from
a live teacher, at the same temperature) into a per-token KL on the top-K support, in plain PyTorch on (N, K):

    mass="renorm"  both distributions renormalised over the K ids (NeMo-Aligner's top-K KD): the mass outside the
                   teacher's top K is dropped, and the student is not pushed on any other token
    mass="tail"    a (K+1)-th bucket holds the rest: 1 - sum_k exp(s_k) and 1 - sum_k exp(t_k) (floored at 1e-10),
                   so the student is also taught how much mass to leave outside the K ids (NeMo-Aligner's "K+1")
    kind="fwd_kl"  KL(teacher || student) = sum_k t'_k (log t'_k - log s'_k)   (mass-covering)
    kind="rev_kl"  KL(student || teacher) = sum_k s'_k (log s'_k - log t'_k)   (mode-seeking)

Entries with y_k == -100 are not part of the support (a row of all -100 has KL 0 and no gradient).
"""

import torch

from ._common import (
    IGNORE_INDEX,
    as_rows,
    check_temperature,
    resolve_backend,
    row_chunks,
    tl,
    torch_chunk_rows,
    triton,
    triton_block_v,
)
from .selective_logprob import _scaled_fp32, _shifted_softmax_sums, flat_grad

TAIL_FLOOR = 1e-10  # the smallest mass the "tail" bucket may have (1 - sum_k p_k rounds to 0 or below in fp32)
KINDS = ("fwd_kl", "rev_kl")
MASSES = ("renorm", "tail")


def topk_logprob_reference(logits, ids, temperature=1.0):
    """Plain fp32 PyTorch: the ground truth of the tests. Materialises the whole (..., V) log-softmax."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    ignore = ids == IGNORE_INDEX
    return logp_all.gather(-1, ids.masked_fill(ignore, 0)).masked_fill(ignore, 0.0)


def topk_kl_reference(logits, ids, teacher_logprobs, temperature=1.0, kind="fwd_kl", mass="renorm"):
    """Plain fp32 PyTorch from a dense log-softmax, written out separately from `topk_kl` (the tests' ground truth)."""
    s = topk_logprob_reference(logits, ids, temperature)  # (..., K)
    t = teacher_logprobs.float()
    keep = ids != IGNORE_INDEX
    s, t = s.masked_fill(~keep, float("-inf")), t.masked_fill(~keep, float("-inf"))
    if mass == "renorm":
        lse_s, lse_t = torch.logsumexp(s, -1, keepdim=True), torch.logsumexp(t, -1, keepdim=True)
        s = s - lse_s.masked_fill(~torch.isfinite(lse_s), 0.0)  # a row with nothing kept stays all -inf
        t = t - lse_t.masked_fill(~torch.isfinite(lse_t), 0.0)
    else:
        s = torch.cat([s, (1 - s.exp().sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR).log()], -1)
        t = torch.cat([t, (1 - t.exp().sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR).log()], -1)
        keep = torch.cat([keep, keep.any(-1, keepdim=True)], -1)
    p, logp, logq = (t, t, s) if kind == "fwd_kl" else (s, s, t)
    prob = p.exp()
    # 0 log 0 = 0; masked_fill rather than where, so that no 0 * (-inf) reaches the gradient either
    return (prob * (logp - logq).masked_fill(~keep | (prob == 0), 0.0)).sum(-1)


@triton.jit
def _topk_logprob_fwd_kernel(
    logits_ptr,  # [N, V] rows at (r // n_inner) * stride_outer + (r % n_inner) * stride_inner
    ids_ptr,  # [N, K]
    logp_ptr,  # [N, K]
    lse_ptr,  # [N]
    n_inner,
    stride_outer,
    stride_inner,
    V,
    K,
    inv_temperature,
    IGNORE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    offs = tl.arange(0, BLOCK_V)

    # Online logsumexp (m = running max, s = sum exp(z - m)); a finite start for m keeps exp(m - m_new) defined
    # when a whole tile is -inf (masked vocabulary padding).
    m = -3.0e38
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    log_s = tl.log(s)
    tl.store(lse_ptr + row, m + log_s)

    k = tl.arange(0, BLOCK_K)
    k_mask = k < K
    ids = tl.load(ids_ptr + row * K + k, mask=k_mask, other=IGNORE)
    in_range = (ids >= 0) & (ids < V)
    x = tl.load(row_ptr + ids, mask=k_mask & in_range, other=0.0).to(tl.float32)
    logp = (x * inv_temperature - m) - log_s
    # An id that is neither in [0, V) nor IGNORE gives NaN: loud, and no out-of-bounds read.
    logp = tl.where(in_range, logp, float("nan"))
    logp = tl.where(ids == IGNORE, 0.0, logp)
    tl.store(logp_ptr + row * K + k, logp, mask=k_mask)


@triton.jit
def _topk_logprob_bwd_kernel(
    logits_ptr,  # [N, V] rows at (r // n_inner) * stride_outer + (r % n_inner) * stride_inner
    grad_logits_ptr,  # [N, V] contiguous rows
    ids_ptr,  # [N, K]
    lse_ptr,  # [N]
    grad_logp_ptr,  # [N, K]
    n_inner,
    stride_outer,
    stride_inner,
    V,
    K,
    inv_temperature,
    IGNORE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    grad_row_ptr = grad_logits_ptr + row * V
    offs = tl.arange(0, BLOCK_V)

    k = tl.arange(0, BLOCK_K)
    k_mask = k < K
    ids = tl.load(ids_ptr + row * K + k, mask=k_mask, other=IGNORE)
    valid = k_mask & (ids != IGNORE) & (ids >= 0) & (ids < V)
    g = tl.where(valid, tl.load(grad_logp_ptr + row * K + k, mask=k_mask, other=0.0), 0.0)
    g_sum = tl.sum(g, axis=0)
    lse = tl.load(lse_ptr + row)

    # d/dz_v sum_k g_k s_k = sum_k g_k onehot(y_k)_v - p_v sum_k g_k. First every column gets -p_v G ...
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        p = tl.exp(tl.load(row_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_temperature - lse)
        tl.store(grad_row_ptr + cols, (-p * g_sum * inv_temperature).to(grad_logits_ptr.dtype.element_ty), mask=mask)
    # ... then the K columns are rewritten whole, -p G + (the sum of g over every k with that id, duplicates
    # included), computed in fp32 and rounded once: adding g to an already rounded bf16 value would round twice.
    # The barrier orders the tile stores above (made by any thread of the program) before these.
    tl.debug_barrier()
    p_k = tl.exp(tl.load(row_ptr + ids, mask=valid, other=-float("inf")).to(tl.float32) * inv_temperature - lse)
    k2 = tl.arange(0, BLOCK_K)
    ids2 = tl.load(ids_ptr + row * K + k2, mask=k2 < K, other=IGNORE)
    g2 = tl.load(grad_logp_ptr + row * K + k2, mask=k2 < K, other=0.0)
    g2 = tl.where((k2 < K) & (ids2 != IGNORE), g2, 0.0)
    same = ids[:, None] == ids2[None, :]  # (BLOCK_K, BLOCK_K)
    g_at = tl.sum(tl.where(same, g2[None, :], 0.0), axis=1)
    grad_k = (g_at - p_k * g_sum) * inv_temperature
    tl.store(grad_row_ptr + ids, grad_k.to(grad_logits_ptr.dtype.element_ty), mask=valid)


def _block_k(K):
    return max(16, triton.next_power_of_2(K))


def _forward_triton(x3, ids, temperature):
    n_outer, n_inner, V = x3.shape
    N, K = ids.shape
    logp = torch.empty(N, K, dtype=torch.float32, device=x3.device)
    lse = torch.empty(N, dtype=torch.float32, device=x3.device)
    _topk_logprob_fwd_kernel[(N,)](
        x3,
        ids,
        logp,
        lse,
        n_inner,
        x3.stride(0),
        x3.stride(1),
        V,
        K,
        1.0 / temperature,
        IGNORE=IGNORE_INDEX,
        BLOCK_V=triton_block_v(V, x3.device),
        BLOCK_K=_block_k(K),
        num_warps=8,
    )
    return logp, lse


def _backward_triton(x3, ids, lse, grad_logp, temperature, out):
    n_outer, n_inner, V = x3.shape
    N, K = ids.shape
    _topk_logprob_bwd_kernel[(N,)](
        x3,
        out,
        ids,
        lse,
        grad_logp,
        n_inner,
        x3.stride(0),
        x3.stride(1),
        V,
        K,
        1.0 / temperature,
        IGNORE=IGNORE_INDEX,
        BLOCK_V=triton_block_v(V, x3.device),
        BLOCK_K=_block_k(K),
        num_warps=8,
    )
    return out


def _forward_torch(x3, ids, temperature):
    n_outer, n_inner, V = x3.shape
    N, K = ids.shape
    logp = torch.empty(N, K, dtype=torch.float32, device=x3.device)
    lse = torch.empty(N, dtype=torch.float32, device=x3.device)
    for r0, r1, chunk in row_chunks(x3, torch_chunk_rows(V, x3.device)):
        d, e, s, m = _shifted_softmax_sums(chunk, temperature)
        del e
        log_s = s.log()  # (C, 1)
        lse[r0:r1] = (m + log_s).squeeze(1)
        y = ids[r0:r1]
        ignore = y == IGNORE_INDEX
        # masked_fill, not clamp: a bad id such as -5 must still make gather raise.
        logp[r0:r1] = (d.gather(1, y.masked_fill(ignore, 0)) - log_s).masked_fill_(ignore, 0.0)
    return logp, lse


def _backward_torch(x3, ids, lse, grad_logp, temperature, out):
    V = x3.shape[-1]
    rows = torch_chunk_rows(V, x3.device)
    inv_t = 1.0 / temperature
    for (r0, r1, chunk), (_, _, out_chunk) in zip(row_chunks(x3, rows), row_chunks(out, rows)):
        logp = _scaled_fp32(chunk, temperature, shift=(lse[r0:r1] * temperature).unsqueeze(1))  # (C, V)
        y = ids[r0:r1]
        ignore = y == IGNORE_INDEX
        g = (grad_logp[r0:r1] * inv_t).masked_fill_(ignore, 0.0)  # (C, K)
        # (sum_k g_k onehot(y_k) - p G) / T, in fp32, rounded once into the output dtype
        grad = torch.exp_(logp).mul_(-g.sum(1, keepdim=True))
        grad.scatter_add_(1, y.masked_fill(ignore, 0), g)
        out_chunk.copy_(grad)
    return out


def flat_ids(ids, leading_shape):
    if ids.shape[:-1] != leading_shape:
        raise ValueError(f"ids have shape {tuple(ids.shape)}, expected {tuple(leading_shape)} + (K,)")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    return ids.reshape(-1, ids.shape[-1]).to(torch.int64).contiguous()


class TopKLogprob(torch.autograd.Function):
    """s_k = z[y_k] - lse for z = x / T, lse = logsumexp(z) over the whole vocabulary, K ids per row.

    Backward, with upstream gradients g_k (zero where y_k == -100) and d/dx = (1/T) d/dz:
        d (sum_k g_k s_k) / dz_v = sum_k g_k onehot(y_k)_v - p_v sum_k g_k
    p is recomputed from x and the saved lse; nothing of size (N, V) is saved but x itself, and the (N, V)
    gradient is written once, in x's dtype.
    """

    @staticmethod
    def forward(ctx, logits, ids, temperature, backend):
        x3 = as_rows(logits)
        y = flat_ids(ids, logits.shape[:-1])
        fn = _forward_triton if backend == "triton" and x3.numel() > 0 and y.numel() > 0 else _forward_torch
        logp, lse = fn(x3, y, temperature)
        ctx.save_for_backward(x3, y, lse)
        ctx.temperature, ctx.backend, ctx.shape = temperature, backend, logits.shape
        return logp.view(ids.shape)

    @staticmethod
    def backward(ctx, grad_logp):
        x3, y, lse = ctx.saved_tensors
        out = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
        g = flat_grad(grad_logp).view(y.shape)
        fn = _backward_triton if ctx.backend == "triton" and x3.numel() > 0 and y.numel() > 0 else _backward_torch
        fn(x3, y, lse, g, ctx.temperature, out)
        return out.view(ctx.shape), None, None, None


def topk_logprob(logits, ids, temperature=1.0, backend=None):
    """Full-vocabulary log-probs (..., K) fp32 of K token ids per position under softmax(logits / temperature).

    logits: (..., V) fp32/bf16/fp16, any strides. ids: (..., K) integer; -100 marks an unused slot (log-prob 0,
    zero gradient). Gradients reach `logits` in its own dtype. Ids outside [0, V) other than -100 raise on the
    PyTorch path and give NaN on the Triton path.
    backend: "triton" | "torch" | None (None: $PLAINALIGN_KERNEL_BACKEND, else Triton on CUDA, PyTorch on CPU).
    """
    backend = resolve_backend(backend, logits)
    temperature = check_temperature(temperature)
    return TopKLogprob.apply(logits, ids, temperature, backend)


def _masked_log_normalise(x, keep):
    """x - logsumexp(x) over the kept entries of each row; dropped entries -inf. A row with none kept gives -inf."""
    x = x.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(x, -1, keepdim=True)
    return x - lse.masked_fill(~keep.any(-1, keepdim=True), 0.0)


def _with_tail(x, keep):
    """Append log(1 - sum_k exp(x_k)), floored at TAIL_FLOOR: the mass outside the K ids, as a (K+1)-th entry."""
    x = x.masked_fill(~keep, float("-inf"))
    rest = (1.0 - x.exp().sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR).log()
    return torch.cat([x, rest], -1), torch.cat([keep, keep.any(-1, keepdim=True)], -1)


def topk_kl(logits, ids, teacher_logprobs, temperature=1.0, kind="fwd_kl", mass="renorm", backend=None):
    """Per-token KL (...,) fp32 between teacher and student on the teacher's top-K support (see the module doc).

    logits: the student's (..., V); ids: (..., K) the teacher's top-K token ids, -100 = unused slot or an ignored
    position (all K); teacher_logprobs: (..., K) the teacher's full-vocabulary log-probs of those ids at the same
    `temperature`. kind: "fwd_kl" = KL(teacher || student), "rev_kl" = KL(student || teacher). mass: "renorm" or
    "tail". Gradients reach `logits` only (the teacher is a constant); no (N, V) fp32 copy is made.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown top-K KL kind {kind!r}; expected one of {KINDS}")
    if mass not in MASSES:
        raise ValueError(f"unknown top-K mass treatment {mass!r}; expected one of {MASSES}")
    if teacher_logprobs.shape != ids.shape:
        raise ValueError(f"teacher_logprobs {tuple(teacher_logprobs.shape)} and ids {tuple(ids.shape)} differ")
    s = topk_logprob(logits, ids, temperature, backend)  # (..., K)
    t = teacher_logprobs.detach().float()
    keep = ids != IGNORE_INDEX
    if mass == "renorm":
        s, t = _masked_log_normalise(s, keep), _masked_log_normalise(t, keep)
    else:
        (s, keep), (t, _) = _with_tail(s, keep), _with_tail(t, keep)
    logp, logq = (t, s) if kind == "fwd_kl" else (s, t)
    # terms where p == 0 (unused slots, or a bucket with no mass) are 0; masked_fill keeps 0 * -inf out of the
    # forward and the gradient
    p = logp.exp()
    dead = ~keep | (p == 0)
    return (p * (logp - logq).masked_fill(dead, 0.0)).masked_fill(dead, 0.0).sum(-1)


@torch.no_grad()
def topk_of(logits, k, temperature=1.0, backend=None):
    """The top-k ids (..., k) and their full-vocabulary log-probs (..., k) fp32 under softmax(logits / T): the
    teacher's side of `topk_kl`, without a (N, V) fp32 copy. Temperature does not change which ids are on top; k is
    capped at V."""
    ids = torch.topk(logits, min(int(k), logits.shape[-1]), dim=-1).indices
    return ids, topk_logprob(logits, ids, temperature, backend)
