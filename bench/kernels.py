"""Time and peak memory of the kernels/ ops against eager PyTorch, torch.compile and (if installed) Liger-Kernel.

Not a test: prints markdown tables. Each row is one (op, method): forward under no_grad, and forward + backward
of the outputs' sum.

    python bench/kernels.py                     # CUDA: N in {4k,16k,32k} x V in {32k,128k,152k}, H=4096, bf16
                                                # CPU: N=4096, V=32k, fp32 (H=256 for the fused-linear op)
    python bench/kernels.py --quick             # small sizes, for a smoke run
    python bench/kernels.py --n 16384 --v 131072 --ops logprob,logprob+entropy

Memory is "peak extra": the peak beyond what is alive before the call (the inputs) minus the input gradients
that the call leaves behind, so a perfect kernel scores ~0.
  CUDA: torch.cuda.max_memory_allocated() (the caching allocator's exact count).
  CPU: PyTorch keeps no CPU allocator statistics, so each (op, method) runs in a fresh child process: one
  warm-up call (compilation, lazy init), then gc + malloc_trim(0) to hand freed memory back to the OS, then
  the peak resident set size (VmHWM, reset through /proc/self/clear_refs) over one measured call, minus the
  resident size just before it. This counts what the OS really gave the process, allocator slack included.
Times are the minimum over --repeats rounds after a warm-up round; each round calls every method once in turn
(CUDA: with synchronisation), so that other work on a shared machine disturbs all methods alike.
"""

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kernels  # noqa: E402  (the package at ROOT, not this file: ROOT comes first on sys.path)

OPS = ("logprob", "logprob+entropy", "full_kl", "from_hidden")
MIB = 1 << 20


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--n", type=int, nargs="+", help="token counts N (default: by device)")
    p.add_argument("--v", type=int, nargs="+", help="vocabulary sizes V (default: by device)")
    p.add_argument("--h", type=int, help="hidden size H of the fused-linear op (default: 4096 CUDA, 256 CPU)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: bf16 CUDA, fp32 CPU")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--methods", default="", help="comma-separated subset of methods (default: all available)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", nargs=4, metavar=("OP", "METHOD", "N", "V"), help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    if args.quick:
        default_n, default_v, default_h = ([2048], [32768], 1024) if cuda else ([1024], [8192], 128)
    else:
        default_n, default_v, default_h = (
            ([4096, 16384, 32768], [32768, 131072, 152064], 4096)
            if cuda
            else (
                [4096],
                [32768],
                256,
            )
        )
    args.n = args.n or default_n
    args.v = args.v or default_v
    args.h = args.h or default_h
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.ops = [op for op in args.ops.split(",") if op]
    for op in args.ops:
        if op not in OPS:
            p.error(f"unknown op {op!r}; choose from {OPS}")
    return args


# ------------------------------------------------------------------------------------------------ the contenders


def eager_logprob(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def eager_logprob_entropy(logits, labels):
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(torch.softmax(logits.float(), dim=-1) * logp_all).sum(-1)
    return logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1), entropy


def eager_full_kl(logits_p, logits_q):
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def eager_from_hidden(hidden, weight, labels):
    return eager_logprob(hidden @ weight.T, labels)


EAGER = {
    "logprob": eager_logprob,
    "logprob+entropy": eager_logprob_entropy,
    "full_kl": eager_full_kl,
    "from_hidden": eager_from_hidden,
}


def ours(op, backend):
    if op == "logprob":
        return lambda logits, labels: kernels.selective_logprob(logits, labels, backend=backend)
    if op == "logprob+entropy":
        return lambda logits, labels: kernels.selective_logprob(logits, labels, return_entropy=True, backend=backend)
    if op == "full_kl":
        return lambda logits_p, logits_q: kernels.full_kl(logits_p, logits_q, backend=backend)
    return lambda hidden, weight, labels: kernels.selective_logprob_from_hidden(hidden, weight, labels, backend=backend)


