"""Log-probabilities of chosen tokens (and the entropy of the same distribution) without a (N, V) softmax.

For logits x (..., V), labels y (...) and temperature T, with z = x / T and lse = logsumexp(z):

    logp = z[y] - lse                     (0 where y == -100)
    H    = -sum_v p_v log p_v = lse - sum_v p_v z_v,   p = softmax(z)

Triton streams each row once over vocabulary tiles with an online logsumexp; the PyTorch path walks row chunks.
Both keep only lse (and H) per row for backward, which recomputes p tile by tile / chunk by chunk.
"""

import torch

from ._common import (
    IGNORE_INDEX,
    as_rows,
    check_temperature,
    flat_labels,
    resolve_backend,
    row_chunks,
    tl,
    torch_chunk_rows,
    triton,
    triton_block_v,
)

# log p below this has p == 0 exactly in fp32 (exp underflows below about -104), so clamping log p here changes no
# result but turns -inf (masked vocabulary entries) into a finite number: 0 * (-inf) would be NaN.
LOGP_FLOOR = -1.0e4


def selective_logprob_reference(logits, labels, temperature=1.0, return_entropy=False):
    """Plain fp32 PyTorch: the ground truth of the tests. Materialises the whole (..., V) log-softmax."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    ignore = labels == IGNORE_INDEX
    picked = logp_all.gather(-1, labels.masked_fill(ignore, 0).unsqueeze(-1)).squeeze(-1)
    logp = picked.masked_fill(ignore, 0.0)
    if not return_entropy:
        return logp
    p = logp_all.exp()
    # masked_fill rather than where: the where-branch that is not taken would still send 0 * -inf = NaN gradients.
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    return logp, entropy


@triton.jit
def _selective_logprob_fwd_kernel(
    logits_ptr,  # [N, V] rows at (r // n_inner) * stride_outer + (r % n_inner) * stride_inner
    labels_ptr,  # [N]
    logp_ptr,  # [N]
    entropy_ptr,  # [N]
    lse_ptr,  # [N]
    n_inner,
    stride_outer,
    stride_inner,
    V,
    inv_temperature,
    IGNORE: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    offs = tl.arange(0, BLOCK_V)

    # Online logsumexp: m = running max, s = sum exp(z - m), t = sum exp(z - m) * (z - m).
    # A finite start for m keeps exp(m - m_new) defined when a whole tile is -inf (masked vocabulary padding).
    # t is kept relative to m so that H = log s - t / s does not cancel two large numbers when logits are large.
    m = -3.0e38
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        z = x * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        d = z - m_new
        e = tl.exp(d)
        if COMPUTE_ENTROPY:
            # Moving the reference point from m to m_new adds (m - m_new) to every earlier (z - m).
            t = alpha * (t + (m - m_new) * s) + tl.sum(tl.where(e > 0.0, e * d, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new

    log_s = tl.log(s)
    tl.store(lse_ptr + row, m + log_s)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, log_s - t / s)

    label = tl.load(labels_ptr + row)
    in_range = (label >= 0) & (label < V)
    x_label = tl.load(row_ptr + label, mask=in_range, other=0.0).to(tl.float32)
    logp = (x_label * inv_temperature - m) - log_s
    # A label that is neither in [0, V) nor IGNORE gives NaN: loud, and no out-of-bounds read.
    logp = tl.where(in_range, logp, float("nan"))
    logp = tl.where(label == IGNORE, 0.0, logp)
    tl.store(logp_ptr + row, logp)


@triton.jit
def _selective_logprob_bwd_kernel(
    logits_ptr,  # [N, V] rows at (r // n_inner) * stride_outer + (r % n_inner) * stride_inner
    grad_logits_ptr,  # [N, V] same row layout with its own strides (may alias logits_ptr)
    labels_ptr,  # [N]
    lse_ptr,  # [N]
    entropy_ptr,  # [N]
    grad_logp_ptr,  # [N]
    grad_entropy_ptr,  # [N]
    n_inner,
    stride_outer,
    stride_inner,
    grad_stride_outer,
    grad_stride_inner,
    V,
    inv_temperature,
    IGNORE: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    row_ptr = logits_ptr + outer * stride_outer + inner * stride_inner
    grad_row_ptr = grad_logits_ptr + outer * grad_stride_outer + inner * grad_stride_inner
    offs = tl.arange(0, BLOCK_V)

    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row)
        g_logp = tl.where(label == IGNORE, 0.0, g_logp)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)

    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
        logp = x * inv_temperature - lse
        p = tl.exp(logp)
        grad = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_GRAD_LOGP:
            grad += tl.where(cols == label, g_logp, 0.0) - p * g_logp
        if HAS_GRAD_ENTROPY:
            grad -= tl.where(p > 0.0, p * (logp + entropy), 0.0) * g_entropy
        grad = grad * inv_temperature
        tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _forward_triton(x3, labels, temperature, compute_entropy):
    n_outer, n_inner, V = x3.shape
    N = n_outer * n_inner
    logp = torch.empty(N, dtype=torch.float32, device=x3.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if compute_entropy else None
    _selective_logprob_fwd_kernel[(N,)](
        x3,
        labels,
        logp,
        entropy if compute_entropy else logp,  # unused pointer when COMPUTE_ENTROPY is off
        lse,
        n_inner,
        x3.stride(0),
        x3.stride(1),
        V,
        1.0 / temperature,
        IGNORE=IGNORE_INDEX,
        COMPUTE_ENTROPY=compute_entropy,
        BLOCK_V=triton_block_v(V, x3.device),
        num_warps=8,
    )
    return logp, entropy, lse


def _backward_triton(x3, labels, lse, entropy, grad_logp, grad_entropy, temperature, out):
    n_outer, n_inner, V = x3.shape
    _selective_logprob_bwd_kernel[(n_outer * n_inner,)](
        x3,
        out,
        labels,
        lse,
        entropy if entropy is not None else lse,
        grad_logp if grad_logp is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
        n_inner,
        x3.stride(0),
        x3.stride(1),
        out.stride(0),
        out.stride(1),
        V,
        1.0 / temperature,
        IGNORE=IGNORE_INDEX,
        HAS_GRAD_LOGP=grad_logp is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_V=triton_block_v(V, x3.device),
        num_warps=8,
    )
    return out


def _scaled_fp32(chunk, temperature, shift=None):
    """fp32 (chunk - shift) / T as a new tensor; shift (C, 1) fp32 or None. Later steps work on it in place.

    One op for the common T == 1 case: on a CPU every op is a parallel region, and their number sets the speed
    of the chunked path as much as the bytes do (see TORCH_CHUNK_BYTES_CPU).
    """
    if shift is None:
        z = chunk.to(torch.float32, copy=True)
    else:
        z = torch.sub(chunk, shift)  # promotes bf16/fp16 chunks to fp32 before subtracting
    return z if temperature == 1.0 else z.div_(temperature)


def _shifted_softmax_sums(chunk, temperature):
    """(C, V) chunk -> d = z - max(z) (C, V), e = exp(d) (C, V), s = sum(e) (C, 1), max(z) (C, 1); fp32.

    Working from d = z - max rather than z - lse (as torch.log_softmax does) keeps the digits that lse, a number
    of the logits' size, would round away. d keeps -inf entries; callers clamp it before multiplying by e.
    """
    m = chunk.amax(dim=-1, keepdim=True).float()  # max(x); max(z) = max(x) / T as T > 0
    d = _scaled_fp32(chunk, temperature, shift=m)
    e = torch.exp(d)
    return d, e, e.sum(dim=-1, keepdim=True), m / temperature


def _forward_torch(x3, labels, temperature, compute_entropy):
    n_outer, n_inner, V = x3.shape
    N = n_outer * n_inner
    logp = torch.empty(N, dtype=torch.float32, device=x3.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if compute_entropy else None
    for r0, r1, chunk in row_chunks(x3, torch_chunk_rows(V, x3.device)):
        d, e, s, m = _shifted_softmax_sums(chunk, temperature)
        log_s = s.log()  # (C, 1)
        lse[r0:r1] = (m + log_s).squeeze(1)
        y = labels[r0:r1]
        ignore = y == IGNORE_INDEX
        # masked_fill, not clamp: a bad label such as -5 must still make gather raise.
        picked = d.gather(1, y.masked_fill(ignore, 0).unsqueeze(1)) - log_s  # (C, 1)
        logp[r0:r1] = picked.squeeze(1).masked_fill_(ignore, 0.0)
        if compute_entropy:
            # H = -sum p log p with p = e / s and log p = d - log s:  H = log s - sum(e d) / s.
            # The clamp only turns -inf into a finite number where e == 0, so that 0 * -inf does not make NaN.
            t = d.clamp_(min=LOGP_FLOOR).mul_(e).sum(dim=-1, keepdim=True)
            entropy[r0:r1] = (log_s - t / s).squeeze(1)
    return logp, entropy, lse


def _backward_torch(x3, labels, lse, entropy, grad_logp, grad_entropy, temperature, out):
    V = x3.shape[-1]
    rows = torch_chunk_rows(V, x3.device)
    inv_t = 1.0 / temperature
    for (r0, r1, chunk), (_, _, out_chunk) in zip(row_chunks(x3, rows), row_chunks(out, rows)):
        # log p = x / T - lse, as (x - T lse) / T: one op when T == 1
        logp = _scaled_fp32(chunk, temperature, shift=(lse[r0:r1] * temperature).unsqueeze(1))  # (C, V)
        # fp32 out (which may alias the chunk: it has been read into logp already) takes p and then the gradient
        p = torch.exp(logp, out=out_chunk) if out_chunk.dtype == torch.float32 else torch.exp(logp)
        # d/dx [g logp_y + g' H] = (g onehot(y) - p (g + g' (log p + H))) / T; the signs and 1/T ride on the (C, 1)
        # coefficients so that no extra pass over (C, V) is spent on them.
        if grad_logp is not None:
            y = labels[r0:r1]
            ignore = y == IGNORE_INDEX
            g = (grad_logp[r0:r1] * inv_t).masked_fill_(ignore, 0.0).unsqueeze(1)  # (C, 1)
        if grad_entropy is not None:
            g_h = (grad_entropy[r0:r1] * -inv_t).unsqueeze(1)
            coeff = logp.clamp_(min=LOGP_FLOOR).add_(entropy[r0:r1].unsqueeze(1)).mul_(g_h)  # p == 0 below the floor
            grad = p.mul_(coeff.sub_(g) if grad_logp is not None else coeff)
        else:
            grad = p.mul_(-g)
        if grad_logp is not None:
            grad.scatter_add_(1, y.masked_fill(ignore, 0).unsqueeze(1), g)
        if grad is not out_chunk:
            out_chunk.copy_(grad)
    return out


def selective_logprob_forward(x3, labels, temperature, compute_entropy, backend):
    """x3 (O, I, V) from `as_rows`, labels (O*I,) int64 -> logp (N,), entropy (N,) or None, lse (N,); fp32."""
    fn = _forward_triton if backend == "triton" and x3.numel() > 0 else _forward_torch  # no empty launches
    return fn(x3, labels, temperature, compute_entropy)


def selective_logprob_backward(x3, labels, lse, entropy, grad_logp, grad_entropy, temperature, backend, out):
    """Write d(loss)/d(x3) into out (O, I, V), which may be x3 itself. grad_* are (N,) fp32 or None (unused)."""
    fn = _backward_triton if backend == "triton" and x3.numel() > 0 else _backward_torch
    return fn(x3, labels, lse, entropy, grad_logp, grad_entropy, temperature, out)


def flat_grad(grad):
    """Upstream gradient (...) -> contiguous fp32 (N,); None stays None (that output was not used)."""
    return None if grad is None else grad.reshape(-1).to(torch.float32).contiguous()


class SelectiveLogprob(torch.autograd.Function):
    """logp = z[y] - lse and H = -sum_v p_v log p_v for z = x / T, p = softmax(z), lse = logsumexp(z).

    Backward, with upstream gradients g (for logp) and g' (for H) and d/dx = (1/T) d/dz:
        d logp / dz_v = onehot(y)_v - p_v                (zero for ignored rows, y == -100)
        d H    / dz_v = -p_v (log p_v + H)
    since dH/dz_k = -sum_v p_v (delta_vk - p_k)(log p_v + 1) = -p_k (log p_k + 1) + p_k (1 - H).
    p is recomputed from x and the saved lse; nothing of size (N, V) is saved but x itself.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, return_entropy, backend):
        x3 = as_rows(logits)
        y = flat_labels(labels, logits.shape[:-1])
        logp, entropy, lse = selective_logprob_forward(x3, y, temperature, return_entropy, backend)
        ctx.save_for_backward(x3, y, lse, entropy)
        ctx.temperature, ctx.backend, ctx.shape = temperature, backend, logits.shape
        ctx.set_materialize_grads(False)
        leading = logits.shape[:-1]
        if return_entropy:
            return logp.view(leading), entropy.view(leading)
        return logp.view(leading)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        x3, y, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        out = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
        selective_logprob_backward(
            x3, y, lse, entropy, flat_grad(grad_logp), flat_grad(grad_entropy), ctx.temperature, ctx.backend, out
        )
        return out.view(ctx.shape), None, None, None, None


def selective_logprob(logits, labels, temperature=1.0, return_entropy=False, backend=None):
    """Log-probabilities (...) fp32 of `labels` under softmax(logits / temperature), and optionally the entropy.

    logits: (..., V) fp32/bf16/fp16, any strides. labels: (...) integer; -100 marks an ignored position, whose
    log-prob is 0 with zero gradient. The entropy is still computed at ignored positions (it is a property of
    the distribution, not of the label; mask it yourself). Returns logp, or (logp, entropy) with
    return_entropy=True, both from one pass over V. Gradients reach `logits` in its own dtype.
    backend: "triton" | "torch" | None (None: $PLAINALIGN_KERNEL_BACKEND, else Triton on CUDA, PyTorch on CPU).
    Labels outside [0, V) other than -100 raise on the PyTorch path and give NaN on the Triton path.
    """
    backend = resolve_backend(backend, logits)
    temperature = check_temperature(temperature)
    return SelectiveLogprob.apply(logits, labels, temperature, bool(return_entropy), backend)
