"""Kernels against their fp32 PyTorch references: forward and backward, both backends, odd shapes.

Without CUDA the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py, before any
test module imports triton); with CUDA they are compiled and run on the GPU, and the GPU-scale tests at the end run too.
Shapes are chosen relative to the vocabulary tile the kernels use on that device (`_common.triton_block_v`: 512
interpreted, 4096 compiled), so that on both the vocabulary spans three tiles with a partial last one, and the
`extreme` case masks a whole first tile, puts tied maxima in one tile and across tiles, and masks the valid part of
the last tile. The PyTorch path is run with a tiny chunk budget so that every case spans several chunks, one of them
partial. Forward tolerances are per row (one row's huge logits must not loosen the check of the others).
Tests that run Triton on a GPU are marked `gpu` (conftest.py: only those see CUDA in-process).
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import (
    _common,
    full_kl,
    full_kl_reference,
    kl_estimate,
    selective_logprob,
    selective_logprob_from_hidden,
    selective_logprob_from_hidden_reference,
    selective_logprob_reference,
)

# The package re-exports each op under its module's name, so reach the module itself through importlib.
from_hidden_module = importlib.import_module("kernels.selective_logprob_from_hidden")

# The interpreter evaluates both sides of tl.where in numpy, e.g. 0 * -inf for masked vocabulary entries.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEVICE = {"torch": "cpu", "triton": "cuda" if CUDA else "cpu"}
# On a GPU the Triton cases use CUDA in this process: marked `gpu`, which conftest.py leaves CUDA visible to.
GPU_MARKS = [pytest.mark.gpu] if CUDA else []
BACKENDS = ["torch"] + ([pytest.param("triton", marks=GPU_MARKS)] if kernels.HAS_TRITON else [])


def on_gpu(test):
    return pytest.mark.gpu(test) if CUDA else test


DTYPES = [torch.float32, torch.bfloat16]
# The vocabulary tile of the Triton kernels on the device they run on here (the cap of triton_block_v).
TILE = _common.triton_block_v(1 << 20, torch.device(DEVICE["triton"])) if kernels.HAS_TRITON else 512
# V: three tiles, the last one partial (247 of TILE columns; V = 1271 interpreted); V_SMALL: less than one tile.
N, V, V_SMALL, H = 41, 2 * TILE + 247, 100, 401
EPS32 = torch.finfo(torch.float32).eps

# Forward math is fp32 on the same input values whatever their dtype, so values match the fp32 reference
# closely; gradients are rounded to the input dtype, so their tolerance is that dtype's rounding (2 ulps).
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2**-6, torch.float16: 2**-9}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(_common, "TORCH_CHUNK_BYTES_CPU", 12 * 4 * V)  # 12 rows of V, 6 per full_kl chunk
    monkeypatch.setattr(from_hidden_module, "CHUNK_BYTES_CPU", 16 * 4 * V)  # 16 tokens per fp32 chunk


def assert_close(actual, expected, atol, rtol, what):
    """|actual - expected| <= atol + rtol |expected| everywhere, as torch.isclose (equal infinities match, NaN
    never does); atol may be a tensor that broadcasts against them (a per-row tolerance). Reports the number of
    elements off, the max diff and the first bad index with its tolerance."""
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol = torch.as_tensor(atol, dtype=torch.float32).cpu().expand_as(expected)
    ok = (actual == expected) | ((actual - expected).abs() <= atol + rtol * expected.abs())
    if not ok.all():
        diff = torch.where(ok, 0.0, (actual - expected).abs().nan_to_num(nan=float("inf")))
        first = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int((~ok).sum())}/{ok.numel()} elements off; max abs diff {diff.max().item():.3e}; "
            f"first bad index {first}: got {actual[first].item()!r}, expected {expected[first].item()!r} "
            f"(atol={atol[first].item():.1e}, rtol={rtol:.1e})"
        )


def row_absmax(x):
    """max |x| over the last dimension's finite entries (...), fp32; 0 for a row with none."""
    return x.detach().abs().nan_to_num(nan=0.0, posinf=0.0).amax(-1).float()


