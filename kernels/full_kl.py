"""Per-token KL(p || q) over the whole vocabulary, streaming over V.

For logits a (for p) and b (for q), both (..., V), and temperature T: p = softmax(a / T), q = softmax(b / T),

    KL = sum_v p_v (log p_v - log q_v)

Triton keeps two online logsumexps per row (one pass over both inputs); the PyTorch path walks row chunks. Only
lse_p, lse_q and KL are saved per row for backward.
"""

import torch

from ._common import (
    as_rows_pair,
    check_temperature,
    resolve_backend,
    row_chunks,
    tl,
    torch_chunk_rows,
    triton,
    triton_block_v,
)
from .selective_logprob import LOGP_FLOOR, _scaled_fp32, _shifted_softmax_sums, flat_grad


def full_kl_reference(logits_p, logits_q, temperature=1.0):
    """Plain fp32 PyTorch: the ground truth of the tests. Materialises both (..., V) log-softmaxes."""
    logp = torch.log_softmax(logits_p.float() / temperature, dim=-1)
    logq = torch.log_softmax(logits_q.float() / temperature, dim=-1)
    p = logp.exp()
    # Where p == 0 the term is 0 whatever q is; masked_fill (not where) keeps 0 * -inf out of the gradient too.
    return (p * (logp - logq).masked_fill(p == 0, 0.0)).sum(-1)


