"""The results table of `make demo`: every stage's model graded the same way, side by side.

Each model answers the same held-out demo prompts greedily and `common.demo_task.grade` scores the answers
(ground truth, not a reward model). KL to the SFT model is estimated on samples from each model:
KL(pi || pi_sft) = E_{y ~ pi}[log pi(y|x) - log pi_sft(y|x)], summed over the response (nats per answer),
with one sampled answer per prompt at temperature 1 and a fixed seed. Wall times come from
out/timings.json, written by examples/demo.sh. Writes out/results.md and out/results.png.

    python examples/results.py                 # after examples/demo.sh
    python examples/results.py --prompts 256   # faster, noisier (about ±0.03 on the score)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import data, demo_task  # noqa: E402
from common.dist import init_distributed, seed_everything  # noqa: E402
from common.generation import demo_eval, generate, never_sampled, paired_difference  # noqa: E402
from common.models import load_causal_lm, load_tokenizer  # noqa: E402
from kernels import selective_logprob  # noqa: E402

# (row label, output directory, chat-template kwargs used to prompt it)
STAGES = [
    ("base (untrained)", "out/demo/base", {}),
    ("SFT", "out/sft", {}),
    ("PPO", "out/ppo", {}),
    ("GRPO (demo grader reward)", "out/grpo", {}),
    ("GRPO (reward-model reward)", "out/grpo_rm", {}),
    ("Rejection sampling (demo grader reward)", "out/rejection_sampling", {}),
    ("SFT student (2 layers)", "out/sft_student", {}),
    ("On-policy distillation (2 layers, teacher GRPO)", "out/distill", {}),
    ("Offline top-K distillation (2 layers, teacher GRPO)", "out/distill_offline", {}),
    ("DPO", "out/dpo", {}),
    ("SPIN", "out/spin", {}),
    ("SFT continued on SPIN's gold answers (SPIN's control)", "out/spin_control", {}),
    (
        "SteerLM (correctness:4,verbosity:2,politeness:2)",
        "out/steerlm",
        {"attributes": "correctness:4,verbosity:2,politeness:2"},
    ),
]


@dataclass
class Args:
    out: str = "out"
    """directory holding every stage's output"""
    prompts: int = 1024
    """held-out demo prompts per model"""
    max_new_tokens: int = 64
    """answer length limit"""
    seed: int = 1
    """seed of the sampled answers used for the KL estimate"""


@torch.no_grad()
def kl_to_reference(model, ref, tokenizer, prompts: list[list[int]], dist, max_new_tokens: int, seed: int) -> float:
    """Mean over prompts of sum_t [log pi(y_t | ...) - log pi_ref(y_t | ...)] for y sampled from pi (both
    distributions without the pad token, which generation never samples)."""
    g = torch.Generator().manual_seed(seed)
    responses = generate(model, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                         max_new_tokens=max_new_tokens, dist=dist, temperature=1.0, generator=g)  # fmt: skip
    total = 0.0
    for start in range(0, len(prompts), 64):
        p, r = prompts[start : start + 64], responses[start : start + 64]
        seqs = [a + b for a, b in zip(p, r)]
        labels = [[data.IGNORE_INDEX] * len(a) + b for a, b in zip(p, r)]
        batch = data.collate([{"input_ids": s, "labels": lab} for s, lab in zip(seqs, labels)], tokenizer.pad_token_id)
        targets = batch["labels"][:, 1:]
        per_model = []
        for m in (model, ref):
            logits = never_sampled(m(**data.model_inputs(batch, m, dist.device)).logits, tokenizer.pad_token_id)
            per_model.append(selective_logprob(logits[:, :-1], targets).sum(-1))
        total += (per_model[0] - per_model[1]).sum().item()
    return total / len(prompts)