def fwd_atol(logits, temperature):
    """Per row (...): fp32 rounding of z = x / T, the absolute error any fp32 log-softmax of that row carries at
    the row's logit magnitude. Per row, not per tensor: one row of 1e4 logits must not allow 2e-2 everywhere."""
    return 1e-5 + 16 * EPS32 * row_absmax(logits) / temperature


def grad_tols(expected, dtype):
    """Gradients like p (log p - log q - KL) or g (onehot - p) cancel terms of the size of the log-probs or of the
    upstream gradient, so fp32 rounding shows up relative to the largest gradient, not to each element (nor to
    each row: a row with p ~ onehot has gradients ~0 made of differences of O(1) terms)."""
    scale = expected.detach().float().abs().max().item()
    return 5e-5 * scale + 1e-7, GRAD_RTOL[dtype]


def make_logits(case, dtype, device, seed=0):
    """Returns (logits, labels, temperature) for a named case; logits may be a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)
    if case == "plain":
        x = torch.randn(N, V, generator=g) * 3
        labels = torch.randint(0, V, (N,), generator=g)
        temperature = 1.0
    elif case == "small_vocab":
        x = torch.randn(N, V_SMALL, generator=g) * 3
        labels = torch.randint(0, V_SMALL, (N,), generator=g)
        temperature = 0.7
    elif case == "batched_slice":  # (B, T-1, V) = full[:, :-1]: rows not flattenable to one stride
        x = (torch.randn(3, 16, V, generator=g) * 3)[:, :-1]
        labels = torch.randint(0, V, (3, 16), generator=g)[:, 1:]
        temperature = 1.3
    elif case == "transposed":  # last-dim stride != 1
        x = (torch.randn(V, 2, N, generator=g) * 3)[:, 1].T
        labels = torch.randint(0, V, (N,), generator=g)
        temperature = 0.5
    elif case == "extreme":  # rows 0, 5, 10, ... have label -100; the rows below that matter have labels
        inf, T = float("inf"), TILE
        x = torch.randn(N, V, generator=g) * 3
        labels = torch.randint(0, V, (N,), generator=g)
        labels[::5] = -100
        x[1, ::7] = -inf  # masked entries, one under the label: log p = -inf on both paths
        labels[1] = 14
        x[2, :T] = -inf  # the whole first tile masked: the online max starts from a tile of -inf
        labels[2] = T  # the first finite entry
        x[3, : T + 100] = -inf  # the first tile and part of the second
        x[4, 5] = 1e4  # huge logits: 2e-2 of rounding in this row only (the tolerance is per row)
        labels[4] = 5
        x[6, 9], x[6, T + 9] = -1e4, 1e4
        x[7, 2 * T :] = 60.0  # every valid entry of the partial last tile tied at the maximum
        labels[7] = V - 1
        x[8, [3, T + 3, 2 * T + 3]] = 50.0  # tied maxima in each of the three tiles
        labels[8] = T + 3
        x[9, T - 1], x[9, T] = 40.0, 40.0  # a tie across a tile boundary
        x[11, 2 * T :] = -inf  # the partial last tile entirely masked
        x[12] = 3.0  # every entry tied: uniform, log p = -log V, H = log V
        x[13, :T] = -inf  # first tile masked and the maximum in the partial last tile
        x[13, V - 2] = 30.0
        labels[13] = V - 2
        temperature = 0.9
    else:
        raise ValueError(case)
    if case != "extreme":
        labels[..., ::5] = -100
    return x.to(dtype).to(device), labels.to(device), temperature


CASES = ["plain", "small_vocab", "batched_slice", "transposed", "extreme"]


def leaf(x):
    """A leaf copy with x's strides, so non-contiguous layouts reach the op unchanged."""
    copy = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)
    return copy.requires_grad_()