@triton.jit
def _full_kl_fwd_kernel(
    p_ptr,  # [N, V] logits of p, rows at (r // n_inner) * p_stride_outer + (r % n_inner) * p_stride_inner
    q_ptr,  # [N, V] logits of q, rows likewise with q's strides
    kl_ptr,  # [N]
    lse_p_ptr,  # [N]
    lse_q_ptr,  # [N]
    n_inner,
    p_stride_outer,
    p_stride_inner,
    q_stride_outer,
    q_stride_inner,
    V,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    p_row = p_ptr + outer * p_stride_outer + inner * p_stride_inner
    q_row = q_ptr + outer * q_stride_outer + inner * q_stride_inner
    offs = tl.arange(0, BLOCK_V)

    # Two online logsumexps (m, s per distribution) and t = sum exp(a - m_p) * ((a - m_p) - (b - m_q)), kept
    # relative to the running maxima so KL = t / s_p - log s_p + log s_q needs no difference of large lse values.
    m_p = -3.0e38
    s_p = 0.0
    m_q = -3.0e38
    s_q = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        a = tl.load(p_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_temperature
        b = tl.load(q_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_temperature
        m_p_new = tl.maximum(m_p, tl.max(a, axis=0))
        m_q_new = tl.maximum(m_q, tl.max(b, axis=0))
        alpha_p = tl.exp(m_p - m_p_new)
        alpha_q = tl.exp(m_q - m_q_new)
        d_p = a - m_p_new
        d_q = b - m_q_new
        e_p = tl.exp(d_p)
        # Re-referencing earlier terms to the new maxima adds (m_p - m_p_new) - (m_q - m_q_new) to each bracket.
        shift = (m_p - m_p_new) - (m_q - m_q_new)
        t = alpha_p * (t + s_p * shift) + tl.sum(tl.where(e_p > 0.0, e_p * (d_p - d_q), 0.0), axis=0)
        s_p = s_p * alpha_p + tl.sum(e_p, axis=0)
        s_q = s_q * alpha_q + tl.sum(tl.exp(d_q), axis=0)
        m_p = m_p_new
        m_q = m_q_new

    log_s_p = tl.log(s_p)
    log_s_q = tl.log(s_q)
    tl.store(kl_ptr + row, t / s_p - log_s_p + log_s_q)
    tl.store(lse_p_ptr + row, m_p + log_s_p)
    tl.store(lse_q_ptr + row, m_q + log_s_q)


@triton.jit
def _full_kl_bwd_kernel(
    p_ptr,  # [N, V]
    q_ptr,  # [N, V]
    grad_p_ptr,  # [N, V] contiguous rows
    grad_q_ptr,  # [N, V] contiguous rows
    kl_ptr,  # [N]
    lse_p_ptr,  # [N]
    lse_q_ptr,  # [N]
    grad_kl_ptr,  # [N]
    n_inner,
    p_stride_outer,
    p_stride_inner,
    q_stride_outer,
    q_stride_inner,
    V,
    inv_temperature,
    WRITE_GRAD_P: tl.constexpr,
    WRITE_GRAD_Q: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    p_row = p_ptr + outer * p_stride_outer + inner * p_stride_inner
    q_row = q_ptr + outer * q_stride_outer + inner * q_stride_inner
    offs = tl.arange(0, BLOCK_V)

    kl = tl.load(kl_ptr + row)
    lse_p = tl.load(lse_p_ptr + row)
    lse_q = tl.load(lse_q_ptr + row)
    scale = tl.load(grad_kl_ptr + row) * inv_temperature
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        logp = tl.load(p_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_temperature - lse_p
        logq = tl.load(q_row + cols, mask=mask, other=-float("inf")).to(tl.float32) * inv_temperature - lse_q
        p = tl.exp(logp)
        if WRITE_GRAD_P:
            grad_p = tl.where(p > 0.0, p * (logp - logq - kl), 0.0) * scale
            tl.store(grad_p_ptr + row * V + cols, grad_p.to(grad_p_ptr.dtype.element_ty), mask=mask)
        if WRITE_GRAD_Q:
            grad_q = (tl.exp(logq) - p) * scale
            tl.store(grad_q_ptr + row * V + cols, grad_q.to(grad_q_ptr.dtype.element_ty), mask=mask)


def _forward_triton(a3, b3, temperature):
    n_outer, n_inner, V = a3.shape
    N = n_outer * n_inner
    kl = torch.empty(N, dtype=torch.float32, device=a3.device)
    lse_p = torch.empty_like(kl)
    lse_q = torch.empty_like(kl)
    _full_kl_fwd_kernel[(N,)](
        a3,
        b3,
        kl,
        lse_p,
        lse_q,
        n_inner,
        a3.stride(0),
        a3.stride(1),
        b3.stride(0),
        b3.stride(1),
        V,
        1.0 / temperature,
        BLOCK_V=triton_block_v(V, a3.device),
        num_warps=8,
    )
    return kl, lse_p, lse_q


def _backward_triton(a3, b3, kl, lse_p, lse_q, grad_kl, temperature, grad_a, grad_b):
    n_outer, n_inner, V = a3.shape
    _full_kl_bwd_kernel[(n_outer * n_inner,)](
        a3,
        b3,
        grad_a if grad_a is not None else a3,
        grad_b if grad_b is not None else b3,
        kl,
        lse_p,
        lse_q,
        grad_kl,
        n_inner,
        a3.stride(0),
        a3.stride(1),
        b3.stride(0),
        b3.stride(1),
        V,
        1.0 / temperature,
        WRITE_GRAD_P=grad_a is not None,
        WRITE_GRAD_Q=grad_b is not None,
        BLOCK_V=triton_block_v(V, a3.device),
        num_warps=8,
    )


def _forward_torch(a3, b3, temperature):
    n_outer, n_inner, V = a3.shape
    N = n_outer * n_inner
    kl = torch.empty(N, dtype=torch.float32, device=a3.device)
    lse_p = torch.empty_like(kl)
    lse_q = torch.empty_like(kl)
    rows = torch_chunk_rows(2 * V, a3.device)  # two (C, V) inputs per chunk
    for (r0, r1, a), (_, _, b) in zip(row_chunks(a3, rows), row_chunks(b3, rows)):
        # Floors: d_p only ever meets e_p, which is 0 below LOGP_FLOOR; d_q matters wherever p > 0, so it is only
        # kept finite (the most negative float), which leaves p == 0 entries at 0 * finite = 0.
        d_p, e_p, s_p, m_p = _shifted_softmax_sums(a, temperature)
        d_q, e_q, s_q, m_q = _shifted_softmax_sums(b, temperature)
        del e_q
        d_p.clamp_(min=LOGP_FLOOR)
        d_q.clamp_(min=torch.finfo(torch.float32).min)
        log_s_p, log_s_q = s_p.log(), s_q.log()
        lse_p[r0:r1] = (m_p + log_s_p).squeeze(1)
        lse_q[r0:r1] = (m_q + log_s_q).squeeze(1)
        # KL = sum p (log p - log q) = sum(e_p (d_p - d_q)) / s_p - log s_p + log s_q
        t = d_p.sub_(d_q).mul_(e_p).sum(dim=-1, keepdim=True)
        kl[r0:r1] = (t / s_p - log_s_p + log_s_q).squeeze(1)
    return kl, lse_p, lse_q


def _backward_torch(a3, b3, kl, lse_p, lse_q, grad_kl, temperature, grad_a, grad_b):
    V = a3.shape[-1]
    rows = torch_chunk_rows(2 * V, a3.device)
    out_a = row_chunks(grad_a, rows) if grad_a is not None else None
    out_b = row_chunks(grad_b, rows) if grad_b is not None else None
    for (r0, r1, a), (_, _, b) in zip(row_chunks(a3, rows), row_chunks(b3, rows)):
        logp = _scaled_fp32(a, temperature, shift=(lse_p[r0:r1] * temperature).unsqueeze(1))
        logq = _scaled_fp32(b, temperature, shift=(lse_q[r0:r1] * temperature).unsqueeze(1))
        logp.clamp_(min=LOGP_FLOOR)  # as in forward: p == 0 below it; log q only kept finite
        logq.clamp_(min=torch.finfo(torch.float32).min)
        p = torch.exp(logp)
        scale = (grad_kl[r0:r1] / temperature).unsqueeze(1)  # (C, 1)
        if out_b is not None:
            next(out_b)[2].copy_(torch.exp(logq).sub_(p).mul_(scale))
        if out_a is not None:
            # p (log p - log q - KL), computed as p * (...) first so p == 0 zeroes it before any scaling.
            term = logp.sub_(logq).sub_(kl[r0:r1].unsqueeze(1))
            next(out_a)[2].copy_(p.mul_(term).mul_(scale))


class FullKL(torch.autograd.Function):
    """KL(p || q) = sum_v p_v (log p_v - log q_v), p = softmax(a / T), q = softmax(b / T), per row.

    With log p = a/T - lse_p (so d log p_v / da_k = (delta_vk - p_k) / T), and likewise for q:
        dKL/db_k = -(1/T) sum_v p_v (delta_vk - q_k)                        = (q_k - p_k) / T
        dKL/da_k =  (1/T) sum_v p_v (delta_vk - p_k) (log p_v - log q_v + 1) = p_k (log p_k - log q_k - KL) / T
    (the "+1" terms cancel: sum_v p_v (delta_vk - p_k) = 0). Backward recomputes p and q from the inputs and the
    saved lse_p, lse_q, KL; it writes only the gradients that are needed (a frozen reference gets none).
    """

    @staticmethod
    def forward(ctx, logits_p, logits_q, temperature, backend):
        a3, b3 = as_rows_pair(logits_p, logits_q)
        fn = _forward_triton if backend == "triton" and a3.numel() > 0 else _forward_torch
        kl, lse_p, lse_q = fn(a3, b3, temperature)
        ctx.save_for_backward(a3, b3, kl, lse_p, lse_q)
        ctx.temperature, ctx.backend, ctx.shape = temperature, backend, logits_p.shape
        return kl.view(logits_p.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        a3, b3, kl, lse_p, lse_q = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        grad_a = torch.empty(a3.shape, dtype=a3.dtype, device=a3.device) if need_a else None
        grad_b = torch.empty(b3.shape, dtype=b3.dtype, device=b3.device) if need_b else None
        fn = _backward_triton if ctx.backend == "triton" and a3.numel() > 0 else _backward_torch
        fn(a3, b3, kl, lse_p, lse_q, flat_grad(grad_kl), ctx.temperature, grad_a, grad_b)
        grad_a = grad_a.view(ctx.shape) if need_a else None
        grad_b = grad_b.view(ctx.shape) if need_b else None
        return grad_a, grad_b, None, None


def full_kl(logits_p, logits_q, temperature=1.0, backend=None):
    """Per-token KL(p || q) (...) fp32 for p = softmax(logits_p / T), q = softmax(logits_q / T), both (..., V).

    Gradients flow to whichever input requires them, in that input's dtype. KL is +inf where q has no mass and p
    has; the PyTorch path then returns a huge finite number or inf instead (it clamps log q at the fp32 minimum).
    backend: "triton" | "torch" | None (None: $PLAINALIGN_KERNEL_BACKEND, else Triton on CUDA, PyTorch on CPU).
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logits_p {tuple(logits_p.shape)} and logits_q {tuple(logits_q.shape)} differ in shape")
    backend = resolve_backend(backend, logits_p)
    temperature = check_temperature(temperature)
    return FullKL.apply(logits_p, logits_q, temperature, backend)
