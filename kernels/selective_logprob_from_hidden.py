"""selective_logprob on hidden states and the LM-head weight, without ever holding all (N, V) logits.

logits = hidden @ weight.T is formed one token chunk at a time; each chunk goes through the selective_logprob
forward (Triton or PyTorch) and is dropped, keeping only lse (and H) per token.

Why backward recomputes the chunk's logits instead of computing gradients during forward (Liger-Kernel's fused
linear cross-entropy does the latter): that trick needs the upstream gradient to be one scalar times a known
per-token weight, as for a mean loss. Here the outputs are per token and the caller may weight them any way
(masks, advantages, a KL coefficient on the entropy), and d loss / d weight = sum_n dz_n^T h_n cannot be split
into per-token pieces computed before those weights are known. Recomputing costs one extra chunk matmul
(4 matmuls in all instead of 3) and keeps the op exact for any upstream gradient.
"""

import torch

from ._common import check_temperature, flat_labels, resolve_backend
from .selective_logprob import (
    flat_grad,
    selective_logprob_backward,
    selective_logprob_forward,
    selective_logprob_reference,
)

# Bytes of one chunk's logits (in the matmul dtype). Backward reuses that buffer for the chunk's gradient.
# Module constants so tests can shrink them.
CHUNK_BYTES_CPU = 32 << 20
CHUNK_BYTES_CUDA = 512 << 20


def selective_logprob_from_hidden_reference(hidden, weight, labels, temperature=1.0, return_entropy=False):
    """Plain fp32 PyTorch: full logits = hidden @ weight.T in fp32, then the selective_logprob reference math."""
    logits = hidden.float() @ weight.float().T  # (..., V)
    return selective_logprob_reference(logits, labels, temperature, return_entropy)


def _chunk_rows(V, dtype, device):
    budget = CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES_CPU
    return max(1, budget // (V * torch.empty((), dtype=dtype).element_size()))


class SelectiveLogprobFromHidden(torch.autograd.Function):
    """logp_n = z_n[y_n] - lse_n and H_n = -sum_v p_nv log p_nv, z_n = (h_n W^T) / T, computed per token chunk.

    With G = d loss / d logits for a chunk (the selective_logprob backward: g_n (onehot(y_n) - p_n)/T
    - g'_n p_n (log p_n + H_n)/T for upstream gradients g, g'):
        d loss / d h = G W              (C, H) per chunk, written into its rows of grad_hidden
        d loss / d W = sum_chunks G^T h  (V, H), accumulated in place in W's dtype (as Liger-Kernel does;
                                        for bf16 weights that is one bf16 rounding per chunk)
    Backward recomputes each chunk's logits from h and W, then overwrites that buffer with G.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, return_entropy, backend):
        H = hidden.shape[-1]
        h = hidden.reshape(-1, H)  # (N, H)
        y = flat_labels(labels, hidden.shape[:-1])
        N, V = h.shape[0], weight.shape[0]
        logp = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if return_entropy else None
        rows = _chunk_rows(V, h.dtype, h.device)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            logits = (h[r0:r1] @ weight.T).unsqueeze(0)  # (1, C, V)
            lp, ent, ls = selective_logprob_forward(logits, y[r0:r1], temperature, return_entropy, backend)
            logp[r0:r1], lse[r0:r1] = lp, ls
            if return_entropy:
                entropy[r0:r1] = ent
        ctx.save_for_backward(h, weight, y, lse, entropy)
        ctx.temperature, ctx.backend, ctx.hidden_shape = temperature, backend, hidden.shape
        ctx.set_materialize_grads(False)
        leading = hidden.shape[:-1]
        if return_entropy:
            return logp.view(leading), entropy.view(leading)
        return logp.view(leading)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        h, weight, y, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if (grad_logp is None and grad_entropy is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        g_logp, g_entropy = flat_grad(grad_logp), flat_grad(grad_entropy)
        N, V = h.shape[0], weight.shape[0]
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        rows = _chunk_rows(V, h.dtype, h.device)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            logits = (h[r0:r1] @ weight.T).unsqueeze(0)  # (1, C, V)
            selective_logprob_backward(
                logits,
                y[r0:r1],
                lse[r0:r1],
                None if entropy is None else entropy[r0:r1],
                None if g_logp is None else g_logp[r0:r1],
                None if g_entropy is None else g_entropy[r0:r1],
                ctx.temperature,
                ctx.backend,
                out=logits,  # the chunk's logits are read once per element and overwritten by their gradient
            )
            grad_logits = logits[0]  # (C, V)
            if need_h:
                torch.mm(grad_logits, weight, out=grad_h[r0:r1])
            if need_w:
                grad_w.addmm_(grad_logits.T, h[r0:r1])
        grad_hidden = grad_h.view(ctx.hidden_shape) if need_h else None
        return grad_hidden, grad_w, None, None, None, None


def selective_logprob_from_hidden(hidden, weight, labels, temperature=1.0, return_entropy=False, backend=None):
    """selective_logprob(hidden @ weight.T, labels, ...) computed in token chunks; never holds (N, V) logits.

    hidden: (..., H); weight: (V, H), the LM head without bias, same dtype as hidden; labels: (...) with -100 =
    ignored. Returns logp (...) fp32, or (logp, entropy) with return_entropy=True. Gradients reach hidden and
    weight (whichever require them) for any upstream gradient. The chunk's matmul runs in the inputs' dtype,
    as the model's own LM head would; the log-softmax math is fp32.
    """
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    backend = resolve_backend(backend, hidden)
    temperature = check_temperature(temperature)
    return SelectiveLogprobFromHidden.apply(hidden, weight, labels, temperature, bool(return_entropy), backend)