def liger(op):
    """Liger-Kernel's nearest op, or None. Its cross-entropy returns -log p; its fused linear cross-entropy only a
    summed loss (it computes gradients inside forward, which is only valid for a scalar loss)."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    if op == "logprob":
        loss = LigerCrossEntropyLoss(reduction="none")
        return lambda logits, labels: -loss(logits, labels)
    if op == "from_hidden":
        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda hidden, weight, labels: loss(weight, hidden, labels)
    return None


def methods(op, device, no_compile):
    found = {"eager": EAGER[op]}
    if not no_compile:
        found["compile"] = torch.compile(EAGER[op], dynamic=False)
    found["ours (torch chunked)"] = ours(op, "torch")
    if device.type == "cuda":
        if kernels.HAS_TRITON:
            found["ours (triton)"] = ours(op, "triton")
        if liger(op) is not None:
            found["liger"] = liger(op)
    return found


def make_inputs(op, n, v, h, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    if op == "from_hidden":
        hidden = torch.randn(n, h, device=device, generator=g).to(dtype)
        weight = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(dtype)
        return {"hidden": hidden, "weight": weight, "labels": labels}
    logits = (torch.randn(n, v, device=device, generator=g) * 2).to(dtype)
    if op == "full_kl":
        return {"logits_p": logits, "logits_q": (torch.randn(n, v, device=device, generator=g) * 2).to(dtype)}
    return {"logits": logits, "labels": labels}


def differentiable(inputs):
    return [t for t in inputs.values() if t.is_floating_point()]


def run_once(fn, inputs, backward):
    if not backward:
        with torch.no_grad():
            fn(**inputs)
        return
    for t in differentiable(inputs):
        t.requires_grad_(True)
        t.grad = None
    out = fn(**inputs)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().sum() for o in outs).backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_call_ms(fn, inputs, backward, device):
    sync(device)
    t0 = time.perf_counter()
    run_once(fn, inputs, backward)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def grad_bytes(inputs):
    return sum(t.numel() * t.element_size() for t in differentiable(inputs))


# --------------------------------------------------------------------------------------------------- measuring


def proc_status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_extra(fn, inputs, backward):
    """Peak RSS rise over one call (see the module docstring), minus the input gradients it leaves behind."""
    for t in differentiable(inputs):
        t.grad = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = proc_status_kib("VmRSS")
    run_once(fn, inputs, backward)
    return (proc_status_kib("VmHWM") - before) * 1024 - (grad_bytes(inputs) if backward else 0)


def cuda_peak_extra(fn, inputs, backward):
    for t in differentiable(inputs):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_once(fn, inputs, backward)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before - (grad_bytes(inputs) if backward else 0)


MODES = ((False, "fwd"), (True, "fwdbwd"))


def error_text(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"


def peak_memory(op, fn, n, v, args, device):
    """{"fwd_mem", "fwdbwd_mem"} in bytes for one (op, method), or {"error": str}."""
    inputs = make_inputs(op, n, v, args.h, args.dtype, device)
    row = {}
    try:
        for backward, key in MODES:
            run_once(fn, inputs, backward)  # warm-up: compilation, autotuning, lazy init
            peak = cuda_peak_extra if device.type == "cuda" else cpu_peak_extra
            row[key + "_mem"] = peak(fn, inputs, backward)
    except Exception as e:  # noqa: BLE001  (OOM, a compiler missing here, ...: report it as the row)
        row = {"error": error_text(e)}
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()  # each row starts from the same free memory
    return row


def measure_times(op, fns, n, v, args, device):
    """{name: {"fwd_ms", "fwdbwd_ms"} or {"error"}}: min over --repeats rounds, each round calling every method
    once, so that load from other processes on a shared machine hits all methods alike."""
    inputs = make_inputs(op, n, v, args.h, args.dtype, device)
    rows = {name: {} for name in fns}
    for backward, key in MODES:
        for round_ in range(1 + args.repeats):  # round 0 is the warm-up
            for name, fn in fns.items():
                if "error" in rows[name]:
                    continue
                try:
                    ms = timed_call_ms(fn, inputs, backward, device)
                except Exception as e:  # noqa: BLE001
                    rows[name] = {"error": error_text(e)}
                    continue
                if round_ > 0:
                    rows[name][key + "_ms"] = min(ms, rows[name].get(key + "_ms", float("inf")))
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_in_child(op, name, n, v, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", op, name, str(n), str(v)]
    cmd += ["--h", str(args.h), "--dtype", str(args.dtype).split(".")[-1]]
    cmd += ["--device", "cpu"] + (["--no-compile"] if args.no_compile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {
            "error": f"child failed: {proc.stderr.strip().splitlines()[-1][:120] if proc.stderr else proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_bandwidth(device):
    """Bytes/s of a large copy (read + write)."""
    n = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n / min(times)


def ideal_ms(op, n, v, dtype, bandwidth):
    """Bandwidth bound for the logits ops: forward reads the logits once; backward reads them and writes the
    gradient once. None for the fused-linear op, which is bound by its matmuls."""
    if op == "from_hidden":
        return None, None
    size = n * v * torch.empty((), dtype=dtype).element_size() * (2 if op == "full_kl" else 1)
    return size / bandwidth * 1e3, 3 * size / bandwidth * 1e3


# ------------------------------------------------------------------------------------------------------ report


def header(args, device):
    if device.type == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            machine = f"{model}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
        except (OSError, StopIteration):
            pass
    triton_version = "not installed"
    if kernels.HAS_TRITON:
        import triton

        triton_version = triton.__version__
    lines = [
        "# kernels benchmark",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{' '.join(['python'] + sys.argv)}`",
        f"- device: {machine}",
        f"- torch {torch.__version__}, triton {triton_version}, python {platform.python_version()}",
        f"- load average at start (1, 5, 15 min): {load_average()} (other processes share the machine when high)",
        f"- dtype {str(args.dtype).split('.')[-1]}, time = min of {args.repeats} interleaved rounds, H = {args.h} for from_hidden",
    ]
    if device.type == "cuda":
        lines.append("- memory: torch.cuda.max_memory_allocated() over the call, minus inputs and input gradients")
    else:
        lines.append(
            "- memory: peak RSS rise (VmHWM after clear_refs) over one call in a fresh child process, after a "
            "warm-up call, gc and malloc_trim; minus the input gradients left behind"
        )
    lines.append(
        "- eager = log_softmax(x.float()) + gather (+ softmax * log_softmax for entropy); compile = torch.compile "
        "of eager; ours (torch chunked) = the CPU path; ours (triton) = CUDA only; labels have no -100"
    )
    return "\n".join(lines)


def load_average():
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt_ms(x):
    return "—" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def fmt_mib(x):
    return "—" if x is None else f"{x / MIB:.0f}"


def table(op, n, v, rows, ideal):
    out = [
        f"\n### {op}: N={n}, V={v}"
        + (
            ""
            if ideal[0] is None
            else f" (ideal: fwd {fmt_ms(ideal[0])} ms, fwd+bwd {fmt_ms(ideal[1])} ms at the measured bandwidth)"
        ),
        "",
        "| method | fwd ms | fwd+bwd ms | fwd peak extra MiB | fwd+bwd peak extra MiB | fwd+bwd time vs eager |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = rows.get("eager", {}).get("fwdbwd_ms")
    for name, r in rows.items():
        if "error" in r:
            out.append(f"| {name} | skipped: {r['error']} | | | | |")
            continue
        ratio = f"{r['fwdbwd_ms'] / base:.2f}x" if base else "—"
        out.append(
            f"| {name} | {fmt_ms(r['fwd_ms'])} | {fmt_ms(r['fwdbwd_ms'])} | {fmt_mib(r['fwd_mem'])} | "
            f"{fmt_mib(r['fwdbwd_mem'])} | {ratio} |"
        )
    return "\n".join(out)


def cpu_targets(op, rows):
    """The CPU path's targets: peak extra <= 1/4 of eager's (fwd+bwd and no-grad fwd), time <= 1.3x eager."""
    eager, ours_row = rows.get("eager", {}), rows.get("ours (torch chunked)", {})
    if "error" in eager or "error" in ours_row or not eager or not ours_row:
        return f"- {op}: targets not evaluated (a row is missing)"
    checks = [
        (
            "fwd+bwd memory <= 1/4 eager",
            ours_row["fwdbwd_mem"] <= eager["fwdbwd_mem"] / 4,
            f"{fmt_mib(ours_row['fwdbwd_mem'])} vs {fmt_mib(eager['fwdbwd_mem'])} MiB",
        ),
        (
            "no-grad fwd memory <= 1/4 eager",
            ours_row["fwd_mem"] <= eager["fwd_mem"] / 4,
            f"{fmt_mib(ours_row['fwd_mem'])} vs {fmt_mib(eager['fwd_mem'])} MiB",
        ),
        (
            "fwd time <= 1.3x eager",
            ours_row["fwd_ms"] <= 1.3 * eager["fwd_ms"],
            f"{ours_row['fwd_ms'] / eager['fwd_ms']:.2f}x",
        ),
        (
            "fwd+bwd time <= 1.3x eager",
            ours_row["fwdbwd_ms"] <= 1.3 * eager["fwdbwd_ms"],
            f"{ours_row['fwdbwd_ms'] / eager['fwdbwd_ms']:.2f}x",
        ),
    ]
    parts = [f"{name}: {'met' if ok else 'NOT met'} ({detail})" for name, ok, detail in checks]
    return f"- {op}: " + "; ".join(parts)


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.child:  # one (op, method) in a fresh process, for CPU memory; prints one JSON line
        op, name, n, v = args.child
        fn = methods(op, device, args.no_compile)[name]
        print(json.dumps(peak_memory(op, fn, int(n), int(v), args, device)))
        return

    print(header(args, device))
    bandwidth = memory_bandwidth(device)
    print(f"- measured memory bandwidth (copy, read + write): {bandwidth / 1e9:.1f} GB/s")
    wanted = [m for m in args.methods.split(",") if m]
    targets = []
    for op in args.ops:
        for n in args.n:
            for v in args.v:
                fns = {k: f for k, f in methods(op, device, args.no_compile).items() if not wanted or k in wanted}
                if device.type == "cuda":
                    memory = {name: peak_memory(op, fn, n, v, args, device) for name, fn in fns.items()}
                else:
                    memory = {name: measure_in_child(op, name, n, v, args) for name in fns}
                times = measure_times(op, fns, n, v, args, device)
                rows = {name: {**memory[name], **times[name]} for name in fns}
                rows = {name: ({"error": r["error"]} if "error" in r else r) for name, r in rows.items()}
                print(table(op, n, v, rows, ideal_ms(op, n, v, args.dtype, bandwidth)), flush=True)
                if device.type == "cpu":
                    targets.append(cpu_targets(f"{op} N={n} V={v}", rows))
    if targets:
        print("\n### CPU targets (ours (torch chunked) vs eager)\n")
        print("\n".join(targets))
    print(f"\n- load average at the end (1, 5, 15 min): {load_average()}")


if __name__ == "__main__":
    main()