# ----------------------------------------------------------------------------------------------- selective_logprob


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_selective_logprob(backend, dtype, case):
    x, labels, temperature = make_logits(case, dtype, DEVICE[backend])
    x_ours, x_ref = leaf(x), leaf(x)
    assert x_ours.stride() == x.stride()
    logp, entropy = selective_logprob(x_ours, labels, temperature, return_entropy=True, backend=backend)
    logp_ref, entropy_ref = selective_logprob_reference(x_ref, labels, temperature, return_entropy=True)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == labels.shape
    atol = fwd_atol(x, temperature)
    assert_close(logp, logp_ref, atol, 1e-5, "logp")
    assert_close(entropy, entropy_ref, atol, 1e-5, "entropy")
    assert (logp[labels == -100] == 0).all()

    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(labels.shape, generator=g).to(x.device)
    g_entropy = torch.randn(labels.shape, generator=g).to(x.device)
    finite = torch.isfinite(logp_ref)  # an upstream gradient times -inf would be NaN in both; mask those out
    ((logp * g_logp)[finite].sum() + (entropy * g_entropy).sum()).backward()
    ((logp_ref * g_logp)[finite].sum() + (entropy_ref * g_entropy).sum()).backward()
    assert x_ours.grad.dtype == dtype and not x_ours.grad.isnan().any()
    assert_close(x_ours.grad, x_ref.grad, *grad_tols(x_ref.grad, dtype), "grad logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["logp", "entropy"])
def test_selective_logprob_one_output_used(backend, used):
    """Backward with only one output in the loss (the other output's gradient is None, not zeros)."""
    x, labels, temperature = make_logits("plain", torch.float32, DEVICE[backend])
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)).to(x.device)
    grads = []
    for fn in (selective_logprob, selective_logprob_reference):
        xi = leaf(x)
        kwargs = {"backend": backend} if fn is selective_logprob else {}
        if used == "logp":
            (fn(xi, labels, temperature, **kwargs) * weights).sum().backward()
        else:
            (fn(xi, labels, temperature, return_entropy=True, **kwargs)[1] * weights).sum().backward()
        grads.append(xi.grad)
    assert_close(grads[0], grads[1], *grad_tols(grads[1], torch.float32), f"grad logits, only {used} used")


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_logprob_fp16(backend):
    x, labels, temperature = make_logits("batched_slice", torch.float16, DEVICE[backend])
    x_ours, x_ref = leaf(x), leaf(x)
    logp = selective_logprob(x_ours, labels, temperature, backend=backend)
    logp_ref = selective_logprob_reference(x_ref, labels, temperature)
    assert_close(logp, logp_ref, fwd_atol(x, temperature), 1e-5, "logp fp16")
    g = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3)).to(x.device)
    (logp * g).sum().backward()
    (logp_ref * g).sum().backward()
    assert x_ours.grad.dtype == torch.float16
    assert_close(x_ours.grad, x_ref.grad, *grad_tols(x_ref.grad, torch.float16), "grad logits fp16")


def test_forward_tolerance_is_per_row():
    """The extreme case's rows of 1e4 logits must not loosen the check of the others: an error of 1e-3 in a row of
    ordinary logits fails, though it is far inside what a whole-tensor tolerance (2e-2 here) would allow."""
    x, labels, temperature = make_logits("extreme", torch.float32, "cpu")
    logp = selective_logprob_reference(x, labels, temperature)
    atol = fwd_atol(x, temperature)
    assert atol[4] > 1e-2 and atol[6] > 1e-2 and atol[14] < 1e-4  # row 14: randn * 3, a label
    wrong = logp.clone()
    wrong[14] += 1e-3
    with pytest.raises(AssertionError, match=r"logp: 1/41 elements off.* first bad index \(14,\)"):
        assert_close(wrong, logp, atol, 1e-5, "logp")
    wrong = logp.clone()
    wrong[4] += 1e-3  # within that row's own rounding
    assert_close(wrong, logp, atol, 1e-5, "logp")


