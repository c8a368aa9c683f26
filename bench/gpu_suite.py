"""One prepared GPU check: every GPU measurement of this project in one call of at most 8 minutes.

A GPU is lent to this project rarely and briefly (~15 minutes, start-up included), so every GPU figure comes from this
one script, prepared before a GPU is there and tested without one: `--dry-run` runs the whole suite on the CPU at tiny
shapes (Triton under TRITON_INTERPRET=1, the demo-size model; tests/test_gpu_suite.py, part of `make test`).

    bash bench/gpu_wheels.sh                           # here, with PyPI: .gpu_wheels/, what the GPU machine lacks
    bash bench/gpu_suite.sh OUTDIR                     # on the GPU machine (bench/README.md, "GPU suite")
    bash bench/gpu_suite.sh OUTDIR --dry-run           # CPU, tiny shapes
    bash bench/gpu_suite.sh OUTDIR --parts correctness,speed --limit speed=120   # a subset, another limit

Parts, in this order. Each is a child process under coreutils `timeout` with its own limit, cut to what is left of
--budget (480 s: the whole call ends within 8 minutes); a part that fails or runs out of time stops nothing.
  setup        (always runs) installs the carried wheels offline (pip --no-index --no-deps --target <work>/site-packages/...),
               reports versions and which optional libraries import, builds bench/ppo_step.py's random 0.5B models
  correctness  the Triton kernels at real shapes, N = 16384 tokens, V = 128256 and 152064, bf16 and fp32, against the
               fp32 reference functions of kernels/: max abs error of every output and input gradient. The references
               run over row chunks (a whole fp32 (16k, 152k) tensor is 10 GB, and a reference holds several)
  speed        bench/kernels.py at the same shapes (eager, PyTorch chunked, Triton, Liger-Kernel if it imports), and
               the floor: bytes moved / the datasheet bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s)
  ppo_step     bench/ppo_step.py --size 0.5b --device cuda: PPO updates, ours vs TRL 1.12 (ours alone without TRL)
  grpo_step    bench/grpo_step.py --size 0.5b --device cuda: GRPO updates, ours vs TRL 1.16 (likewise)
  training     a random Qwen2.5-0.5B-shaped Llama with the demo tokenizer: sft.py for 30 steps, grpo.py for 10
               updates from its result, and sft.py for 10 steps under `torchrun --nproc_per_node 1` on the FSDP2 +
               bf16 mixed-precision path of common/dist.py (see `force_fsdp`); losses finite, throughput from
               metrics.jsonl, peak memory
  compile      bench/kernels.py's torch.compile rows, last: compiling is slow and its tables stream, so whatever is
               left of the budget gives as many of them as it can
OUTDIR receives 8 files, as many as the device tool brings back: summary.md, summary.json, 1_kernel_correctness.md,
2_kernel_speed.md (the compile rows appended), 3_ppo_step.md, 3_grpo_step.md, 4_training.md and logs.tar.gz (every
part's log, results and metrics). Models, checkpoints and installed wheels stay under --work-dir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ppo_step import SIZE_0_5B  # noqa: E402  (stdlib-only module level: safe before the wheels are installed)

GIB = 1 << 30
PARTS = ("setup", "correctness", "speed", "ppo_step", "grpo_step", "training", "compile")
# Seconds per part on the GPU. Estimates from CPU runs and the device notes, not yet measured: setup ~40 (pip, import
# probes, two 2 GB model writes), correctness ~45 (Triton compiles ~20 kernel variants), speed ~40, each step
# benchmark ~60 (two children loading the models), training ~90 (three runs writing 0.5B checkpoints).
LIMITS = {"setup": 60, "correctness": 70, "speed": 60, "ppo_step": 80, "grpo_step": 70, "training": 100, "compile": 90}
BUDGET = 480
RESERVE = 8  # seconds kept back from the budget for the summary and the log archive
KILL_AFTER = 5  # seconds between `timeout`'s TERM and its KILL (sft.py/grpo.py checkpoint on TERM: no time for that)
TABLES = {
    "correctness": "1_kernel_correctness.md",
    "speed": "2_kernel_speed.md",
    "ppo_step": "3_ppo_step.md",
    "grpo_step": "3_grpo_step.md",
    "training": "4_training.md",
    "compile": "2_kernel_speed.md",
}
WHEEL_GROUPS = ("base", "trl-1.12.0", "trl-1.16.0", "liger")  # bench/gpu_wheels.sh's folders, one --target each

# Datasheet figures by device name (first match): (memory bytes/s, dense bf16 FLOP/s, fp32 FLOP/s), SXM unless named.
DATASHEET = (
    ("H200", 4.8e12, 989e12, 67e12),
    ("H100 NVL", 3.9e12, 835e12, 60e12),
    ("H100 PCIe", 2.0e12, 756e12, 51e12),
    ("H100", 3.35e12, 989e12, 67e12),
)

# What each mode runs. GPU: the shapes of the issue (V: Llama 3's and Qwen2.5's vocabularies, H: their 8B/7B hidden
# sizes). Dry run: the same code at shapes that take seconds on one CPU core under the Triton interpreter.
SETTINGS = {
    "gpu": {
        "n": 16384,
        "vocab": [128256, 152064],
        "hidden": [4096, 3584],
        "ref_rows": 1024,  # reference chunk: 1024 x 152064 fp32 = 0.6 GB per temporary
        "speed": "--n 16384 --v 128256 152064 --h 4096 --dtype bfloat16 --repeats 5",
        "compile": "--n 16384 --v 152064 --h 4096 --dtype bfloat16 --repeats 3",
        "bench_size": "0.5b",
        "ppo_step": "--updates 2",
        "grpo_step": "--updates 2",
        "train_shape": SIZE_0_5B,
        "sft": "--total-steps 30 --log-every 5 --eval-size 64 --local-micro-batch-size 32",
        "fsdp_steps": 10,
        "grpo": "--total-episodes 160 --local-rollout-batch-size 16 --num-generations 8 --response-length 32",
    },
    "dry": {
        "n": 40,
        "vocab": [1009, 1531],
        "hidden": [48, 40],
        "ref_rows": 16,
        "speed": "--n 128 --v 1531 --h 32 --ops logprob --repeats 1",
        "compile": "--n 128 --v 1531 --h 32 --ops logprob --repeats 1",
        "bench_size": "demo",
        "ppo_step": "--updates 1 --batch-size 4 --response-length 8 --ppo-epochs 1 --threads 1",
        "grpo_step": "--updates 1 --batch-size 2 --num-generations 2 --response-length 8 --threads 1",
        # vocabulary > the demo tokenizer's ~640 ids, as with the 0.5B shape: sampled ids outside the tokenizer
        "train_shape": {
            "hidden_size": 64,
            "intermediate_size": 172,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1024,
            "rope_theta": 1_000_000.0,
        },
        "sft": "--total-steps 4 --log-every 2 --eval-size 8 --local-micro-batch-size 4 --max-seq-len 64",
        "fsdp_steps": 2,
        "grpo": "--total-episodes 4 --local-rollout-batch-size 2 --num-generations 2 --response-length 8",
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", nargs="?", help="where the tables, summary and log archive go (the device's $OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted, demo-size model")
    p.add_argument("--parts", default=",".join(PARTS[1:]), help=f"comma-separated subset of {PARTS[1:]} (setup always)")
    p.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS", help="override one part's limit")
    p.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole suite; limits are cut to fit")
    p.add_argument("--work-dir", default=str(ROOT / "out" / "gpu_suite"), help="models, checkpoints, site, logs")
    p.add_argument("--wheels", default=None, help="bench/gpu_wheels.sh's folder (default .gpu_wheels; none when dry)")
    p.add_argument("--child", choices=("part", "script", "probe"), help=argparse.SUPPRESS)
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    if not args.outdir:
        p.error("OUTDIR is required")
    args.parts = [x for x in args.parts.split(",") if x]
    for part in args.parts:
        if part not in PARTS:
            p.error(f"unknown part {part!r}; choose from {PARTS[1:]}")
    limits = dict(LIMITS)
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds:
            p.error(f"--limit {item!r}: expected PART=SECONDS with PART in {PARTS}")
        limits[name] = float(seconds)
    args.limits = limits
    if args.wheels is None and not args.dry_run:
        args.wheels = str(ROOT / ".gpu_wheels")
    return args


# ------------------------------------------------------------------------------------------------------ plumbing


def error_text(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def with_paths(env: dict, *paths) -> dict:
    """env with existing `paths` put first on PYTHONPATH (they shadow the machine's packages of the same name)."""
    found = [str(p) for p in paths if p and Path(p).is_dir()]
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(found + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    return env


def base_env(cfg: dict) -> dict:
    """The environment of every part: offline (nothing can be reached from the GPU machine), no wandb, the base
    wheels on PYTHONPATH once setup has installed them; dry run: CPU only, Triton interpreted."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    env.pop("PLAINALIGN_KERNEL_BACKEND", None)
    if cfg["dry_run"]:
        # triton.jit reads TRITON_INTERPRET when `kernels` is imported: it has to be in the environment, not set later
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return with_paths(env, Path(cfg["site"]) / "base")


def run(cmd: list, env: dict, **kwargs) -> int:
    """Run a command from the repository root, its output going to this part's log; returns the exit status."""
    print(f"$ {shlex.join(str(c) for c in cmd)}", flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, check=False, **kwargs).returncode


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flag(flags: str, name: str) -> int:
    """The integer after `name` in a flag string ("--total-steps 30 ..." -> 30)."""
    words = flags.split()
    return int(words[words.index(name) + 1])


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fmt(x, spec=".3g") -> str:
    return "—" if x is None else format(x, spec)


# ------------------------------------------------------------------------------------------------- part: setup


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return name.lower().replace("_", "-"), version


def pip_install(wheels: list, target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]  # fmt: skip
    if run(cmd, dict(os.environ)) != 0:
        raise RuntimeError(f"pip could not install {[Path(w).name for w in wheels]} into {target}")


def needed_extras(extras: list, sites: list) -> tuple[list, list]:
    """Which carried if-needed wheels to install, and which requirements stay unmet.

    For every requirement of the packages installed into `sites` (datasets, tyro, trl, ...), the version found first in
    the sites, else on the machine, is checked against it; a carried wheel replaces a missing or unfit version only
    (replacing e.g. the machine's fsspec for everything on PYTHONPATH is the price; done only when datasets needs it).
    """
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    site_versions = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=sites)}
    carried = {wheel_name_version(w)[0]: w for w in extras}
    install, unmet = {}, []
    for dist in metadata.distributions(path=sites):
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            have = site_versions.get(name)
            if have is None:
                try:
                    have = metadata.version(name)
                except metadata.PackageNotFoundError:
                    pass
            if have is not None and req.specifier.contains(Version(have), prereleases=True):
                continue
            wheel = carried.get(name)
            if wheel is not None and req.specifier.contains(Version(wheel_name_version(wheel)[1]), prereleases=True):
                install[name] = wheel
            else:
                unmet.append(f"{dist.metadata['Name']} {dist.version} needs `{req}`, found {have or 'nothing'}")
    return sorted(install.values()), sorted(set(unmet))


