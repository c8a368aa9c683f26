"""kernels.topk_kl against dense fp32 references: the gathered log-probs and the top-K KLs, values and gradients,
both backends, fp32 and bf16, ignored slots and rows, temperature, a partial last vocabulary tile, odd strides.

Without CUDA the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py). The PyTorch path
runs with a tiny chunk budget so that every case spans several chunks, one of them partial.
"""

import importlib

import pytest
import torch

import kernels
from kernels import _common, topk_kl, topk_kl_reference, topk_logprob, topk_logprob_reference, topk_of

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

CUDA = torch.cuda.is_available()
BACKENDS = ["torch"] + (["triton"] if kernels.HAS_TRITON else [])
DEVICE = {"torch": "cpu", "triton": "cuda" if CUDA else "cpu"}
DTYPES = [torch.float32, torch.bfloat16]
N, V, K = 13, 1271, 9  # V spans 3 interpreter tiles (512), the last partial; K is not a power of two
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2**-6}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(_common, "TORCH_CHUNK_BYTES_CPU", 5 * 4 * V)  # 5 rows of V per chunk


def assert_close(actual, expected, atol, rtol, what):
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ok = torch.isclose(actual, expected, rtol=rtol, atol=atol)
    if not ok.all():
        diff = torch.where(ok, 0.0, (actual - expected).abs().nan_to_num(nan=float("inf")))
        first = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int((~ok).sum())}/{ok.numel()} elements off; max abs diff {diff.max().item():.3e}; first bad "
            f"index {first}: got {actual[first].item()!r}, expected {expected[first].item()!r}"
        )


def make_case(case, dtype, device, seed=0):
    """(student logits, teacher ids, teacher log-probs, temperature); logits may be a non-contiguous view.

    The teacher is a real distribution (a log-softmax of other logits at the same temperature) and its ids are its
    own top K, as in distillation; slots and whole rows are set to -100."""
    g = torch.Generator().manual_seed(seed)
    if case == "plain":
        x, temperature = torch.randn(N, V, generator=g) * 3, 1.0
    elif case == "batched_slice":  # (B, T-1, V) = full[:, :-1]: rows not flattenable to one stride
        x, temperature = (torch.randn(3, 5, V, generator=g) * 3)[:, :-1], 0.7
    elif case == "transposed":  # last-dim stride != 1
        x, temperature = (torch.randn(V, 2, N, generator=g) * 3)[:, 1].T, 1.6
    elif case == "masked":  # -inf entries (a never-sampled pad token) and a large logit
        x, temperature = torch.randn(N, V, generator=g) * 3, 0.9
        x[:, 7] = float("-inf")
        x[2, 1000] = 40.0
    else:
        raise ValueError(case)
    teacher = x.detach().clone() + torch.randn(x.shape, generator=g) * 2  # related to the student, not equal
    teacher[..., 7] = float("-inf") if case == "masked" else teacher[..., 7]
    ids = torch.topk(teacher, K, dim=-1).indices
    logprobs = torch.log_softmax(teacher / temperature, -1).gather(-1, ids)
    ids.view(-1, K)[1, [2, 5]] = -100  # unused slots
    ids.view(-1, K)[4] = -100  # an ignored position
    return x.to(dtype).to(device), ids.to(device), logprobs.to(device), temperature


CASES = ["plain", "batched_slice", "transposed", "masked"]


def leaf(x):
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x).requires_grad_()


def grad_tols(expected, dtype):
    return 5e-5 * expected.detach().float().abs().max().item() + 1e-7, GRAD_RTOL[dtype]


# Every case on the PyTorch path; through the Triton kernel each case once, fp32 and bf16 alternating (each
# interpreted case costs seconds)
LOGPROB_GRID = [("torch", dtype, case) for dtype in DTYPES for case in CASES]
if kernels.HAS_TRITON:
    LOGPROB_GRID += [("triton", DTYPES[i % 2], case) for i, case in enumerate(CASES)]


