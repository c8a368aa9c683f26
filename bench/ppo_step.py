"""One PPO update (rollout + scoring + PPO epochs) of ppo.py against TRL's PPOTrainer at identical settings.

Not a test: prints a markdown table. Both trainers run in fresh child processes with the same thread settings, on
the same weights (policy = reference; reward model = value-model initialisation), the same --batch-size prompts
(every update uses all of them, so the padded prompt length is the same on both sides), batch size, response length,
PPO epochs, minibatches, temperature, KL coefficient and estimator:

    pip install -r bench/requirements.txt                  # trl==1.12.0, for this benchmark only
    python bench/ppo_step.py                               # demo Llama (0.8M), 1 warm-up + 3 timed updates
    python bench/ppo_step.py --size 0.5b --device cuda     # random-initialised Qwen2.5-0.5B-shaped Llama
    python bench/ppo_step.py --profile                     # where one of our updates spends its time

Models (built once under --work-dir, default out/bench/ppo_step/<size>):
  demo  the built-in tiny Llama (common.models.ensure_demo_base) as policy and reference; the reward model is the same
        backbone with a random N(0, 1/sqrt(H+1)) score head, and the value model starts from the reward model (ppo.py's
        default --value-init reward; TRL gets the same directory as value_model).
  0.5b  a random-initialised Llama with Qwen2.5-0.5B's shape (H=896, 24 layers, 14 heads / 2 KV heads, MLP 4864,
        V=151936, tied embeddings: 494M parameters) and the demo tokenizer; reward/value built the same way.
Fixed-length responses: the shared tokenizer's EOS is a token added for the benchmark. With the demo model its id is
outside the model's vocabulary, so the policy can never emit it (with 0.5b it is one of 151936 ids of a random model,
probability ~1/V per token). ppo.py always generates and trains on --response-length columns unless every row has
ended; TRL gets stop_token_id=None (no truncation, generation never stops early). Both use no missing-EOS penalty.

What each column is (timed updates only: the first update is a warm-up, model loading is never timed):
  episodes/s       timed updates x batch size / wall time from the end of the warm-up update to the end of the last
                   update. Ours: the "time" stamps of metrics.jsonl (written at the end of every update); TRL: a
                   TrainerCallback's on_step_end. Each side's logging and bookkeeping in between is included.
  rollout tokens/s batch x response length / rollout time.
  s / update       wall time per timed update; rollout / score / train: mean per-phase time.
                   Ours: perf/time_rollout, perf/time_score, perf/time_train from metrics.jsonl (ppo.py's own timers).
                   TRL exposes no phase timers; the TRL child wraps two of trl.experimental.ppo.ppo_trainer's module
                   functions to stamp the boundaries (their code runs unchanged): rollout = end of the previous update
                   to the end of `batch_generation` (includes its end-of-update cleanup with gc.collect()), score =
                   from there to the first training `forward` (log-probs, reference, value, reward, KL, GAE), train =
                   from there to on_step_end (PPO epochs plus its metrics/logging). On CUDA each stamp synchronises.
  CPU s / update   the child's process CPU time (time.process_time, all threads) over the same timed updates: on a
                   shared machine it moves far less than wall time, so compare it with the wall-time ratio.
  peak memory      CPU: peak resident set size of the child process (ru_maxrss from wait4), interpreter, imports and
                   model loading included. CUDA: torch.cuda.max_memory_allocated() in the child at exit (ppo.py has no
                   such metric; the child runs ppo.py's __main__ through runpy and reads it in an atexit hook).
Ours runs `python ppo.py <flags>` in-process under `python bench/ppo_step.py --child ours` (runpy), which only adds
the memory and CPU-time read-outs and turns ppo.py's final checkpoint write (after the timed updates) into a no-op, so
that neither side's numbers include saving (TRL runs with save_strategy="no").
Differences that are the trainers' own and stay: TRL takes old log-probs from the generation logits (one policy
forward fewer), does not clip gradients (ours runs with --max-grad-norm 0), uses one fused AdamW over policy + value
(ours: one fused AdamW each, since 2026-11-29; before, single-tensor AdamW on CPU), and on CUDA runs the reference
and reward model outside autocast (fp32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1 << 20
BENCH_EOS = "<|bench_eos|>"
TEMPERATURE = 0.7
KL_COEF = 0.05
LEARNING_RATE = 1e-4
SEED = 1
MAX_PROMPT_LEN = 64
# Qwen2.5-0.5B's shape as a Llama (the usual small model of RLHF examples): 494M parameters with tied embeddings.
SIZE_0_5B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "rope_theta": 1_000_000.0,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("demo", "0.5b"), default="demo", help="model: demo (0.8M) or a random 0.5B")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per update (one response each)")
    p.add_argument("--response-length", type=int, default=32, help="tokens per response (fixed: no early EOS)")
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--num-minibatches", type=int, default=1)
    p.add_argument("--updates", type=int, default=3, help="timed updates, after one warm-up update")
    p.add_argument("--repeats", type=int, default=1, help="run each side this many times (alternating); median kept")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the children (default: inherited)")
    p.add_argument("--only", choices=("ours", "trl"), default=None, help="run one side only")
    p.add_argument("--work-dir", default=None, help="models, prompts, logs (default out/bench/ppo_step/<size>)")
    p.add_argument("--output", default=None, help="markdown file (default bench/results/ppo_step_<device>[_<size>].md)")
    p.add_argument("--no-save", action="store_true", help="print only, write no results file")
    p.add_argument("--note", default="", help="a line added to the header (e.g. about the machine)")
    p.add_argument("--profile", action="store_true", help="profile one of our updates instead of comparing")
    p.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.batch_size % args.num_minibatches:
        p.error(f"--batch-size {args.batch_size} is not divisible by --num-minibatches {args.num_minibatches}")
    args.work_dir = Path(args.work_dir or ROOT / "out" / "bench" / "ppo_step" / args.size)
    return args


# ----------------------------------------------------------------------------------------------- models and prompts


def build_models(size: str, work_dir: Path) -> tuple[Path, Path]:
    """(policy_dir, reward_dir): HF directories both trainers load, with the benchmark tokenizer (see docstring)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from common.models import ensure_demo_base

    policy_dir, reward_dir = work_dir / "policy", work_dir / "reward"
    marker = work_dir / "built.json"
    if marker.exists() and json.loads(marker.read_text()) == {"size": size}:
        return policy_dir, reward_dir
    base = ensure_demo_base(ROOT / "out" / "demo" / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens([BENCH_EOS], special_tokens=True)
    tokenizer.eos_token = BENCH_EOS
    eos_id = tokenizer.convert_tokens_to_ids(BENCH_EOS)
    if size == "demo":
        policy = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        config = LlamaConfig(
            **SIZE_0_5B,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            policy = LlamaForCausalLM(config)
    # Neither side may stop at the demo model's own end-of-turn token: EOS everywhere is the benchmark token.
    policy.config.eos_token_id = eos_id
    policy.generation_config.eos_token_id = eos_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    del policy
    reward = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    reward.config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.nn.init.normal_(reward.score.weight, std=1.0 / math.sqrt(reward.config.hidden_size + 1))
    reward.save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    marker.write_text(json.dumps({"size": size}))
    return policy_dir, reward_dir


def write_prompts(work_dir: Path, n: int) -> Path:
    """The first n demo-task PPO prompts: both sides use all n in every update (one batch)."""
    from common import demo_task

    return demo_task.write_jsonl(demo_task.prompt_rows(seed=0, n=n), work_dir / f"prompts_{n}.jsonl")


def tokenized_prompts(tokenizer, path: Path) -> list[list[int]]:
    """Exactly ppo.py's prompt pipeline (parse, chat template with generation prompt, length check)."""
    from common import data

    parsed = data.parse_rows(data.load_rows(str(path)), data.parse_prompt, str(path))

    def tokenize(record, context):
        return data.tokenize_prompt(tokenizer, record["prompt"], MAX_PROMPT_LEN, context)

    return data.tokenize_all(parsed.records, tokenize, str(path), False).records


# ------------------------------------------------------------------------------------------------------- children


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def cuda_peak(device: str):
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated()


def child_ours(spec: dict) -> None:
    """Run ppo.py's __main__ in this process (runpy) with spec["argv"]; at exit write threads, peak CUDA memory and
    the process CPU time at the end of every update (ppo.py calls tracker.log once per update)."""
    import atexit
    import runpy

    import torch

    from common import checkpoint, tracking

    cpu_stamps = []
    original_log = tracking.Tracker.log

    def log(self, metrics, step, echo=True):
        if "perf/time_train" in metrics:
            cpu_stamps.append(time.process_time())
        original_log(self, metrics, step, echo)

    tracking.Tracker.log = log

    def report():
        result = {"threads": torch.get_num_threads(), "cuda_peak": cuda_peak(spec["device"]), "cpu_stamps": cpu_stamps}
        Path(spec["result"]).write_text(json.dumps(result))

    atexit.register(report)
    # The final save comes after the timed updates; it is skipped so that it adds no peak memory (TRL saves nothing).
    checkpoint.save_trainer_state = lambda *a, **k: None
    checkpoint.export_pretrained = lambda *a, **k: None
    if spec.get("profile"):
        install_profiler(spec)
    sys.argv = ["ppo.py", *spec["argv"]]
    runpy.run_path(str(ROOT / "ppo.py"), run_name="__main__")


def child_trl(spec: dict) -> None:
    """TRL's PPOTrainer at ppo.py's settings; writes per-update phase times, threads and peak CUDA memory."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    device, B, M = spec["device"], spec["batch_size"], spec["num_minibatches"]
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    prompts = tokenized_prompts(tokenizer, Path(spec["prompts"]))
    dataset = Dataset.from_dict({"input_ids": prompts})

    def causal_lm():
        return AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32, attn_implementation="sdpa")

    def classifier():
        model = AutoModelForSequenceClassification.from_pretrained(
            spec["reward"], num_labels=1, dtype=torch.float32, attn_implementation="sdpa"
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    config = PPOConfig(
        output_dir=str(Path(spec["work_dir"]) / "trl_out"),
        seed=SEED,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=device == "cuda",  # mixed precision like ours (autocast bf16 over fp32 weights) on CUDA; fp32 on CPU
        gradient_checkpointing=False,  # TRL's PPOConfig turns it on by default; ours is off by default
        per_device_train_batch_size=B // M,
        gradient_accumulation_steps=M,
        num_mini_batches=M,
        local_rollout_forward_batch_size=B,
        total_episodes=B * (1 + spec["updates"]),
        num_ppo_epochs=spec["ppo_epochs"],
        response_length=spec["response_length"],
        temperature=TEMPERATURE,
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        kl_coef=KL_COEF,
        kl_estimator="k1",
        learning_rate=LEARNING_RATE,
        num_sample_generations=0,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    # Phase stamps (see the module docstring); TRL's code runs unchanged between them.
    updates, current = [], {}
    original_generation, original_forward = trl_ppo.batch_generation, trl_ppo.forward

    def timed_batch_generation(model, queries, *a, **k):
        out = original_generation(model, queries, *a, **k)
        sync(device)
        current["rollout_end"] = time.perf_counter()
        current["response_len"] = out[0].shape[1] - queries.shape[1]  # HF stops early only if every row ended
        return out

    def timed_forward(model, *a, **k):
        if "train_start" not in current and isinstance(getattr(model, "module", model), trl_ppo.PolicyAndValueWrapper):
            sync(device)
            current["train_start"] = time.perf_counter()
        return original_forward(model, *a, **k)

    trl_ppo.batch_generation, trl_ppo.forward = timed_batch_generation, timed_forward

    class Stamps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync(device)
            current["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            end = time.perf_counter()
            updates.append(
                {
                    "end": end,
                    "cpu": time.process_time(),
                    "rollout": current["rollout_end"] - current["start"],
                    "score": current["train_start"] - current["rollout_end"],
                    "train": end - current["train_start"],
                    "response_len": current["response_len"],
                }
            )
            current.clear()
            current["start"] = end

    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=causal_lm(),
        ref_model=causal_lm(),
        reward_model=classifier(),
        value_model=classifier(),
        train_dataset=dataset,
        callbacks=[Stamps()],
    )
    trainer.train()
    result = {"updates": updates, "threads": torch.get_num_threads(), "cuda_peak": cuda_peak(device)}
    Path(spec["result"]).write_text(json.dumps(result))


def install_profiler(spec: dict) -> None:
    """Profile ppo.py's 2nd update with cProfile and its 3rd with torch.profiler (update 1 is the warm-up).

    ppo.py calls tracker.log at the end of every update, so a wrapper around Tracker.log delimits the updates. The
    generation and log-prob entry points get record_function labels (patched before ppo.py imports them).
    """
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile, record_function

    import common.generation
    import kernels
    from common import tracking

    def labelled(fn, name):
        def wrapper(*a, **k):
            with record_function(name):
                return fn(*a, **k)

        return wrapper

    common.generation.generate = labelled(common.generation.generate, "ppo/generate")
    kernels.selective_logprob = labelled(kernels.selective_logprob, "ppo/selective_logprob")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec["device"] == "cuda" else [])
    cprof, tprof = cProfile.Profile(), profile(activities=activities)
    out = Path(spec["profile"])
    original_log = tracking.Tracker.log
    done = [0]  # updates finished so far

    def log(self, metrics, step, echo=True):
        if "perf/time_train" not in metrics:
            return original_log(self, metrics, step, echo)
        sync(spec["device"])
        done[0] += 1
        if done[0] == 2:
            cprof.disable()
            text = io.StringIO()
            stats = pstats.Stats(cprof, stream=text).strip_dirs()
            stats.sort_stats("cumulative").print_stats(30)
            Path(f"{out}.cprofile.txt").write_text(text.getvalue())
        if done[0] == 3:
            tprof.stop()
            averages = tprof.key_averages()
            sort = "self_cuda_time_total" if spec["device"] == "cuda" else "self_cpu_time_total"
            Path(f"{out}.torch_self.txt").write_text(
                averages.table(sort_by=sort, row_limit=30, max_name_column_width=55)
            )
            total = "cuda_time_total" if spec["device"] == "cuda" else "cpu_time_total"
            Path(f"{out}.torch_total.txt").write_text(
                averages.table(sort_by=total, row_limit=25, max_name_column_width=55)
            )
        original_log(self, metrics, step, echo)
        if done[0] == 1:
            cprof.enable()
        if done[0] == 2:
            tprof.start()

    tracking.Tracker.log = log


# -------------------------------------------------------------------------------------------------------- parent


def run_child(kind: str, spec: dict, env: dict, log_path: Path) -> dict:
    """Run one child to completion; returns its result JSON plus peak RSS (ru_maxrss of exactly this child)."""
    spec_path = Path(spec["result"]).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise RuntimeError(f"{kind} child failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    result["peak_rss"] = usage.ru_maxrss * 1024  # KiB on Linux
    return result


def ours_argv(args, policy_dir: Path, reward_dir: Path, prompts: Path, out_dir: Path) -> list[str]:
    return [
        "--model-path", str(policy_dir),
        "--reward-model-path", str(reward_dir),
        "--data", str(prompts),
        "--output-dir", str(out_dir),
        "--local-rollout-batch-size", str(args.batch_size),
        "--num-minibatches", str(args.num_minibatches),
        "--gradient-accumulation-steps", "1",
        "--ppo-epochs", str(args.ppo_epochs),
        "--response-length", str(args.response_length),
        "--total-episodes", str(args.batch_size * (1 + args.updates)),
        "--temperature", str(TEMPERATURE),
        "--kl-coef", str(KL_COEF),
        "--kl-estimator", "k1",
        "--learning-rate", str(LEARNING_RATE),
        "--max-grad-norm", "0",
        "--missing-eos-penalty", "None",
        "--seed", str(SEED),
        "--demo-eval-prompts", "0",
        "--sample-every", "0",
        "--save-every", "0",
    ]  # fmt: skip


def summarize_ours(result: dict, out_dir: Path, args) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "perf/time_train" in r]
    if len(rows) != 1 + args.updates:
        raise RuntimeError(f"ours: expected {1 + args.updates} update rows in metrics.jsonl, found {len(rows)}")
    timed = rows[1:]
    wall = rows[-1]["time"] - rows[0]["time"]
    return {
        "wall": wall,
        "cpu": result["cpu_stamps"][-1] - result["cpu_stamps"][0],
        "rollout": mean(r["perf/time_rollout"] for r in timed),
        "score": mean(r["perf/time_score"] for r in timed),
        "train": mean(r["perf/time_train"] for r in timed),
        "response_len": mean(r["ppo/val/response_length"] for r in timed),
        "logged_rollout_tok_s": mean(r["perf/rollout_tokens_per_sec"] for r in timed),
        **result,
    }


def summarize_trl(result: dict, args) -> dict:
    ups = result["updates"]
    if len(ups) != 1 + args.updates:
        raise RuntimeError(f"trl: expected {1 + args.updates} updates, recorded {len(ups)}")
    timed = ups[1:]
    return {
        "wall": ups[-1]["end"] - ups[0]["end"],
        "cpu": ups[-1]["cpu"] - ups[0]["cpu"],
        "rollout": mean(u["rollout"] for u in timed),
        "score": mean(u["score"] for u in timed),
        "train": mean(u["train"] for u in timed),
        "response_len": mean(u["response_len"] for u in timed),
        **result,
    }


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def derived(s: dict, args) -> dict:
    episodes = args.updates * args.batch_size
    return {
        "eps": episodes / s["wall"],
        "rollout_tok_s": args.batch_size * args.response_length / s["rollout"],
        "s_per_update": s["wall"] / args.updates,
        "cpu_per_update": s["cpu"] / args.updates,
        "rollout": s["rollout"],
        "score": s["score"],
        "train": s["train"],
        "memory": derived_memory(s, args),
    }


COLUMNS = (
    ("eps", "episodes/s", "{:.1f}"),
    ("rollout_tok_s", "rollout tokens/s", "{:.0f}"),
    ("s_per_update", "s / update", "{:.3f}"),
    ("cpu_per_update", "CPU s / update", "{:.3f}"),
    ("rollout", "rollout s", "{:.3f}"),
    ("score", "score s", "{:.3f}"),
    ("train", "train s", "{:.3f}"),
    ("memory", "peak memory MiB", "{:.0f}"),
)


def table(ours: dict | None, trl: dict | None) -> str:
    lines = ["| | " + " | ".join(c[1] for c in COLUMNS) + " |", "| --- |" + " ---: |" * len(COLUMNS)]
    for name, row in (("ours (ppo.py)", ours), ("TRL 1.12 PPOTrainer", trl)):
        if row is not None:
            lines.append(f"| {name} | " + " | ".join(fmt.format(row[k]) for k, _, fmt in COLUMNS) + " |")
    if ours and trl:
        lines.append("| ratio ours / TRL | " + " | ".join(f"{ours[k] / trl[k]:.2f}x" for k, _, _ in COLUMNS) + " |")
    return "\n".join(lines)


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPU cores"


def versions() -> str:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    python = platform.python_version()
    return f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}, python {python}"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def header(args, command: str, threads: str, load_start: str, ppo_cmd: str) -> str:
    lines = [
        f"# PPO step benchmark: ours (ppo.py) vs TRL ({args.size} model, {args.device})",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{command}`",
        f"- device: {machine(args.device)}; torch threads in the children: {threads}",
        f"- {versions()}",
        f"- load average at start (1, 5, 15 min): {load_start}; at the end: {load_average()}",
    ]
    if float(load_start.split(",")[0]) > 0.5:
        lines.append(
            "- **the machine was shared with other jobs while this ran** (load average above): timings are noisy, "
            "re-run on a quiet machine before quoting them"
        )
    if args.note:
        lines.append(f"- note: {args.note}")
    precision = "bf16" if args.device == "cuda" else "fp32, use_cpu=True"
    memory = (
        "torch.cuda.max_memory_allocated() of the child"
        if args.device == "cuda"
        else "peak RSS of the child process (interpreter, imports and models included)"
    )
    lines.append(
        f"- settings: batch {args.batch_size}, response length {args.response_length} (fixed, no early EOS), "
        f"{args.ppo_epochs} PPO epochs, {args.num_minibatches} minibatch(es), temperature {TEMPERATURE}, "
        f"k1 KL x {KL_COEF}; {args.updates} timed updates after 1 warm-up; {args.repeats} run(s) per side, alternating "
        "(times from each side's median run by episodes/s, memory its lowest peak)"
    )
    wrapper = "run under `bench/ppo_step.py --child ours`: memory and CPU-time read-outs, final save skipped"
    lines.append(f"- ours: `{ppo_cmd}` ({wrapper})")
    lines.append(
        "- TRL: trl.experimental.ppo.PPOTrainer, "
        f"per_device_train_batch_size={args.batch_size // args.num_minibatches}, "
        f"gradient_accumulation_steps={args.num_minibatches}, num_mini_batches={args.num_minibatches}, "
        f"local_rollout_forward_batch_size={args.batch_size}, stop_token_id=None, {precision}, "
        "gradient_checkpointing=False, report_to=[], no eval, no sample generations, save_strategy=no"
    )
    lines.append(f"- memory: {memory}")
    return "\n".join(lines)


def child_env(args) -> dict:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("WANDB_MODE", "disabled")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # ppo.py picks CUDA whenever it sees one
    return env


def profile_ours(args, policy_dir, reward_dir, prompts, env, command: str, load_start: str) -> str:
    """--profile: cProfile of update 2, torch.profiler of update 3, plain timers of update 4 (update 1: warm-up)."""
    args.updates = 3
    run_dir = args.work_dir / "profile"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": ours_argv(args, policy_dir, reward_dir, prompts, run_dir / "ours_out"),
        "result": str(run_dir / "ours.json"),
        "device": args.device,
        "profile": str(run_dir / "profile"),
    }
    result = run_child("ours", spec, env, run_dir / "ours.log")
    rows = [json.loads(line) for line in (run_dir / "ours_out" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/time_train" in r]
    phases = ["| update | profiler | rollout s | score s | train s |", "| ---: | --- | ---: | ---: | ---: |"]
    for i, (r, how) in enumerate(zip(rows, ("none (warm-up)", "cProfile", "torch.profiler", "none"), strict=True)):
        times = " | ".join(f"{r[f'perf/time_{k}']:.3f}" for k in ("rollout", "score", "train"))
        phases.append(f"| {i + 1} | {how} | {times} |")
    head = header(
        args, command, f"ours {result['threads']}", load_start, ours_command(args, policy_dir, reward_dir, prompts)
    )
    head = "\n".join(line for line in head.splitlines() if not line.startswith(("- TRL:", "- memory:")))
    head = re.sub(
        r"; 3 timed updates after 1 warm-up; .*", "; 4 updates: warm-up, cProfile, torch.profiler, none", head
    )
    sections = [
        head.replace("# PPO step benchmark: ours (ppo.py) vs TRL", "# PPO step profile: ours (ppo.py)"),
        f"- peak memory (profilers included): {derived_memory(result, args):.0f} MiB",
        "- ppo/generate and ppo/selective_logprob are record_function labels the profiling child puts around "
        "common.generation.generate and kernels.selective_logprob; everything else is PyTorch's own names.",
        "",
        "## Phase times (ppo.py's perf/time_* metrics)",
        "",
        *phases,
    ]
    for title, suffix in (
        ("torch.profiler, update 3, by total time (includes children)", "torch_total"),
        ("torch.profiler, update 3, by self time", "torch_self"),
        ("cProfile, update 2, by cumulative time", "cprofile"),
    ):
        sections += ["", f"## {title}", "", "```", Path(f"{spec['profile']}.{suffix}.txt").read_text().strip(), "```"]
    return "\n".join(sections) + "\n"


def derived_memory(result: dict, args) -> float:
    return (result["cuda_peak"] if args.device == "cuda" else result["peak_rss"]) / MIB


def main() -> None:
    args = parse_args()
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        (child_ours if args.child == "ours" else child_trl)(spec)
        return

    load_start = load_average()
    command = shlex.join(["python", *sys.argv])
    args.work_dir.mkdir(parents=True, exist_ok=True)
    policy_dir, reward_dir = build_models(args.size, args.work_dir)
    prompts = write_prompts(args.work_dir, args.batch_size)
    env = child_env(args)
    if args.profile:
        save(args, profile_ours(args, policy_dir, reward_dir, prompts, env, command, load_start), "profile_")
        return

    sides = [s for s in ("ours", "trl") if args.only in (None, s)]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:  # alternate the order: drift on a shared machine hits both
            run_dir = args.work_dir / f"{side}_{r}"
            run_dir.mkdir(parents=True, exist_ok=True)
            spec = {
                "result": str(run_dir / "result.json"),
                "device": args.device,
                "work_dir": str(run_dir),
                "policy": str(policy_dir),
                "reward": str(reward_dir),
                "prompts": str(prompts),
                "batch_size": args.batch_size,
                "num_minibatches": args.num_minibatches,
                "ppo_epochs": args.ppo_epochs,
                "response_length": args.response_length,
                "updates": args.updates,
                "argv": ours_argv(args, policy_dir, reward_dir, prompts, run_dir / "ours_out"),
            }
            t0 = time.time()
            result = run_child(side, spec, env, run_dir / "child.log")
            summary = (
                summarize_ours(result, run_dir / "ours_out", args) if side == "ours" else summarize_trl(result, args)
            )
            summary["derived"] = derived(summary, args)
            runs[side].append(summary)
            d = summary["derived"]
            print(f"[{side} run {r + 1}/{args.repeats}] {d['eps']:.1f} episodes/s, {d['s_per_update']:.3f} s/update, "
                  f"{d['cpu_per_update']:.3f} CPU s/update, "
                  f"peak {d['memory']:.0f} MiB, response length {summary['response_len']:.1f} "
                  f"({time.time() - t0:.0f} s with loading)", flush=True)  # fmt: skip
            if abs(summary["response_len"] - args.response_length) > 1e-6:
                length = summary["response_len"]
                print(f"  warning: {side} responses averaged {length:.2f} tokens, not {args.response_length}")

    # each side's median run by episodes/s: on a machine whose load drifts, the best run only shows who got the
    # quiet minute; memory: each side's lowest peak (the spread over runs is listed under the table)
    chosen = {s: sorted(runs[s], key=lambda x: x["derived"]["eps"])[(len(runs[s]) - 1) // 2] for s in sides}
    threads = ", ".join(f"{s} {chosen[s]['threads']}" for s in sides)
    ppo_cmd = ours_command(args, policy_dir, reward_dir, prompts)
    rows = {s: chosen[s]["derived"] | {"memory": min(x["derived"]["memory"] for x in runs[s])} for s in sides}
    ours, trl = rows.get("ours"), rows.get("trl")
    text = [header(args, command, threads, load_start, ppo_cmd), "", table(ours, trl), ""]
    if ours and trl:
        speed, mem = ours["eps"] / trl["eps"], ours["memory"] / trl["memory"]
        met = speed >= 1.5 and mem <= 1.0
        text.append(
            f"Target (ours >= 1.5x TRL's end-to-end episodes/s at no more peak memory): {'met' if met else 'NOT met'} "
            f"({speed:.2f}x episodes/s, {mem:.2f}x peak memory)."
        )
    if ours and trl and args.repeats > 1:
        # runs r of the two sides ran back to back (ABBA order), so their ratio sees nearly the same machine state
        pair = sorted(o["derived"]["eps"] / t["derived"]["eps"] for o, t in zip(runs["ours"], runs["trl"]))
        eps = {s: [x["derived"]["eps"] for x in runs[s]] for s in sides}
        text.append(
            f"- episodes/s ratio of back-to-back run pairs: median {pair[(len(pair) - 1) // 2]:.2f}x, range "
            f"{pair[0]:.2f}x-{pair[-1]:.2f}x; best run vs best run {max(eps['ours']) / max(eps['trl']):.2f}x, "
            f"worst vs worst {min(eps['ours']) / min(eps['trl']):.2f}x"
        )
    if args.repeats > 1:
        for s in sides:
            eps = ", ".join(f"{x['derived']['eps']:.1f}" for x in runs[s])
            cpu = ", ".join(f"{x['derived']['cpu_per_update']:.3f}" for x in runs[s])
            mem = ", ".join(f"{x['derived']['memory']:.0f}" for x in runs[s])
            text.append(f"- all {s} runs in order: episodes/s {eps}; CPU s/update {cpu}; peak memory MiB {mem}")
    if "ours" in chosen:
        logged = chosen["ours"]["logged_rollout_tok_s"]
        text.append(f"- ours' own perf/rollout_tokens_per_sec (mean over timed updates): {logged:.0f}")
    save(args, "\n".join(text) + "\n", "")


def ours_command(args, policy_dir: Path, reward_dir: Path, prompts: Path) -> str:
    rel = [p.relative_to(ROOT) if p.is_relative_to(ROOT) else p for p in (policy_dir, reward_dir, prompts)]
    return "python ppo.py " + " ".join(ours_argv(args, *rel, Path("<run dir>/ours_out")))


def save(args, report: str, kind: str) -> None:
    """Print the report and write bench/results/ppo_step_<kind><device>[_<size>].md (or --output)."""
    print()
    print(report)
    if args.no_save:
        return
    suffix = "" if args.size == "demo" else f"_{args.size.replace('.', '')}"
    path = Path(args.output or ROOT / "bench" / "results" / f"ppo_step_{kind}{args.device}{suffix}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