PROBE_MODULES = ("torch", "triton", "transformers", "tokenizers", "accelerate", "huggingface_hub", "safetensors",
                 "numpy", "tyro", "datasets", "pyarrow", "fsspec", "typing_extensions")  # fmt: skip
REQUIRED = ("torch", "transformers", "tokenizers", "tyro", "datasets")
# optional library -> (its site folder, what must import, the distribution named in the report)
OPTIONAL = {
    "trl_ppo": ("trl-1.12.0", "trl.experimental.ppo:PPOTrainer", "trl"),
    "trl_grpo": ("trl-1.16.0", "trl:GRPOTrainer", "trl"),
    "liger": ("liger", "liger_kernel.transformers:LigerFusedLinearCrossEntropyLoss", "liger-kernel"),
}


def child_probe(spec: dict) -> None:
    """Import each of spec["imports"] ("module" or "module:attribute") and write what happened as JSON."""
    import importlib
    from importlib import metadata

    result = {}
    for item in spec["imports"]:
        module_name, _, attr = item.partition(":")
        try:
            module = importlib.import_module(module_name)
            if attr:
                getattr(module, attr)
            dist = spec.get("dist") or module_name.split(".")[0]
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                version = getattr(module, "__version__", "?")
            where = Path(module.__file__).resolve().parent
            result[item] = {"ok": True, "version": version, "where": str(where)}
        except Exception as e:  # noqa: BLE001  (any error while importing is the answer)
            result[item] = {"ok": False, "error": error_text(e)}
    if spec.get("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(0)
                result["cuda"] = {"name": props.name, "memory_gib": props.total_memory / GIB,
                                  "capability": f"{props.major}.{props.minor}", "torch_cuda": torch.version.cuda}  # fmt: skip
            else:
                result["cuda"] = None
        except Exception as e:  # noqa: BLE001
            result["cuda"] = {"error": error_text(e)}
    Path(spec["result"]).write_text(json.dumps(result))


def probe_all(cfg: dict) -> dict:
    """Run the import probes in parallel children, each with the PYTHONPATH its users get."""
    site, work = Path(cfg["site"]), Path(cfg["work"])
    env = base_env(cfg)
    jobs = {"main": ({"imports": list(PROBE_MODULES), "cuda": True}, env)}
    for key, (folder, target, dist) in OPTIONAL.items():
        jobs[key] = ({"imports": [target], "dist": dist}, with_paths(env, site / folder))
    procs = {}
    for key, (spec, job_env) in jobs.items():
        spec["result"] = str(work / f"probe_{key}.json")
        Path(spec["result"]).unlink(missing_ok=True)
        spec_path = work / f"probe_{key}.spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "probe", "--spec", str(spec_path)]
        procs[key] = subprocess.Popen(cmd, cwd=ROOT, env=job_env)
    found = {}
    for key, proc in procs.items():
        proc.wait()
        path = Path(jobs[key][0]["result"])
        found[key] = json.loads(path.read_text()) if path.exists() else {"error": f"probe exited {proc.returncode}"}
    caps = {"probes": found}
    for key, (folder, target, _) in OPTIONAL.items():
        entry = found[key].get(target, {})
        caps[key] = bool(entry.get("ok"))
        caps[key + "_path"] = str(site / folder) if (site / folder).is_dir() else None
    return caps


def capabilities(cfg: dict) -> dict:
    path = Path(cfg["work"]) / "capabilities.json"
    if path.exists():
        return json.loads(path.read_text())
    caps = probe_all(cfg)
    path.write_text(json.dumps(caps))
    return caps


def part_setup(cfg: dict, table: Path | None) -> dict:
    work, site = Path(cfg["work"]), Path(cfg["site"])
    wheels = Path(cfg["wheels"]) if cfg["wheels"] else None
    lines, notes, ok = ["## Setup", ""], [], True

    # 1. wheels: one --target per group, so that the two trl versions never meet; if-needed ones only where missing
    if wheels is not None and wheels.is_dir():
        groups = [g for g in WHEEL_GROUPS if sorted((wheels / g).glob("*.whl"))]
        for group in groups:
            files = sorted((wheels / group).glob("*.whl"))
            names = ", ".join(" ".join(wheel_name_version(w)) for w in files)
            try:
                pip_install(files, site / group)
            except RuntimeError as e:  # an optional group may fail alone; its probe below then says "not importable"
                lines.append(f"- **{e}**")
                ok = ok and group != "base"
                continue
            lines.append(f"- installed into {site.relative_to(work)}/{group}: {names}")
        extras = sorted((wheels / "if-needed").glob("*.whl"))
        install, unmet = needed_extras(extras, [str(site / g) for g in groups])
        if install:
            pip_install(install, site / "base")
        skipped = sorted(set(extras) - set(install))
        lines.append(
            "- installed where the machine's version misses a requirement: "
            + (", ".join(" ".join(wheel_name_version(w)) for w in install) or "none")
            + (f" (not needed: {', '.join(wheel_name_version(w)[0] for w in skipped)})" if skipped else "")
        )
        for item in unmet:
            lines.append(f"- **unmet requirement** (not carried): {item}")
        sys.path.insert(0, str(site / "base"))  # this process builds models below; later parts get it on PYTHONPATH
    elif cfg["dry_run"]:
        lines.append("- dry run: no wheels installed; this Python's own packages are used")
    else:
        ok = False
        notes.append(f"no wheels folder {wheels}: run bench/gpu_wheels.sh and carry .gpu_wheels")
        lines.append(f"- **no wheels folder {wheels}**: tyro and datasets must already be installed")

    # 2. what imports, with which version, from where
    caps = probe_all(cfg)
    main = caps["probes"]["main"]
    lines += ["", "| package | version | from |", "| --- | --- | --- |"]
    for name in PROBE_MODULES:
        entry = main.get(name, {"ok": False, "error": "probe failed"})
        if entry["ok"]:
            where = entry["where"]
            where = Path(where).relative_to(ROOT) if Path(where).is_relative_to(ROOT) else where
            lines.append(f"| {name} | {entry['version']} | {where} |")
        else:
            lines.append(f"| {name} | **not importable**: {entry['error']} | |")
            if name in REQUIRED:
                ok = False
                notes.append(f"{name} does not import")
    for key, (folder, target, _) in OPTIONAL.items():
        entry = caps["probes"][key].get(target, {"ok": False, "error": "probe failed"})
        state = f"{entry['version']}" if entry["ok"] else f"not importable ({entry['error']})"
        lines.append(
            f"| {target} | {state} | {'<work>/site-packages/' + folder if caps[key + '_path'] else 'this Python'} |"
        )
    cuda = main.get("cuda")
    if cfg["device"] == "cuda":
        if not cuda or "error" in cuda:
            ok = False
            notes.append(f"no CUDA device: {cuda}")
        else:
            lines.append(f"\n- CUDA: {cuda['name']}, {cuda['memory_gib']:.1f} GiB, capability {cuda['capability']}, "
                         f"CUDA {cuda['torch_cuda']}")  # fmt: skip
    (work / "capabilities.json").write_text(json.dumps(caps))

    # 3. the step benchmarks' 0.5B models (ppo_step and grpo_step share them; ~2 GB each to write), built here so that
    # neither benchmark's limit pays for it. The demo-size ones of a dry run take a second: the benchmarks build them.
    if ok and not cfg["dry_run"]:
        from bench.ppo_step import build_models

        t0 = time.time()
        model_dir = work / "ppo_step" / cfg["settings"]["bench_size"]
        build_models(cfg["settings"]["bench_size"], model_dir)
        lines.append(f"- bench/ppo_step.py's {cfg['settings']['bench_size']} policy and reward model in "
                     f"{model_dir.relative_to(work)} ({time.time() - t0:.0f} s)")  # fmt: skip
    (work / "setup.md").write_text("\n".join(lines) + "\n")
    versions = ", ".join(
        f"{n} {main[n]['version']}" for n in ("torch", "triton", "transformers") if main.get(n, {}).get("ok")
    )
    optional = ", ".join(f"{k} {'yes' if caps[k] else 'no'}" for k in OPTIONAL)
    device = (cuda or {}).get("name", "CPU") if cfg["device"] == "cuda" else "CPU"
    return {"status": "passed" if ok else "failed", "headline": f"{device}; {versions}; {optional}", "notes": notes}


# ------------------------------------------------------------------------------------------- part: correctness


class MaxError:
    """Max abs error over row chunks, and the verdict of torch.isclose(actual, expected, rtol, atol) (NaN never
    passes), the rule of tests/test_kernels.py."""

    def __init__(self, info: bool = False):
        self.err, self.ref, self.bad, self.count, self.atol, self.rtol, self.info = 0.0, 0.0, 0, 0, 0.0, 0.0, info

    def add(self, actual, expected, atol: float, rtol: float) -> None:
        import torch

        a, e = actual.detach().float(), expected.detach().float()
        self.err = max(self.err, (a - e).abs().nan_to_num(nan=float("inf")).max().item())
        self.ref = max(self.ref, e.abs().max().item())
        self.bad += int((~torch.isclose(a, e, rtol=rtol, atol=atol)).sum())
        self.count += a.numel()
        self.atol, self.rtol = max(self.atol, atol), rtol

    @property
    def ok(self) -> bool:
        return self.bad == 0 and self.count > 0


EPS32 = 2.0**-23
GRAD_RTOL = {"float32": 1e-4, "bfloat16": 2**-6}  # gradients are rounded to the input dtype (2 ulps)


def fwd_atol(x, temperature: float) -> float:
    """fp32 rounding of z = x / T at this logit magnitude (tests/test_kernels.py's rule)."""
    return 1e-5 + 16 * EPS32 * x.detach().float().abs().max().item() / temperature


def grad_tols(expected, dtype_name: str) -> tuple[float, float]:
    """Relative to the largest gradient of the chunk: fp32 rounding of terms the size of log-probs cancels there."""
    return 5e-5 * expected.detach().float().abs().max().item() + 1e-7, GRAD_RTOL[dtype_name]


def check_selective_logprob(n, v, h, dtype, device, rows, entropy: bool) -> dict:
    import torch

    import kernels

    T = 0.9
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(n, v, device=device, generator=g) * 4).to(dtype).requires_grad_()  # (N, V)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::7] = -100
    g_logp, g_ent = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
    out = kernels.selective_logprob(x, labels, T, return_entropy=entropy, backend="triton")
    logp, ent = out if entropy else (out, None)
    ((logp * g_logp).sum() + ((ent * g_ent).sum() if entropy else 0.0)).backward()
    errs = {"logp": MaxError()} | ({"entropy": MaxError()} if entropy else {}) | {"grad logits": MaxError()}
    name = str(dtype).split(".")[-1]
    for r0 in range(0, n, rows):
        r = slice(r0, r0 + rows)
        xc = x[r].detach().float().requires_grad_()  # fp32 reference on the same values
        ref = kernels.selective_logprob_reference(xc, labels[r], T, return_entropy=entropy)
        ref_logp, ref_ent = ref if entropy else (ref, None)
        ((ref_logp * g_logp[r]).sum() + ((ref_ent * g_ent[r]).sum() if entropy else 0.0)).backward()
        errs["logp"].add(logp[r], ref_logp, fwd_atol(xc, T), 1e-5)
        if entropy:
            errs["entropy"].add(ent[r], ref_ent, fwd_atol(xc, T), 1e-5)
        errs["grad logits"].add(x.grad[r], xc.grad, *grad_tols(xc.grad, name))
    return errs