@pytest.mark.parametrize("backend, dtype, case", LOGPROB_GRID, ids=lambda v: str(v).replace("torch.", ""))
def test_topk_logprob(backend, dtype, case):
    x, ids, _, temperature = make_case(case, dtype, DEVICE[backend])
    ours, ref = leaf(x), leaf(x)
    assert ours.stride() == x.stride()
    logp = topk_logprob(ours, ids, temperature, backend=backend)
    logp_ref = topk_logprob_reference(ref, ids, temperature)
    assert logp.dtype == torch.float32 and logp.shape == ids.shape
    assert_close(logp, logp_ref, 1e-5 + 16 * torch.finfo(torch.float32).eps * 40 / temperature, 1e-5, "logp")
    assert (logp[ids == -100] == 0).all()
    g = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    (logp * g).sum().backward()
    (logp_ref * g).sum().backward()
    assert ours.grad.dtype == dtype and not ours.grad.isnan().any()
    assert_close(ours.grad, ref.grad, *grad_tols(ref.grad, dtype), "grad logits")
    ignored_row = ids.view(-1, K)[4].eq(-100).all()
    assert ignored_row and (ours.grad.reshape(-1, V)[4] == 0).all()  # no label, no gradient (g is 0 there)


# The KLs are plain PyTorch on (N, K) over `topk_logprob`, whose two backends are checked above: the whole grid on
# the PyTorch path, and a diagonal of it through the Triton kernel (each interpreted case costs seconds).
KL_GRID = [("torch", dtype, case, kind, mass) for dtype in DTYPES for case in CASES for kind in ("fwd_kl", "rev_kl")
           for mass in ("renorm", "tail")]  # fmt: skip
if kernels.HAS_TRITON:
    KL_GRID += [("triton", torch.float32, "batched_slice", "fwd_kl", "tail"),
                ("triton", torch.bfloat16, "masked", "rev_kl", "renorm")]  # fmt: skip


@pytest.mark.parametrize("backend, dtype, case, kind, mass", KL_GRID, ids=lambda v: str(v).replace("torch.", ""))
def test_topk_kl(backend, dtype, case, kind, mass):
    x, ids, teacher_logprobs, temperature = make_case(case, dtype, DEVICE[backend])
    ours, ref = leaf(x), leaf(x)
    kl = topk_kl(ours, ids, teacher_logprobs, temperature, kind, mass, backend=backend)
    kl_ref = topk_kl_reference(ref, ids, teacher_logprobs, temperature, kind, mass)
    assert kl.dtype == torch.float32 and kl.shape == ids.shape[:-1]
    assert (kl_ref >= -1e-6).all()  # a KL: the reference itself must be sane
    assert_close(kl, kl_ref, 2e-5, 1e-4, "kl")
    assert kl.reshape(-1)[4] == 0  # the ignored position
    g = torch.randn(kl.shape, generator=torch.Generator().manual_seed(2)).to(x.device)
    (kl * g).sum().backward()
    (kl_ref * g).sum().backward()
    assert ours.grad.dtype == dtype and not ours.grad.isnan().any()
    assert_close(ours.grad, ref.grad, *grad_tols(ref.grad, dtype), "grad logits")
    if mass == "renorm":  # renormalised over the K ids: no gradient reaches any other token (up to rounding: the
        # upstream gradients of the K log-probs sum to 0 only in exact arithmetic)
        outside = torch.ones(ours.grad.reshape(-1, V).shape, dtype=torch.bool)
        flat_ids = ids.reshape(-1, K).cpu()
        outside.scatter_(1, flat_ids.clamp(min=0), flat_ids < 0)
        grad = ours.grad.reshape(-1, V).float().cpu()
        assert grad[outside].abs().max() <= 1e-6 * grad.abs().max()