@on_gpu
def test_selective_logprob_bad_labels():
    x, labels, _ = make_logits("small_vocab", torch.float32, "cpu")
    with pytest.raises(ValueError, match="labels have shape"):
        selective_logprob(x, labels[:-1], backend="torch")
    with pytest.raises(ValueError, match="integer"):
        selective_logprob(x, labels.float(), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        selective_logprob(x, labels, temperature=0.0, backend="torch")
    bad = labels.clone()
    bad[3] = V_SMALL  # out of range and not -100
    with pytest.raises(RuntimeError, match="out of bounds"):
        selective_logprob(x, bad, backend="torch")
    if kernels.HAS_TRITON:  # the kernel cannot raise; it must not read out of bounds and must not hide it
        logp = selective_logprob(x.to(DEVICE["triton"]), bad.to(DEVICE["triton"]), backend="triton").cpu()
        assert logp[3].isnan() and not logp[torch.arange(N) != 3].isnan().any()


# ----------------------------------------------------------------------------------- selective_logprob_from_hidden


def make_hidden(case, dtype, device):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    if case == "plain":
        hidden = torch.randn(N, H, generator=g)
        labels = torch.randint(0, V, (N,), generator=g)
        temperature = 1.0
    else:  # "batched_slice": (B, T-1, H) view with ignored labels and T != 1
        hidden = torch.randn(3, 15, H, generator=g)[:, 1:]
        labels = torch.randint(0, V, (3, 14), generator=g)
        temperature = 0.8
    labels.view(-1)[::4] = -100
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), labels.to(device), temperature


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["plain", "batched_slice"])
def test_selective_logprob_from_hidden(backend, dtype, case):
    """fp32: against the fp32 reference. bf16: against the fp32 reference math applied to bf16 logits h @ W^T,
    since the op does its matmul in the inputs' dtype (as the model's LM head would); that is a tight check of
    the chunking and of both gradients, which bf16 rounding of the logits alone would blur."""
    hidden, weight, labels, temperature = make_hidden(case, dtype, DEVICE[backend])
    h, w = leaf(hidden), leaf(weight)
    h_ref, w_ref = leaf(hidden), leaf(weight)
    logp, entropy = selective_logprob_from_hidden(h, w, labels, temperature, return_entropy=True, backend=backend)
    if dtype == torch.float32:
        logp_ref, entropy_ref = selective_logprob_from_hidden_reference(h_ref, w_ref, labels, temperature, True)
        atol, grad_rtol = 2e-5, 1e-4
    else:
        logits = h_ref @ w_ref.T
        logp_ref, entropy_ref = selective_logprob_reference(logits, labels, temperature, return_entropy=True)
        atol, grad_rtol = 2e-5, 2e-2  # grad W: bf16 sums per chunk vs one bf16 matmul over all tokens
    assert_close(logp, logp_ref, atol, 1e-5, "logp")
    assert_close(entropy, entropy_ref, atol, 1e-5, "entropy")

    g = torch.Generator().manual_seed(5)
    g_logp = torch.randn(labels.shape, generator=g).to(hidden.device)
    g_entropy = torch.randn(labels.shape, generator=g).to(hidden.device)
    ((logp * g_logp).sum() + (entropy * g_entropy).sum()).backward()
    ((logp_ref * g_logp).sum() + (entropy_ref * g_entropy).sum()).backward()
    for name, ours, ref in (("grad hidden", h.grad, h_ref.grad), ("grad weight", w.grad, w_ref.grad)):
        assert ours.dtype == dtype
        scale = ref.abs().max().item()
        assert_close(ours, ref, (1e-6 if dtype == torch.float32 else 4e-3) * scale, grad_rtol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["logp", "entropy"])
