"""Grade SPIN experiment models against their start model on the demo task's ground truth (not a test).

For each model: greedy answers to the held-out demo prompts (score, accuracy, verbosity, and the paired score gain
over the start model +- 2 standard errors, as spin.py reports), and the model-vs-data gap of spin.py's `gap/*`:
sampled answers (temperature 1, fixed seed) to the first N demo SFT prompts graded against their gold.

    python bench/spin_grade.py --start out/sft --models out/spin/iter_1 out/spin/iter_2 out/sft_cont
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import data, demo_task  # noqa: E402
from common.dist import init_distributed  # noqa: E402
from common.generation import demo_eval, generate, paired_difference  # noqa: E402
from common.models import load_causal_lm, load_tokenizer  # noqa: E402
from spin import self_play_gap, split_gold  # noqa: E402


@dataclass
class Args:
    start: str = "out/sft"
    """the start model the gains are measured against"""
    models: list[str] = field(default_factory=list)
    """model directories to grade"""
    prompts: int = 1024
    """held-out demo prompts (greedy answers)"""
    gap_prompts: int = 1024
    """first N demo SFT rows whose sampled answers are graded against their gold"""
    max_new_tokens: int = 64
    seed: int = 1
    json_out: str | None = None
    """also write the rows as JSON here"""


@torch.no_grad()
def grade(path: str, args: Args, dist, gap_rows: list[tuple[str, list[dict], str]]) -> dict:
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, dist.device).eval()
    out = demo_eval(model, tokenizer, dist, args.prompts, args.max_new_tokens, per_prompt=True)
    out.pop("samples")
    ids = [data.render(tokenizer, prompt, True) for _, prompt, _ in gap_rows]
    g = torch.Generator().manual_seed(args.seed)
    answers = generate(model, ids, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                       max_new_tokens=args.max_new_tokens, dist=dist, temperature=1.0, generator=g)  # fmt: skip
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    out |= self_play_gap([p for p, _, _ in gap_rows], [gold for _, _, gold in gap_rows], texts)
    return out


if __name__ == "__main__":
    args = tyro.cli(Args)
    dist = init_distributed()
    rows = [json.loads(line) for line in demo_task.ensure_data("sft").read_text().splitlines()[: args.gap_prompts]]
    gap_rows = []
    for i, row in enumerate(rows):
        prompt, gold = split_gold(data.parse_sft(row, "sft", i)["messages"], f"row {i + 1}")
        gap_rows.append((prompt[-1]["content"], prompt, gold))
    start = grade(args.start, args, dist, gap_rows)
    table = [("start " + args.start, start, None)]
    for path in args.models:
        result = grade(path, args, dist, gap_rows)
        table.append((path, result, paired_difference(result["scores"], start["scores"])))
    print(f"gold (first {len(gap_rows)} SFT rows): accuracy {start['gap/gold_accuracy']:.3f}, "
          f"score {start['gap/gold_score']:.3f}, verbosity {start['gap/gold_verbosity']:.2f}")  # fmt: skip
    print(
        "| model | score | gain ± 2 s.e. | accuracy | verbosity | sampled accuracy | sampled verbosity | verbosity TV |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    records = []
    for name, r, gain in table:
        g = f"{gain[0]:+.3f} ± {2 * gain[1]:.3f}" if gain else "-"
        print(f"| {name} | {r['eval/score']:.3f} | {g} | {r['eval/accuracy']:.3f} | {r['eval/verbosity']:.2f} | "
              f"{r['gap/own_accuracy']:.3f} | {r['gap/own_verbosity']:.2f} | {r['gap/verbosity_tv']:.3f} |")  # fmt: skip
        records.append({"model": name, "gain": gain, **{k: v for k, v in r.items() if k != "scores"}})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(records, indent=1))