def test_topk_kl_by_hand():
    """V = 3, K = 2, T = 1. Student logits log([0.5, 0.3, 0.2]), teacher log-probs log([0.6, 0.2]) at ids [0, 1].
    renorm: s' = [0.625, 0.375], t' = [0.75, 0.25]: fwd = 0.75 log(0.75/0.625) + 0.25 log(0.25/0.375) = 0.035377;
    tail: s = [0.5, 0.3, 0.2], t = [0.6, 0.2, 0.2]: rev = 0.5 log(0.5/0.6) + 0.3 log(0.3/0.2) + 0 = 0.030478."""
    x = torch.tensor([[0.5, 0.3, 0.2]]).log()
    ids, t = torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.2]]).log()
    assert topk_kl(x, ids, t, kind="fwd_kl", mass="renorm", backend="torch").item() == pytest.approx(0.035375, abs=1e-6)
    assert topk_kl(x, ids, t, kind="rev_kl", mass="tail", backend="torch").item() == pytest.approx(0.030478, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_kl_zero_when_student_is_teacher(backend):
    """With the teacher's own logits as the student, every variant is 0 with zero gradient."""
    x, _, _, temperature = make_case("batched_slice", torch.float32, DEVICE[backend])
    ids, lp = topk_of(x, K, temperature, backend=backend)
    assert_close(lp, topk_logprob_reference(x, ids, temperature), 1e-5, 1e-5, "topk_of log-probs")
    variants = [("fwd_kl", "renorm"), ("fwd_kl", "tail"), ("rev_kl", "renorm"), ("rev_kl", "tail")]
    for kind, mass in variants if backend == "torch" else variants[2:3]:  # interpreted Triton: one is enough
        s = leaf(x)
        kl = topk_kl(s, ids, lp, temperature, kind, mass, backend=backend)
        kl.sum().backward()
        assert_close(kl, torch.zeros_like(kl), 1e-5, 0.0, f"{kind} {mass}")
        assert_close(s.grad, torch.zeros_like(s.grad), 1e-5, 0.0, f"grad {kind} {mass}")


def test_topk_kl_bad_input():
    x, ids, lp, _ = make_case("plain", torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown top-K KL kind 'js'"):
        topk_kl(x, ids, lp, kind="js", backend="torch")
    with pytest.raises(ValueError, match="unknown top-K mass treatment 'keep'"):
        topk_kl(x, ids, lp, mass="keep", backend="torch")
    with pytest.raises(ValueError, match="ids have shape"):
        topk_logprob(x, ids[:-1], backend="torch")
    with pytest.raises(ValueError, match="integer"):
        topk_logprob(x, ids.float(), backend="torch")
    bad = ids.clone()
    bad[0, 0] = V
    with pytest.raises(RuntimeError, match="out of bounds"):
        topk_logprob(x, bad, backend="torch")
    if kernels.HAS_TRITON:  # the kernel cannot raise; it must not read out of bounds and must not hide it
        logp = topk_logprob(x.to(DEVICE["triton"]), bad.to(DEVICE["triton"]), backend="triton").cpu()
        assert logp[0, 0].isnan() and not logp[1:].isnan().any()


def test_no_vocabulary_sized_fp32_copy_in_forward(monkeypatch):
    """The PyTorch path's fp32 temporaries are chunk-sized: with the chunk budget at 5 rows, forward and backward
    each walk the rows in chunks of at most 5, every row once (an (N, V) fp32 log-softmax would not chunk)."""
    module = importlib.import_module("kernels.topk_kl")

    seen = []
    real = module.row_chunks

    def spy(x3, rows):
        for r0, r1, chunk in real(x3, rows):
            seen.append(r1 - r0)
            yield r0, r1, chunk

    monkeypatch.setattr(module, "row_chunks", spy)
    x, ids, lp, temperature = make_case("plain", torch.float32, "cpu")
    xs = leaf(x)
    topk_kl(xs, ids, lp, temperature, backend="torch").sum().backward()
    assert max(seen) <= 5 and sum(seen) == 3 * N  # forward: the logits; backward: the logits and the gradient