def check_full_kl(n, v, h, dtype, device, rows) -> dict:
    import torch

    import kernels

    T = 1.1
    g = torch.Generator(device=device).manual_seed(0)
    a = (torch.randn(n, v, device=device, generator=g) * 4).to(dtype).requires_grad_()  # (N, V) logits of p
    b = (torch.randn(n, v, device=device, generator=g) * 4).to(dtype).requires_grad_()  # (N, V) logits of q
    upstream = torch.randn(n, device=device, generator=g)
    kl = kernels.full_kl(a, b, T, backend="triton")
    (kl * upstream).sum().backward()
    errs = {"kl": MaxError(), "grad p": MaxError(), "grad q": MaxError()}
    name = str(dtype).split(".")[-1]
    for r0 in range(0, n, rows):
        r = slice(r0, r0 + rows)
        ac, bc = a[r].detach().float().requires_grad_(), b[r].detach().float().requires_grad_()
        ref = kernels.full_kl_reference(ac, bc, T)
        (ref * upstream[r]).sum().backward()
        errs["kl"].add(kl[r], ref, 1e-4 + fwd_atol(torch.cat([ac, bc]), T), 1e-5)
        errs["grad p"].add(a.grad[r], ac.grad, *grad_tols(ac.grad, name))
        errs["grad q"].add(b.grad[r], bc.grad, *grad_tols(bc.grad, name))
    return errs