def plot(out: Path) -> Path | None:
    """Training curves: PPO reward and KL, DPO margins, SFT loss, ground-truth score against step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def series(stage: str, key: str):
        path = out / stage / "metrics.jsonl"
        if not path.exists():
            return [], []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if isinstance(r.get(key), (int, float))]
        return [r["step"] for r in rows], [r[key] for r in rows]

    fig, axes = plt.subplots(3, 3, figsize=(15, 12))
    panels = [
        ("sft", "train/loss", "SFT: train loss"),
        ("reward_model", "eval/accuracy", "Reward model: held-out pairwise accuracy"),
        ("ppo", "objective/scores", "PPO: reward-model score (normalised)"),
        ("ppo", "objective/kl", "PPO: KL to reference (nats/answer)"),
        ("ppo", "eval/score", "PPO: ground-truth score (held-out)"),
        ("dpo", "rewards/margins", "DPO: implicit reward margin"),
        ("grpo", "reward/mean", "GRPO: demo-grader reward of the samples"),
        ("grpo", "grpo/zero_std_groups", "GRPO: groups with no reward spread"),
        ("grpo", "eval/score", "GRPO: ground-truth score (held-out)"),
    ]
    for ax, (stage, key, title) in zip(axes.flat, panels):
        x, y = series(stage, key)
        ax.plot(x, y, marker="." if len(x) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("update" if stage in ("ppo", "grpo") else "step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path, dpi=90)
    return path


if __name__ == "__main__":
    args = tyro.cli(Args)
    dist = init_distributed()
    seed_everything(args.seed)
    out = Path(args.out)
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    sft_dir = out / "sft"
    tokenizer = load_tokenizer(str(sft_dir))
    ref = load_causal_lm(str(sft_dir), dist.device).eval()
    prompts_text = demo_task.eval_prompts(args.prompts)

    rows, sft_scores = [], None
    for label, directory, template_kwargs in STAGES:
        path = out / Path(directory).relative_to("out")
        if not (path / "config.json").exists():
            print(f"skip {label}: {path} not found")
            continue
        model = load_causal_lm(str(path), dist.device).eval()
        result = demo_eval(model, tokenizer, dist, args.prompts, args.max_new_tokens, template_kwargs, per_prompt=True)
        if label == "SFT":
            sft_scores = result["scores"]
        ids = [data.render(tokenizer, [{"role": "user", "content": p}], True, **template_kwargs) for p in prompts_text]
        kl = kl_to_reference(model, ref, tokenizer, ids, dist, args.max_new_tokens, args.seed)
        stage = path.name
        rows.append(
            [
                label,
                result["eval/score"],
                paired_difference(result["scores"], sft_scores) if sft_scores else None,
                result["eval/accuracy"],
                result["eval/response_length"],
                kl,
                timings.get(stage),
            ]
        )
        print(f"{label}: score {result['eval/score']:.3f} accuracy {result['eval/accuracy']:.3f}", flush=True)

    lines = [
        f"Ground truth on {args.prompts} held-out demo prompts (greedy answers, graded by common/demo_task.py).",
        "",
        "| method | ground-truth score | vs SFT (± 2 s.e.) | accuracy | mean answer length (tokens) "
        "| KL to SFT (nats/answer) | wall time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, score, diff, acc, length, kl, seconds in rows:
        wall = f"{seconds / 60:.1f} min" if seconds else "-"
        versus = "-" if diff is None or label == "SFT" else f"{diff[0]:+.3f} ± {2 * diff[1]:.3f}"
        lines.append(f"| {label} | {score:.3f} | {versus} | {acc:.3f} | {length:.1f} | {kl:.2f} | {wall} |")
    lines += ["", "vs SFT: the mean per-prompt score difference to the SFT model on the same prompts, with twice its "
              "standard error (paired); a difference larger than that is unlikely to be evaluation noise."]  # fmt: skip
    steer = out / "steerlm" / "eval.json"
    if steer.exists():
        s = json.loads(steer.read_text())
        lines += ["", "SteerLM steerability (request each value 0-4 of one attribute, measure the answer by rule):", "",
                  "| attribute | Spearman(requested, realised) | exact match |", "| --- | ---: | ---: |"]  # fmt: skip
        for attr in ("verbosity", "politeness"):
            if f"steer/{attr}/spearman" in s:
                lines.append(f"| {attr} | {s[f'steer/{attr}/spearman']:.3f} | {s[f'steer/{attr}/exact_match']:.3f} |")
    spin = out / "spin" / "eval.json"
    if spin.exists():
        s = json.loads(spin.read_text())
        iters = sorted({k.split("/")[0] for k in s if k.startswith("iter_") and k.endswith("/eval/score")})
        if iters:
            lines += ["", "SPIN per iteration (ground-truth score): start " + f"{s.get('initial/eval/score', float('nan')):.3f}, "
                      + ", ".join(f"{it} {s[f'{it}/eval/score']:.3f}" for it in iters)]  # fmt: skip
    total = sum(v for v in timings.values() if isinstance(v, (int, float)))
    if total:
        lines += ["", f"Total wall time of the pipeline: {total / 60:.1f} min."]
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    png = plot(out)
    print()
    print(table)
    if png:
        print(f"curves: {png}")