def test_selective_logprob_from_hidden_one_output_frozen_weight(backend, used):
    """Only one output in a masked, weighted loss; the LM head frozen (no weight gradient requested)."""
    hidden, weight, labels, temperature = make_hidden("plain", torch.float32, DEVICE[backend])
    mask = (torch.arange(N) % 3 != 0).float().to(hidden.device)
    grads = []
    for fn in (selective_logprob_from_hidden, selective_logprob_from_hidden_reference):
        h = leaf(hidden)
        kwargs = {"backend": backend} if fn is selective_logprob_from_hidden else {}
        out = fn(h, weight, labels, temperature, return_entropy=used == "entropy", **kwargs)
        out = out[1] if used == "entropy" else out
        ((out * mask).sum() / mask.sum()).backward()
        grads.append(h.grad)
    assert weight.grad is None
    assert_close(grads[0], grads[1], 1e-6 * grads[1].abs().max().item(), 1e-4, f"grad hidden, only {used} used")


def test_selective_logprob_from_hidden_bad_weight():
    hidden, weight, labels, _ = make_hidden("plain", torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight must be"):
        selective_logprob_from_hidden(hidden, weight.T, labels, backend="torch")
    with pytest.raises(ValueError, match="same dtype"):
        selective_logprob_from_hidden(hidden, weight.bfloat16(), labels, backend="torch")


# ----------------------------------------------------------------------------------------------------- full_kl


def make_pair(case, dtype, device):
    a, _, temperature = make_logits(case, dtype, device, seed=6)
    b, _, _ = make_logits(case, dtype, device, seed=7)
    if case == "extreme":
        # Give q the same masked entries as p: where p > 0 and q == 0 the KL is +inf, which is not a test case.
        a_f, b_f = a.float(), b.float()
        b = torch.where(torch.isinf(a_f) & (a_f < 0), a_f, torch.where(torch.isinf(b_f), 0.0, b_f)).to(dtype)
    return a, b, temperature


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_full_kl(backend, dtype, case):
    a, b, temperature = make_pair(case, dtype, DEVICE[backend])
    a_ours, b_ours, a_ref, b_ref = leaf(a), leaf(b), leaf(a), leaf(b)
    kl = full_kl(a_ours, b_ours, temperature, backend=backend)
    kl_ref = full_kl_reference(a_ref, b_ref, temperature)
    assert kl.dtype == torch.float32 and kl.shape == a.shape[:-1]
    assert_close(kl, kl_ref, torch.maximum(fwd_atol(a, temperature), fwd_atol(b, temperature)), 1e-5, "kl")

    g_kl = torch.randn(kl.shape, generator=torch.Generator().manual_seed(8)).to(a.device)
    (kl * g_kl).sum().backward()
    (kl_ref * g_kl).sum().backward()
    for name, ours, ref in (("grad p", a_ours.grad, a_ref.grad), ("grad q", b_ours.grad, b_ref.grad)):
        assert ours.dtype == dtype and not ours.isnan().any()
        assert_close(ours, ref, *grad_tols(ref, dtype), name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kl_frozen_q_and_identity(backend):
    """Only p needs a gradient (a frozen reference model); KL(p || p) = 0 with zero gradient."""
    a, b, temperature = make_pair("batched_slice", torch.float32, DEVICE[backend])
    a_ours, a_ref = leaf(a), leaf(a)
    full_kl(a_ours, b, temperature, backend=backend).sum().backward()
    full_kl_reference(a_ref, b, temperature).sum().backward()
    assert b.grad is None
    assert_close(a_ours.grad, a_ref.grad, *grad_tols(a_ref.grad, torch.float32), "grad p, q frozen")
    same = leaf(a)
    kl = full_kl(same, a, temperature, backend=backend)
    kl.sum().backward()
    assert_close(kl, torch.zeros_like(kl), 1e-5, 0.0, "KL(p || p)")
    assert_close(same.grad, torch.zeros_like(same.grad), 1e-6, 0.0, "grad of KL(p || p)")


def test_full_kl_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        full_kl(torch.zeros(3, 5), torch.zeros(3, 6), backend="torch")


# ------------------------------------------------------------------------------------------------- kl_estimate


def test_kl_estimate_hand_values():
    """p(x) = 1/2, q(x) = 1/4: log r = -log 2, so k1 = log 2, k2 = (log 2)^2 / 2, k3 = -1/2 + log 2."""
    logp, logq = torch.tensor(0.5).log(), torch.tensor(0.25).log()
    assert kl_estimate(logp, logq, "k1").item() == pytest.approx(0.6931472, abs=1e-6)
    assert kl_estimate(logp, logq, "k2").item() == pytest.approx(0.2402265, abs=1e-6)
    assert kl_estimate(logp, logq, "k3").item() == pytest.approx(0.1931472, abs=1e-6)
    # equal log-probs: every estimator is exactly 0
    for kind in ("k1", "k2", "k3"):
        assert kl_estimate(logp, logp, kind).item() == 0.0
    with pytest.raises(ValueError, match="unknown KL estimator kind 'k4'"):
        kl_estimate(logp, logq, "k4")


def test_kl_estimate_monte_carlo():
    """k1 and k3 are unbiased for KL(p || q) on samples from p; k3 has lower variance and is never negative."""
    p = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.15, 0.15, 0.1], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(9))
    logp, logq = p.log()[x], q.log()[x]
    samples = {kind: kl_estimate(logp, logq, kind) for kind in ("k1", "k2", "k3")}
    for kind in ("k1", "k3"):
        mean, stderr = samples[kind].mean().item(), samples[kind].std().item() / len(x) ** 0.5
        assert abs(mean - exact) < 4 * stderr, f"{kind}: mean {mean:.5f}, exact {exact:.5f}, stderr {stderr:.1e}"
    assert samples["k3"].var() < samples["k1"].var()
    assert (samples["k3"] >= 0).all() and (samples["k2"] >= 0).all() and (samples["k1"] < 0).any()