def check_from_hidden(n, v, h, dtype, device, rows) -> dict:
    """Against the reference math on the same matmul: logits = hidden @ weight.T in the inputs' dtype (what the op and
    the model's LM head compute), then the fp32 reference, in the op's own token chunks so that the two matmuls have
    the same shapes and round alike. For bf16 the fp32-matmul reference is reported too, for information: it also
    measures bf16's rounding of the logits, which no kernel can remove."""
    import importlib

    import torch

    import kernels

    from_hidden = importlib.import_module("kernels.selective_logprob_from_hidden")
    T = 0.9
    name = str(dtype).split(".")[-1]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_()  # (N, H)
    weight = (torch.randn(v, h, device=device, generator=g) / h**0.5 * 3).to(dtype).requires_grad_()  # (V, H)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[::7] = -100
    g_logp, g_ent = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
    logp, ent = kernels.selective_logprob_from_hidden(hidden, weight, labels, T, return_entropy=True, backend="triton")
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    errs = {"logp": MaxError(), "entropy": MaxError(), "grad hidden": MaxError(), "grad weight": MaxError()}
    if dtype != torch.float32:
        errs["logp vs fp32 matmul (info)"] = MaxError(info=True)
    grad_w = torch.zeros(v, h, device=device, dtype=torch.float32)
    chunk = from_hidden._chunk_rows(v, dtype, torch.device(device))  # the op's own token chunk
    for r0 in range(0, n, chunk):
        r = slice(r0, r0 + chunk)
        hc, wc = hidden[r].detach().requires_grad_(), weight.detach().requires_grad_()
        logits = hc @ wc.T  # (C, V) in the inputs' dtype
        ref_logp, ref_ent = kernels.selective_logprob_reference(logits, labels[r], T, return_entropy=True)
        ((ref_logp * g_logp[r]).sum() + (ref_ent * g_ent[r]).sum()).backward()
        atol = fwd_atol(logits, T)
        errs["logp"].add(logp[r], ref_logp, atol, 1e-5)
        errs["entropy"].add(ent[r], ref_ent, atol, 1e-5)
        # bf16 gradients of a bf16 matmul: each side rounds its (C, V) gradient to bf16 before the matmul
        tols = grad_tols(hc.grad, name) if dtype == torch.float32 else (4e-3 * hc.grad.abs().max().item(), 2e-2)
        errs["grad hidden"].add(hidden.grad[r], hc.grad, *tols)
        grad_w += wc.grad.float()
        if dtype != torch.float32:
            with torch.no_grad():
                exact = kernels.selective_logprob_from_hidden_reference(hc, wc, labels[r], T)
            errs["logp vs fp32 matmul (info)"].add(logp[r], exact, float("inf"), 0.0)
    tols = grad_tols(grad_w, name) if dtype == torch.float32 else (4e-3 * grad_w.abs().max().item(), 2e-2)
    errs["grad weight"].add(weight.grad, grad_w, *tols)
    return errs


CHECKS = {
    "selective_logprob": lambda *a: check_selective_logprob(*a, entropy=False),
    "selective_logprob + entropy": lambda *a: check_selective_logprob(*a, entropy=True),
    "full_kl": check_full_kl,
    "selective_logprob_from_hidden (+ entropy)": check_from_hidden,
}


def part_correctness(cfg: dict, table: Path) -> dict:
    import torch

    import kernels

    s, device = cfg["settings"], cfg["device"]
    if not kernels.HAS_TRITON:
        table.write_text("# Kernel correctness\n\ntriton is not installed: nothing to check\n")
        return {"status": "failed", "headline": "triton is not installed"}
    with open(table, "w") as f:
        f.write(
            f"# Kernel correctness: Triton kernels vs the fp32 references of kernels/ (N = {s['n']} tokens)\n\n"
            f"- device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU, Triton interpreted'}; "
            f"torch {torch.__version__}\n"
            "- inputs: logits N(0, 4^2), hidden N(0, 1), weight N(0, 9 / H), every 7th label -100, random upstream "
            "gradients for every output; temperature 0.9 (full_kl 1.1)\n"
            f"- references: fp32 on the same input values, {s['ref_rows']} rows at a time (from_hidden: the op's "
            "own token chunks, the same matmul in the inputs' dtype, then the fp32 reference)\n"
            "- within: torch.isclose(ours, reference, rtol, atol) everywhere, tests/test_kernels.py's tolerances: "
            "forward atol = fp32 rounding at the logits' magnitude; gradients rtol 2 ulps of the dtype, atol relative "
            "to the largest gradient (bf16 from_hidden: 4e-3 of it, rtol 2e-2)\n\n"
            "| op | dtype | V | H | quantity | max abs error | max abs reference | atol, rtol | within |\n"
            "| --- | --- | ---: | ---: | --- | ---: | ---: | --- | --- |\n"
        )
        f.flush()
        n_ok = n_all = 0
        worst, failures = (0.0, ""), []
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).split(".")[-1]
            for v, h in zip(s["vocab"], s["hidden"], strict=True):
                for op, check in CHECKS.items():
                    h_col = h if "hidden" in op else "—"
                    t0 = time.time()
                    try:
                        errs = check(s["n"], v, h, dtype, device, s["ref_rows"])
                    except Exception as e:  # noqa: BLE001  (an OOM or a compile error is this row's result)
                        print(traceback.format_exc(), flush=True)
                        f.write(f"| {op} | {name} | {v} | {h_col} | — | **error**: {error_text(e)} | | | no |\n")
                        f.flush()
                        n_all += 1
                        failures.append(f"{op} {name} V={v}: {error_text(e)}")
                        continue
                    for q, e in errs.items():
                        verdict = "info" if e.info else ("yes" if e.ok else f"**no** ({e.bad}/{e.count})")
                        f.write(f"| {op} | {name} | {v} | {h_col} | {q} | {e.err:.3e} | {e.ref:.3e} | "
                                f"{e.atol:.1e}, {e.rtol:.1e} | {verdict} |\n")  # fmt: skip
                        if e.info:
                            continue
                        n_all += 1
                        n_ok += e.ok
                        if not e.ok:
                            failures.append(f"{op} {name} V={v} {q}")
                        if e.ref > 0 and e.err / e.ref > worst[0]:
                            worst = (e.err / e.ref, f"{op} {name} V={v} {q}")
                    f.flush()
                    print(f"{op} {name} V={v}: {time.time() - t0:.1f} s", flush=True)
                    del errs
    headline = (
        f"{n_ok}/{n_all} quantities within tolerance; largest error / max |reference|: {worst[0]:.1e} ({worst[1]})"
    )
    if failures:
        headline += "; off: " + "; ".join(failures[:4])
    return {"status": "passed" if n_ok == n_all and n_all else "failed", "headline": headline}


