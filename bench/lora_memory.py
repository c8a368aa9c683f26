"""Peak memory and step time of dpo.py, ppo.py and grpo.py with and without LoRA (issue 18), side by side.

Not a test: prints a markdown table. Every run is the script itself (`python dpo.py ...`) in a fresh child process
with OMP_NUM_THREADS=1, so one run's allocations never count in another's; the sides alternate (full, LoRA, full,
LoRA, ... and LoRA first for every other script) so that a change in the machine's load hits both, and the table
reports medians over --repeats.

    OMP_NUM_THREADS=1 python bench/lora_memory.py                      # 151M-parameter Llama, 3 steps, 2 repeats
    python bench/lora_memory.py --steps 2 --repeats 1                  # what fits in ~15 min on a loaded 2-core CPU
    python bench/lora_memory.py --hidden-size 768 --layers 8 --repeats 1

Model (built once under --work-dir): a random-initialised Llama with the demo tokenizer (common.models.
build_demo_model at --hidden-size/--layers: MLP 8/3 H, 4 heads, tied embeddings), as policy and reference; for PPO
the reward model is the same backbone with a random score head, and the value model starts from it (ppo.py's
--value-init reward). Full fine-tuning holds, besides the trained policy (weights, gradients, two AdamW moments), a
frozen reference copy; with LoRA the reference is the policy with its adapters off. PPO's LoRA side also trains the
value model as adapters (--value-lora); its reward model is a separate frozen network on both sides.

Columns:
  peak RSS      the child's peak resident set size (ru_maxrss from wait4): interpreter, imports, data, model loading,
                training and the final checkpoint + export included. LoRA runs export with --lora-export adapter: the
                merged export (the default) builds the merged weights as new tensors, one more transient copy of the
                adapted linear layers at save time (what a full run's export costs under torchrun, where the
                shards are gathered to rank 0)
  s / step      wall time per step after the first (the "time" stamps of metrics.jsonl, logged every step):
                (t_last - t_first) / (steps - 1). PPO/GRPO: one step = rollout + scoring + update
  CPU s         the child's user + system CPU time for the whole run (compare with wall time on a shared machine)
  trainable     parameters the optimizer updates
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_models(work: Path, hidden_size: int, layers: int) -> tuple[Path, Path, int]:
    """policy/reference directory, reward-model directory, parameter count (built once)."""
    import torch

    from common.models import build_demo_model, ensure_demo_base, load_sequence_classifier, load_tokenizer

    policy, rm = work / "policy", work / "reward_model"
    if not (policy / "config.json").exists():
        tokenizer = load_tokenizer(str(ensure_demo_base(work / "demo_base")))
        model = build_demo_model(tokenizer, seed=0, hidden_size=hidden_size, num_layers=layers)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(policy)
        tokenizer.save_pretrained(policy)
        head = load_sequence_classifier(str(policy), torch.device("cpu"), 1, pad_token_id=tokenizer.pad_token_id,
                                        init_head=True)  # fmt: skip
        head.save_pretrained(rm)
        tokenizer.save_pretrained(rm)
    config = json.loads((policy / "config.json").read_text())
    h, n, v, m = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"], config["intermediate_size"]
    params = v * h + n * (4 * h * h + 3 * h * m + 2 * h) + h
    return policy, rm, params


def commands(policy: Path, rm: Path, steps: int, out: Path) -> dict[str, list[str]]:
    """Each script at a small batch (the model's size is what the comparison is about), `steps` logged steps."""
    common = ["--model-path", str(policy), "--data", "demo", "--demo-eval-prompts", "0", "--save-every", "0"]
    return {
        "dpo": ["dpo.py", *common, "--total-steps", str(steps), "--local-micro-batch-size", "2", "--max-seq-len", "64",
                "--max-prompt-len", "48", "--eval-every", "0", "--eval-size", "4", "--log-every", "1",
                "--output-dir", str(out / "dpo")],
        "ppo": ["ppo.py", *common, "--reward-model-path", str(rm), "--total-episodes", str(2 * steps),
                "--local-rollout-batch-size", "2", "--num-minibatches", "1", "--ppo-epochs", "1",
                "--response-length", "16", "--sample-every", "0", "--output-dir", str(out / "ppo")],
        "grpo": ["grpo.py", *common, "--total-episodes", str(2 * steps), "--local-rollout-batch-size", "2",
                 "--num-generations", "2", "--num-minibatches", "1", "--ppo-epochs", "1", "--response-length", "16",
                 "--kl-coef", "0.05", "--sample-every", "0", "--output-dir", str(out / "grpo")],
    }  # fmt: skip


LORA = ["--lora-r", "16", "--lora-alpha", "32", "--lora-export", "adapter"]


def run(cmd: list[str], out_dir: Path, log: Path) -> dict:
    """One run in a fresh child: peak RSS (MiB), seconds per step after the first, CPU seconds, trainable count."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (status {status}); see {log}")
    stamps = [json.loads(line)["time"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()
              if line.strip() and "time" in json.loads(line)]  # fmt: skip
    text = log.read_text()
    trainable = None
    for line in text.splitlines():
        if line.startswith("LoRA r=") and trainable is None:  # the policy's line (PPO prints the value's next)
            trainable = int(line.split(": ")[1].split(" trainable")[0].replace(",", ""))
    return {
        "rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "step_s": (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan"),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "trainable": trainable,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3, help="logged steps per run (step time: after the first)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side and script (medians reported)")
    parser.add_argument("--scripts", default="dpo,ppo,grpo")
    parser.add_argument("--work-dir", default="out/bench/lora_memory")
    parser.add_argument("--output", default=None, help="also write the table (markdown) here")
    args = parser.parse_args()

    work = ROOT / args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    policy, rm, params = build_models(work, args.hidden_size, args.layers)
    started = time.time()
    results: dict[tuple[str, str], list[dict]] = {}
    for k, script in enumerate(args.scripts.split(",")):
        for rep in range(args.repeats):
            sides = ("full", "lora") if (k + rep) % 2 == 0 else ("lora", "full")  # alternate which side goes first
            for side in sides:
                out = work / "runs" / side
                cmd = commands(policy, rm, args.steps, out)[script]
                if side == "lora":
                    cmd = cmd + LORA + (["--value-lora"] if script == "ppo" else [])
                r = run(cmd, out / script, work / f"{script}_{side}_{rep}.log")
                results.setdefault((script, side), []).append(r)
                print(f"{script} {side} #{rep + 1}: {r['rss_mib']:.0f} MiB, {r['step_s']:.2f} s/step, "
                      f"{r['cpu_s']:.0f} CPU s ({time.time() - started:.0f}s elapsed)", flush=True)  # fmt: skip

    def med(script, side, key):
        return statistics.median(r[key] for r in results[(script, side)])

    lines = [
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, shared), OMP_NUM_THREADS=1, torch float32 on CPU",
        f"`{' '.join(['python', 'bench/lora_memory.py', *sys.argv[1:]])}`",
        f"model: random-initialised Llama, H={args.hidden_size}, {args.layers} layers, {params / 1e6:.0f}M parameters "
        f"({params * 4 / 2**20:.0f} MiB in fp32); LoRA r=16 alpha=32 on every linear layer of the decoder blocks; "
        f"{args.steps} steps per run, median of {args.repeats} runs per cell, sides alternated",
        "",
        "| script | peak RSS full (MiB) | peak RSS LoRA (MiB) | saved (MiB) | saved / model size | s/step full | "
        "s/step LoRA | CPU s full | CPU s LoRA | trainable LoRA |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for script in args.scripts.split(","):
        full, lo = med(script, "full", "rss_mib"), med(script, "lora", "rss_mib")
        trainable = results[(script, "lora")][0]["trainable"]
        lines.append(
            f"| {script} | {full:.0f} | {lo:.0f} | {full - lo:.0f} | {(full - lo) / (params * 4 / 2**20):.2f} | "
            f"{med(script, 'full', 'step_s'):.2f} | {med(script, 'lora', 'step_s'):.2f} | "
            f"{med(script, 'full', 'cpu_s'):.0f} | {med(script, 'lora', 'cpu_s'):.0f} | "
            f"{trainable:,} ({100 * trainable / params:.1f}%) |"
        )
    lines += ["", "every run (MiB, s/step):"]
    for (script, side), rs in results.items():
        lines.append(f"- {script} {side}: " + ", ".join(f"{r['rss_mib']:.0f} / {r['step_s']:.2f}" for r in rs))
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