# ---------------------------------------------------------------------------------------------------- dispatch


@on_gpu
def test_backend_choice(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv(_common.BACKEND_ENV, raising=False)
    assert _common.resolve_backend(None, x) == "torch"  # CPU tensors default to the PyTorch path
    monkeypatch.setenv(_common.BACKEND_ENV, "torch")
    assert _common.resolve_backend(None, x) == "torch"
    if kernels.HAS_TRITON:
        monkeypatch.setenv(_common.BACKEND_ENV, "triton")
        assert _common.resolve_backend(None, x.to(DEVICE["triton"])) == "triton"
        assert _common.resolve_backend("torch", x) == "torch"  # the argument wins over the variable
    monkeypatch.setenv(_common.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        _common.resolve_backend(None, x)
    with pytest.raises(ValueError, match="unknown kernel backend 'tensorrt'"):
        selective_logprob(x, torch.zeros(2, dtype=torch.long), backend="tensorrt")


def run_python(code, **env):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, _common.BACKEND_ENV: "", **env}
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_import_without_triton():
    """`import kernels` and the PyTorch path work when triton cannot be imported; asking for Triton says why."""
    run_python(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "assert not kernels.HAS_TRITON\n"
        "x = torch.randn(4, 7, requires_grad=True)\n"
        "kernels.selective_logprob(x, torch.tensor([1, 2, -100, 6])).sum().backward()\n"
        "try:\n"
        "    kernels.full_kl(x, x, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
def test_triton_on_cpu_needs_interpreter_at_import():
    """TRITON_INTERPRET set after `import kernels` comes too late (triton.jit reads it at decoration): say so."""
    run_python(
        "import os, torch, kernels\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    kernels.selective_logprob(torch.randn(3, 9), torch.tensor([0, 1, 2]), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'before `kernels` is imported' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n",
        TRITON_INTERPRET="0",
    )


# ---------------------------------------------------------------------------------------------- GPU-scale (CUDA)

needs_cuda = pytest.mark.skipif(not CUDA, reason="GPU-scale shapes need CUDA")
gpu = pytest.mark.gpu


def chunked_reference_grads(fn, inputs, upstream, rows=1024):
    """Run an fp32 reference fn(rows, *input_chunks) row chunk by row chunk (memory); outputs, input grads."""
    outs, grads = [], [torch.empty_like(t) for t in inputs]
    for r0 in range(0, inputs[0].shape[0], rows):
        chunk = [t[r0 : r0 + rows].detach().requires_grad_() for t in inputs]
        out = fn(slice(r0, r0 + rows), *chunk)
        (out * upstream[r0 : r0 + rows]).sum().backward()
        outs.append(out.detach())
        for grad, t in zip(grads, chunk):
            grad[r0 : r0 + rows] = t.grad
    return torch.cat(outs), grads


@gpu
@needs_cuda
def test_selective_logprob_gpu_scale():
    n, v = 16384, 131072
    torch.manual_seed(0)
    x = (torch.randn(n, v, device="cuda") * 4).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::7] = -100
    upstream = torch.randn(n, device="cuda")
    logp = selective_logprob(x, labels, 0.9, backend="triton")
    (logp * upstream).sum().backward()
    ref, (grad_ref,) = chunked_reference_grads(
        lambda rows, xc: selective_logprob_reference(xc, labels[rows], 0.9), [x], upstream
    )
    assert_close(logp, ref, fwd_atol(x, 0.9), 1e-5, "logp")
    assert_close(x.grad, grad_ref, *grad_tols(grad_ref, torch.bfloat16), "grad logits")


@gpu
@needs_cuda
def test_full_kl_gpu_scale():
    n, v = 4096, 131072
    torch.manual_seed(0)
    a = (torch.randn(n, v, device="cuda") * 4).bfloat16().requires_grad_()
    b = (torch.randn(n, v, device="cuda") * 4).bfloat16().requires_grad_()
    upstream = torch.randn(n, device="cuda")
    kl = full_kl(a, b, backend="triton")
    (kl * upstream).sum().backward()
    ref, (grad_a, grad_b) = chunked_reference_grads(lambda rows, ac, bc: full_kl_reference(ac, bc), [a, b], upstream)
    assert_close(kl, ref, 1e-4, 1e-5, "kl")
    assert_close(a.grad, grad_a, *grad_tols(grad_a, torch.bfloat16), "grad p")
    assert_close(b.grad, grad_b, *grad_tols(grad_b, torch.bfloat16), "grad q")


@gpu
@needs_cuda
def test_selective_logprob_from_hidden_gpu_scale():
    n, h, v = 4096, 4096, 131072
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device="cuda") / h**0.5 * 3).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda")
    upstream = torch.randn(n, device="cuda")
    logp = selective_logprob_from_hidden(hidden, weight, labels, backend="triton")
    (logp * upstream).sum().backward()
    # Reference: the same bf16 matmul, fp32 log-softmax, one 1024-token chunk at a time.
    grad_w = torch.zeros(v, h, device="cuda", dtype=torch.float32)
    refs = []
    for r0 in range(0, n, 1024):
        hc = hidden[r0 : r0 + 1024].detach().requires_grad_()
        wc = weight.detach().requires_grad_()
        out = selective_logprob_reference(hc @ wc.T, labels[r0 : r0 + 1024])
        (out * upstream[r0 : r0 + 1024]).sum().backward()
        refs.append(out.detach())
        grad_w += wc.grad.float()
        assert_close(hidden.grad[r0 : r0 + 1024], hc.grad, 4e-3 * hc.grad.abs().max().item(), 2e-2, "grad hidden")
    assert_close(logp, torch.cat(refs), 1e-4, 1e-5, "logp")
    assert_close(weight.grad, grad_w, 4e-3 * grad_w.abs().max().item(), 2e-2, "grad weight")