# ------------------------------------------------------------------------------------------- part: speed, compile


def parse_kernels_output(text: str) -> dict:
    """bench/kernels.py's markdown -> {"bandwidth", "dtype", "h", "device", "tables": {(op, n, v): {method: row}}}."""
    found = {"tables": {}, "bandwidth": None, "dtype": None, "h": None, "device": None}
    current = None
    for line in text.splitlines():
        if m := re.match(r"- measured memory bandwidth \(copy, read \+ write\): ([\d.]+) GB/s", line):
            found["bandwidth"] = float(m.group(1)) * 1e9
        elif m := re.match(r"- dtype (\w+), .*H = (\d+) for from_hidden", line):
            found["dtype"], found["h"] = m.group(1), int(m.group(2))
        elif m := re.match(r"- device: (.*)", line):
            found["device"] = m.group(1)
        elif m := re.match(r"### (\S+): N=(\d+), V=(\d+)", line):
            current = found["tables"].setdefault((m.group(1), int(m.group(2)), int(m.group(3))), {})
        elif current is not None and line.startswith("| ") and not line.startswith(("| method", "| ---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[1].startswith("skipped"):
                current[cells[0]] = {"error": cells[1]}
            else:
                try:
                    current[cells[0]] = {"fwd_ms": float(cells[1]), "fwdbwd_ms": float(cells[2])}
                except (ValueError, IndexError):
                    current[cells[0]] = {"error": line}
    return found


def datasheet(device_name: str | None):
    for fragment, bandwidth, bf16, fp32 in DATASHEET:
        if device_name and fragment in device_name:
            return {"name": fragment, "bandwidth": bandwidth, "flops": {"bfloat16": bf16, "float32": fp32}}
    return None


def floors_ms(op: str, n: int, v: int, h: int, dtype: str, bandwidth: float | None, flops: float | None):
    """(fwd, fwd+bwd) lower bounds in ms. Logits ops: bytes moved over bandwidth (forward reads the logits once;
    backward reads them again and writes their gradient: 3x; full_kl has two inputs). from_hidden: its matmuls over
    the matrix rate (2NHV forward; forward + the two backward matmuls 6NHV), bytes being small beside them."""
    if op == "from_hidden":
        return (None, None) if not flops else (2 * n * h * v / flops * 1e3, 6 * n * h * v / flops * 1e3)
    if not bandwidth:
        return None, None
    size = n * v * (4 if dtype == "float32" else 2) * (2 if op == "full_kl" else 1)
    return size / bandwidth * 1e3, 3 * size / bandwidth * 1e3


def floor_table(parsed: dict) -> tuple[str, str]:
    """Markdown table of measured times next to the floors, and a one-line headline for the summary."""
    sheet = datasheet(parsed["device"])
    dtype, h = parsed["dtype"] or "bfloat16", parsed["h"] or 0
    peak = sheet["bandwidth"] if sheet else None
    flops = sheet["flops"].get(dtype) if sheet else None
    where = (
        f"datasheet of the {sheet['name']}: {peak / 1e12:.2f} TB/s, {flops / 1e12:.0f} TFLOP/s dense {dtype}"
        if sheet
        else f"no datasheet entry for {parsed['device']!r}"
    )
    lines = [
        "\n## Floors: bytes moved / bandwidth (from_hidden: FLOPs / matrix rate)\n",
        f"- {where}; measured copy bandwidth: {fmt(parsed['bandwidth'] and parsed['bandwidth'] / 1e12, '.3g')} TB/s",
        "- x floor = measured / datasheet floor (1.0 would be the datasheet rate)\n",
        "| op | N | V | floor fwd ms | floor fwd+bwd ms | at measured copy bw, fwd+bwd ms | ours fwd ms | ours fwd+bwd "
        "ms | ours fwd+bwd x floor | liger fwd+bwd ms | eager fwd+bwd ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    heads = {}
    for (op, n, v), rows in parsed["tables"].items():
        f_fwd, f_all = floors_ms(op, n, v, h, dtype, peak, flops)
        _, m_all = floors_ms(op, n, v, h, dtype, parsed["bandwidth"], None)
        ours = rows.get("ours (triton)") or rows.get("ours (torch chunked)") or {}
        ratio = ours.get("fwdbwd_ms") / f_all if f_all and ours.get("fwdbwd_ms") else None
        lines.append(
            f"| {op} | {n} | {v} | {fmt(f_fwd)} | {fmt(f_all)} | {fmt(m_all)} | {fmt(ours.get('fwd_ms'))} | "
            f"{fmt(ours.get('fwdbwd_ms'))} | {fmt(ratio, '.2f')} | {fmt(rows.get('liger', {}).get('fwdbwd_ms'))} | "
            f"{fmt(rows.get('eager', {}).get('fwdbwd_ms'))} |"
        )
        heads[op] = (v, ours.get("fwdbwd_ms"), ratio)  # the last (largest) V of each op
    headline = "ours fwd+bwd: " + ", ".join(
        f"{op} V={v} {fmt(ms)} ms" + (f" ({ratio:.1f}x floor)" if ratio else "") for op, (v, ms, ratio) in heads.items()
    )
    return "\n".join(lines) + "\n", headline


def expected_tables(flags: str) -> int:
    """Tables bench/kernels.py prints for these flags: one per op x N x V."""
    values, current = {}, None
    for word in flags.split():
        if word.startswith("--"):
            current = values.setdefault(word, [])
        else:
            current.append(word)
    ops = len(values["--ops"][0].split(",")) if "--ops" in values else 4
    return ops * len(values["--n"]) * len(values["--v"])


def kernels_command(cfg: dict, key: str) -> list:
    cmd = [sys.executable, "bench/kernels.py", "--device", cfg["device"], *cfg["settings"][key].split()]
    if key == "speed":
        cmd += ["--no-compile"]
    elif cfg["dry_run"]:
        # Inductor on a CPU compiles C++ for tens of seconds per op: more than the dry run's test may take
        cmd += ["--no-compile", "--methods", "eager"]
    else:
        cmd += ["--methods", "eager,compile"]
    return cmd


def run_kernels_bench(cfg: dict, key: str, table: Path, title: str) -> tuple[int, dict]:
    caps = capabilities(cfg)
    env = base_env(cfg)
    if caps.get("liger"):
        env = with_paths(env, caps.get("liger_path"))
    cmd = kernels_command(cfg, key)
    with open(table, "a" if key == "compile" else "w") as f:
        f.write(f"{title}\n\n- command: `{shlex.join(['python', *cmd[1:]])}`\n\n")
        f.flush()
        rc = run(cmd, env, stdout=f)  # streams: on a timeout, the tables printed so far stay
    text = table.read_text()
    section = text if key == "speed" else text[text.rfind(title) :]
    return rc, parse_kernels_output(section)


def part_speed(cfg: dict, table: Path) -> dict:
    title = "# Kernel speed and memory: bench/kernels.py (no torch.compile rows: see the last section)"
    rc, parsed = run_kernels_bench(cfg, "speed", table, title)
    floors, headline = floor_table(parsed)
    with open(table, "a") as f:
        f.write(floors)
    ours = "ours (triton)" if cfg["device"] == "cuda" else "ours (torch chunked)"
    missing = [f"{op} V={v}" for (op, n, v), rows in parsed["tables"].items() if "fwdbwd_ms" not in rows.get(ours, {})]
    expected = expected_tables(cfg["settings"]["speed"])
    if len(parsed["tables"]) < expected:
        missing.append(f"{expected - len(parsed['tables'])} of {expected} tables")
    ok = rc == 0 and not missing
    if missing:
        headline += f"; no {ours} row for " + ", ".join(missing)
    return {"status": "passed" if ok else "failed", "headline": headline if rc == 0 else f"exit {rc}; {headline}"}


def part_compile(cfg: dict, table: Path) -> dict:
    title = "\n## torch.compile rows (bench/kernels.py --methods eager,compile)"
    if cfg["dry_run"]:
        title += "\n\nDry run: eager only (a CPU inductor compile takes longer than the test allows)"
    rc, parsed = run_kernels_bench(cfg, "compile", table, title)
    method = "eager" if cfg["dry_run"] else "compile"
    done = [
        (op, v, rows[method]) for (op, n, v), rows in parsed["tables"].items() if "fwdbwd_ms" in rows.get(method, {})
    ]
    failed = [f"{op} V={v}" for (op, n, v), rows in parsed["tables"].items() if "error" in rows.get(method, {})]
    headline = f"{method} fwd+bwd: " + (", ".join(f"{op} V={v} {r['fwdbwd_ms']:.3g} ms" for op, v, r in done) or "none")
    if failed:
        headline += "; failed: " + ", ".join(failed)
    ok = rc == 0 and done and not failed
    return {"status": "passed" if ok else "failed", "headline": headline if rc == 0 else f"exit {rc}; {headline}"}


# ------------------------------------------------------------------------------------------ part: step benchmarks


def step_headline(table: Path) -> str:
    """The benchmark's verdict line, or (one side only) its row's episodes/s and peak memory."""
    text = table.read_text() if table.exists() else ""
    target = next((line for line in text.splitlines() if line.startswith("Target")), None)
    if target:
        return target
    header = next((line for line in text.splitlines() if line.startswith("| | episodes/s")), None)
    row = next((line for line in text.splitlines() if line.startswith("| ours")), None)
    if not header or not row:
        return "no table"
    cells = dict(zip(header.strip("|").split("|"), row.strip("|").split("|"), strict=False))
    return f"ours {cells[' episodes/s '].strip()} episodes/s, peak memory {cells[' peak memory MiB '].strip()} MiB"


def part_ppo_step(cfg: dict, table: Path) -> dict:
    s, work, caps = cfg["settings"], Path(cfg["work"]), capabilities(cfg)
    env = base_env(cfg)
    cmd = [sys.executable, "bench/ppo_step.py", "--size", s["bench_size"], "--device", cfg["device"], *s["ppo_step"].split(),
           "--work-dir", work / "ppo_step" / s["bench_size"], "--output", table, "--note", "bench/gpu_suite.py"]  # fmt: skip
    if caps.get("trl_ppo"):
        env = with_paths(env, caps.get("trl_ppo_path"))  # trl 1.12.0 (its PPOTrainer), ahead of the base wheels
    else:
        cmd += ["--only", "ours"]
    table.unlink(missing_ok=True)
    rc = run(cmd, env)
    ok = rc == 0 and table.exists()
    headline = step_headline(table) + ("" if caps.get("trl_ppo") else " (TRL 1.12 not importable: ours alone)")
    return {"status": "passed" if ok else "failed", "headline": headline if rc == 0 else f"exit {rc}"}


def part_grpo_step(cfg: dict, table: Path) -> dict:
    s, work, caps = cfg["settings"], Path(cfg["work"]), capabilities(cfg)
    size = s["bench_size"]
    # without a carried trl-1.16.0 folder the TRL side uses this Python's trl, if that imports (a missing folder tells
    # grpo_step.py not to use its default out/bench/trl-1.16.0)
    trl_path = caps.get("trl_grpo_path") or work / "no-trl-folder"
    cmd = [sys.executable, "bench/grpo_step.py", "--size", size, "--device", cfg["device"], *s["grpo_step"].split(),
           "--model-dir", work / "ppo_step" / size, "--work-dir", work / "grpo_step" / size, "--trl-path", trl_path,
           "--output", table, "--note", "bench/gpu_suite.py"]  # fmt: skip
    if not caps.get("trl_grpo"):
        cmd += ["--only", "ours"]
    table.unlink(missing_ok=True)
    rc = run(cmd, base_env(cfg))
    ok = rc == 0 and table.exists()
    headline = step_headline(table) + ("" if caps.get("trl_grpo") else " (TRL 1.16 not importable: ours alone)")
    return {"status": "passed" if ok else "failed", "headline": headline if rc == 0 else f"exit {rc}"}


# ------------------------------------------------------------------------------------------------ part: training


def build_train_model(path: Path, shape: dict) -> Path:
    """A random Llama of `shape` with the demo tokenizer as it is (EOS = end of turn: this is the demo task, unlike
    bench/ppo_step.py's models, whose EOS never comes). Initialised on the GPU when there is one (seconds instead of
    a minute on the CPU) and saved in bf16 (half the bytes to write; the scripts load fp32 master weights)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from common.models import ensure_demo_base

    if (path / "config.json").exists() and json.loads((path / "shape.json").read_text()) == shape:
        return path
    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_base(ROOT / "out" / "demo" / "base"))
    config = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]), torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "shape.json").write_text(json.dumps(shape))
    return path


def force_fsdp() -> None:
    """Make common.dist take its multi-process path with one process: FSDP2 (`fully_shard` per block, then the root)
    with bf16 mixed precision on CUDA, NCCL collectives, distributed checkpointing.

    `torchrun --nproc_per_node 1` alone runs the single-process path (Dist.enabled is WORLD_SIZE > 1: no process group,
    plain model, autocast), and two processes cannot share the one GPU under NCCL. So the process group is created
    here and Dist.enabled reads True; everything else is the scripts' own code."""
    import torch
    import torch.distributed as torch_dist

    from common import dist

    dist.Dist.enabled = property(lambda self: True)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        torch_dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        torch_dist.init_process_group("gloo")


def child_script(spec: dict) -> None:
    """Run a training script's __main__ in this process (runpy) and write its wall time and peak memory at exit:
    torch.cuda.max_memory_allocated() on CUDA (sft.py logs none), peak RSS on the CPU."""
    import atexit
    import runpy

    import torch

    t0 = time.time()

    def report():
        cuda = torch.cuda.is_available()
        peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        Path(spec["result"]).write_text(json.dumps({"wall": time.time() - t0, "peak": peak, "cuda": cuda}))

    atexit.register(report)
    if spec.get("force_fsdp"):
        force_fsdp()
    sys.argv = [spec["script"], *spec["argv"]]
    runpy.run_path(str(ROOT / spec["script"]), run_name="__main__")


def run_script(cfg: dict, name: str, script: str, argv: list, torchrun: bool = False) -> tuple[int, dict]:
    work = Path(cfg["work"]) / "training"
    spec = {"script": script, "argv": [str(a) for a in argv], "result": str(work / f"{name}.result.json"),
            "force_fsdp": torchrun}  # fmt: skip
    Path(spec["result"]).unlink(missing_ok=True)
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd = (launcher if torchrun else [sys.executable]) + [
        Path(__file__).resolve(),
        "--child",
        "script",
        "--spec",
        spec_path,
    ]
    rc = run(cmd, base_env(cfg))
    result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else {}
    return rc, result


def demo_sft_subset(path: Path, rows: int) -> Path:
    """The first `rows` rows of the demo task's SFT data. sft.py tokenizes all of its --data before the first step
    (the demo's 30000 rows: ~10 s of CPU a run), and these runs read only steps x batch + eval rows of it."""
    from common import demo_task

    source = demo_task.ensure_data("sft", ROOT / demo_task.DEMO_DATA_DIR)
    path.write_text("".join(source.read_text().splitlines(keepends=True)[:rows]))
    return path


def mean_after_first(rows: list, key: str) -> float | None:
    """Mean of a per-step metric over the logged steps after the first (the first carries the warm-up)."""
    values = [r[key] for r in rows if key in r]
    values = values[1:] or values
    return sum(values) / len(values) if values else None


def part_training(cfg: dict, table: Path) -> dict:
    s, work = cfg["settings"], Path(cfg["work"]) / "training"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = build_train_model(work / "base", s["train_shape"])
    build_s = time.time() - t0
    steps, every, batch = (flag(s["sft"], f) for f in ("--total-steps", "--log-every", "--local-micro-batch-size"))
    data = demo_sft_subset(work / "sft_data.jsonl", steps * batch + flag(s["sft"], "--eval-size"))
    common = ["--demo-eval-prompts", "0", "--save-every", "0", "--seed", "1"]
    # constant LR after 5 warm-up steps in both sft runs, so that the FSDP run's steps match the plain run's
    sft = [*common, "--model-path", base, "--data", data, "--eval-every", "0", "--learning-rate", "1e-4",
           "--lr-schedule", "constant", "--warmup-steps", "5", *s["sft"].split()]  # fmt: skip
    shape = ", ".join(f"{k}={v}" for k, v in s["train_shape"].items() if k != "rope_theta")
    runs = []  # (name, numbers for the headline, problems)
    with open(table, "w") as f:
        f.write(
            "# Training runs on the demo task\n\n"
            f"- model: random Llama ({shape}; tied embeddings) with the demo tokenizer, built in {build_s:.0f} s\n"
            f"- sft: `python sft.py` on the first {steps * batch} + eval rows of the demo SFT data (single process: "
            "bf16 autocast on CUDA); grpo: `python grpo.py --data demo` from the sft result; sft FSDP2: `torchrun "
            "--nproc_per_node 1` with bench/gpu_suite.py's force_fsdp (common/dist.py's multi-process path: "
            "fully_shard per block + root, bf16 parameters / fp32 reduction on CUDA), same data and LR as sft\n"
            "- tokens/s: the scripts' perf/tokens_per_sec (sft: tokens of the batches; grpo: trained response "
            "tokens), mean over the logged steps after the first; peak memory: torch.cuda.max_memory_allocated() "
            "(CPU: peak RSS); wall: the whole process, loading and the final checkpoint included\n\n"
            "| run | logged steps | loss first → last | final eval loss | tokens/s | rollout tokens/s | peak memory GiB "
            "| wall s | checks |\n| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |\n"
        )
        f.flush()

        def report(name, rows, loss_key, result, rc, checks, eval_loss=None, rollout=None):
            losses = [r[loss_key] for r in rows if loss_key in r]
            first_last = f"{fmt(losses[0], '.4g')} → {fmt(losses[-1], '.4g')}" if losses else "—"
            speed, peak = mean_after_first(rows, "perf/tokens_per_sec"), result.get("peak")
            if rc != 0:
                checks = [f"exit {rc}", *checks]
            f.write(f"| {name} | {len(losses)} | {first_last} | {fmt(eval_loss, '.4g')} | {fmt(speed, '.0f')} | "
                    f"{fmt(rollout, '.0f')} | {fmt(peak and peak / GIB, '.2f')} | {fmt(result.get('wall'), '.0f')} | "
                    f"{'**' + '; '.join(checks) + '**' if checks else 'ok'} |\n")  # fmt: skip
            f.flush()
            numbers = f"loss {first_last}, {fmt(speed, '.0f')} tok/s, peak {fmt(peak and peak / GIB, '.1f')} GiB"
            runs.append((name, numbers, checks))

        # 1. sft
        rc, result = run_script(cfg, "sft", "sft.py", [*sft, "--output-dir", work / "sft"])
        rows = read_jsonl(work / "sft" / "metrics.jsonl")
        train = [r for r in rows if "train/loss" in r]
        eval_loss = next((r["eval/loss"] for r in reversed(rows) if "eval/loss" in r), None)
        checks = loss_checks(train, "train/loss", steps // every)
        if not finite(eval_loss):
            checks.append(f"final eval/loss {eval_loss}")
        report("sft", train, "train/loss", result, rc, checks, eval_loss)
        plain = {r["step"]: r["train/loss"] for r in train}

        # 2. grpo from the sft result (from the random model if sft left none)
        start = work / "sft" if (work / "sft" / "config.json").exists() else base
        argv = [*common, "--model-path", start, "--data", "demo", "--output-dir", work / "grpo", "--learning-rate",
                "1e-6", "--sample-every", "0", "--log-every", "1", *s["grpo"].split()]  # fmt: skip
        rc, result = run_script(cfg, "grpo", "grpo.py", argv)
        rows = [r for r in read_jsonl(work / "grpo" / "metrics.jsonl") if "grpo/loss" in r]
        updates = flag(s["grpo"], "--total-episodes") // flag(s["grpo"], "--local-rollout-batch-size")
        checks = loss_checks(rows, "grpo/loss", updates, decrease=False)
        checks += [f"reward/mean {r.get('reward/mean')}" for r in rows if not finite(r.get("reward/mean"))][:1]
        if start == base:
            checks.append("started from the random model (sft left no result)")
        report(
            "grpo", rows, "grpo/loss", result, rc, checks, rollout=mean_after_first(rows, "perf/rollout_tokens_per_sec")
        )

        # 3. sft under torchrun on the FSDP2 path, step by step against the plain run (same data, same LR)
        fsdp = [*sft, "--total-steps", str(s["fsdp_steps"]), "--output-dir", work / "sft_fsdp"]  # the last flag wins
        rc, result = run_script(cfg, "sft_fsdp", "sft.py", fsdp, torchrun=True)
        rows = read_jsonl(work / "sft_fsdp" / "metrics.jsonl")
        train = [r for r in rows if "train/loss" in r]
        checks = loss_checks(train, "train/loss", s["fsdp_steps"] // every)
        diffs = [abs(r["train/loss"] / plain[r["step"]] - 1) for r in train if r["step"] in plain]
        # bf16 FSDP parameters vs bf16 autocast over fp32 weights: close, not equal; a broken sharded step is far off
        if not diffs or max(diffs) > 0.1:
            checks.append(f"loss vs the plain run: {fmt(diffs and max(diffs), '.1%')} off (limit 10%)")
        eval_loss = next((r["eval/loss"] for r in reversed(rows) if "eval/loss" in r), None)
        report("sft, torchrun FSDP2", train, "train/loss", result, rc, checks, eval_loss)
        f.write(f"\n- FSDP2 run vs plain run, train/loss at the same steps: largest relative difference "
                f"{fmt(diffs and max(diffs), '.2%')}\n")  # fmt: skip

    problems = [f"{name}: {'; '.join(checks)}" for name, _, checks in runs if checks]
    headline = "; ".join(f"{name}: {numbers}" for name, numbers, _ in runs[:2])
    headline += f"; FSDP2 vs plain loss {fmt(diffs and max(diffs), '.2%')}"
    if problems:
        headline = "; ".join(problems) + " | " + headline
    return {"status": "failed" if problems else "passed", "headline": headline}


def loss_checks(rows: list, key: str, expected: int, decrease: bool = True) -> list:
    losses = [r.get(key) for r in rows]
    checks = []
    if len(losses) != expected:
        checks.append(f"{len(losses)} logged steps, expected {expected}")
    if not all(finite(x) for x in losses):
        checks.append(f"non-finite {key}")
    elif decrease and len(losses) > 1 and not losses[-1] < losses[0]:
        checks.append(f"{key} did not fall ({losses[0]:.4g} → {losses[-1]:.4g})")
    return checks


# --------------------------------------------------------------------------------------------------------- driver

PART_FUNCTIONS = {
    "setup": part_setup,
    "correctness": part_correctness,
    "speed": part_speed,
    "ppo_step": part_ppo_step,
    "grpo_step": part_grpo_step,
    "training": part_training,
    "compile": part_compile,
}


def child_part(part: str, cfg: dict) -> int:
    """One part, in its own process; writes <work>/results/<part>.json with its status and headline."""
    result_path = Path(cfg["work"]) / "results" / f"{part}.json"
    table = Path(cfg["out"]) / TABLES[part] if part in TABLES else None
    try:
        result = PART_FUNCTIONS[part](cfg, table)
    except Exception as e:  # noqa: BLE001  (reported as this part's failure; the driver goes on)
        traceback.print_exc()
        result = {"status": "failed", "headline": error_text(e)}
    result_path.write_text(json.dumps(result))
    return 0 if result["status"] == "passed" else 1


def run_part(part: str, limit: float, cfg: dict, cfg_path: Path) -> tuple[str, float, int]:
    """Run one part under `timeout` in a new session; returns (status, seconds, exit code)."""
    work = Path(cfg["work"])
    (work / "results" / f"{part}.json").unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "part", "--part", part, "--spec", str(cfg_path)]
    if shutil.which("timeout"):  # TERM to the part's process group at the limit, KILL a few seconds later
        cmd = ["timeout", f"--kill-after={KILL_AFTER}", f"{limit:.1f}", *cmd]
    t0 = time.monotonic()
    with open(work / "logs" / f"{part}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(cfg), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=limit + KILL_AFTER + 5)  # a backstop where no coreutils `timeout` exists
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    seconds = time.monotonic() - t0
    try:  # leftovers of the part (compile workers, torchrun's workers) must not hold the GPU for the next part
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if rc in (124, 137, -signal.SIGKILL, -signal.SIGTERM):
        return "timed out", seconds, rc
    result = work / "results" / f"{part}.json"
    if not result.exists():
        return "failed", seconds, rc
    return json.loads(result.read_text())["status"], seconds, rc


def log_tail(path: Path, n: int = 1) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return " / ".join(lines[-n:])[:300]


def write_summary(out: Path, cfg: dict, records: list, started: float, command: str) -> str:
    work = Path(cfg["work"])
    probe = {}
    caps_path = work / "capabilities.json"
    if caps_path.exists():
        probe = json.loads(caps_path.read_text())["probes"]["main"]
    cuda = probe.get("cuda") or {}
    device = "dry run on the CPU" if cfg["dry_run"] else cuda.get("name", "no CUDA device found")
    versions = ", ".join(
        f"{n} {probe[n]['version']}" for n in ("torch", "triton", "transformers") if probe.get(n, {}).get("ok")
    )
    counts = {s: sum(r["status"] == s for r in records) for s in ("passed", "failed", "timed out", "skipped")}
    lines = [
        f"# GPU suite: {device}",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; command: `{command}`",
        f"- {versions}; python {platform.python_version()}; commit {git_commit()}",
        f"- wall {time.monotonic() - started:.0f} s of a {cfg['budget']:.0f} s budget",
        f"- parts: {', '.join(f'{v} {k}' for k, v in counts.items() if v)}",
        "",
        "| part | status | seconds (limit) | table | result |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for r in records:
        limit = f"{r['seconds']:.0f} ({r['limit']:.0f})" if r["limit"] else "—"
        lines.append(f"| {r['part']} | {r['status']} | {limit} | {r['table'] or '—'} | {r['headline']} |")
    setup = work / "setup.md"
    if setup.exists():
        lines += ["", setup.read_text().strip()]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    summary = {"device": device, "dry_run": cfg["dry_run"], "budget": cfg["budget"], "counts": counts, "parts": records}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return text


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown (no git checkout)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def pack_logs(work: Path, out: Path, site: Path) -> None:
    """Every small text file of the run (logs, results, metrics, benchmark logs) into one archive: the device tool
    brings back at most 8 files, so they cannot come back one by one."""
    keep = (".log", ".json", ".jsonl", ".md", ".txt")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for folder, dirs, files in os.walk(work):
            dirs[:] = [d for d in dirs if Path(folder, d) != site and d != "trainer_state"]
            for name in files:
                path = Path(folder, name)
                if name.endswith(keep) and path.stat().st_size < 4 << 20:
                    tar.add(path, arcname=str(path.relative_to(work)))


def main() -> int:
    args = parse_args()
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        if args.child == "part":
            return child_part(args.part, spec)
        (child_script if args.child == "script" else child_probe)(spec)
        return 0

    out, work = Path(args.outdir).resolve(), Path(args.work_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in [*set(TABLES.values()), "summary.md", "summary.json", "logs.tar.gz"]:
        (out / name).unlink(missing_ok=True)
    for folder in ("logs", "results"):
        shutil.rmtree(work / folder, ignore_errors=True)
        (work / folder).mkdir(parents=True)
    (work / "capabilities.json").unlink(missing_ok=True)
    cfg = {
        "dry_run": args.dry_run,
        "device": "cpu" if args.dry_run else "cuda",
        "out": str(out),
        "work": str(work),
        # dill (datasets' hashing) pickles modules by reference only from paths under sys.prefix or with
        # "site-packages" in them, as installs always have; a --target folder needs that name too
        "site": str(work / "site-packages"),
        "wheels": args.wheels,
        "budget": args.budget,
        "settings": SETTINGS["dry" if args.dry_run else "gpu"],
    }
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    command = shlex.join(["python", *sys.argv])
    started = time.monotonic()
    records = []
    print(
        f"GPU suite{' (dry run)' if args.dry_run else ''}: {out} (work {work}), budget {args.budget:.0f} s", flush=True
    )
    for part in ["setup", *[p for p in PARTS[1:] if p in args.parts]]:
        left = args.budget - (time.monotonic() - started) - RESERVE - KILL_AFTER
        limit = min(args.limits[part], left)
        record = {"part": part, "limit": limit, "seconds": 0.0, "table": None}
        if left < 5:
            record |= {"status": "skipped", "limit": 0, "headline": "no time left in the budget"}
        else:
            status, seconds, rc = run_part(part, limit, cfg, cfg_path)
            result_path = work / "results" / f"{part}.json"
            result = json.loads(result_path.read_text()) if result_path.exists() else {}
            headline = result.get("headline") or f"exit {rc}: {log_tail(work / 'logs' / f'{part}.log')}"
            if status == "timed out":
                headline = f"stopped at its {limit:.0f} s limit; last output: {log_tail(work / 'logs' / f'{part}.log')}"
            table = TABLES.get(part)
            table_ok = table is not None and (out / table).exists() and (out / table).stat().st_size > 0
            record |= {"status": status, "seconds": seconds, "headline": headline, "rc": rc,
                       "table": table if table_ok else None, "notes": result.get("notes", [])}  # fmt: skip
        records.append(record)
        print(f"[{part}] {record['status']} in {record['seconds']:.0f} s (limit {record['limit']:.0f} s): "
              f"{record['headline']}", flush=True)  # fmt: skip
        write_summary(out, cfg, records, started, command)  # after every part: a cut-off call still leaves one
        pack_logs(work, out, Path(cfg["site"]))
    print()
    print(write_summary(out, cfg, records, started, command))
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
