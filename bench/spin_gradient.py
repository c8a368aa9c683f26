"""Where SPIN's update points at the start of an iteration (not a test): the gold term vs the self-play term.

SPIN's loss depends on Delta = [log p(gold) - log p_t(gold)] - [log p(own) - log p_t(own)] with own ~ p_t. At the
start of an iteration p = p_t, and E_{own ~ p}[grad log p(own)] = 0 (the score-function identity), so in
expectation the update is plain SFT on the gold; the self-play term adds zero-mean noise. This script measures it on
an iteration's saved pairs (spin.py writes them to OUTPUT_DIR/pairs/iter_k.pt) with the model that drew them:

- per batch of B pairs: the norms of g_gold = grad (1/B) sum log p(gold) and g_own = grad (1/B) sum log p(own)
  (sums over each answer's tokens, as SPIN's log-ratios), and the cosine of SPIN's direction g_gold - g_own with the
  SFT direction G = the mean of g_gold over the other batches (and, for scale, g_gold's own cosine with G);
- over all N batches: the norm of the mean g_own next to the mean of the per-batch norms. A zero-mean term's mean
  shrinks like 1/sqrt(N); a signal's does not.

    python bench/spin_gradient.py --model out/sft --pairs out/spin/pairs/iter_1.pt
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import data  # noqa: E402
from common.models import load_causal_lm, load_tokenizer  # noqa: E402
from spin import pair_logprobs  # noqa: E402


@dataclass
class Args:
    model: str = "out/sft"
    """the model that drew the pairs (the iteration's start model)"""
    pairs: str = "out/spin/pairs/iter_1.pt"
    """an iteration's saved pairs"""
    batch_size: int = 128
    """pairs per batch (spin.py's default global batch)"""
    batches: int = 16
    max_seq_len: int = 128
    max_prompt_len: int = 96
    seed: int = 0


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).clone()


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, torch.device("cpu"))
    model.train()
    pairs = torch.load(args.pairs, weights_only=False)["pairs"]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    need = args.batch_size * args.batches
    if len(pairs) < need:
        raise SystemExit(f"{args.pairs}: {len(pairs)} pairs, fewer than --batches x --batch-size = {need}")
    items = [
        data.tokenize_pair(tokenizer, pairs[i], args.max_seq_len, args.max_prompt_len, f"pair {i}")
        for i in order[:need]
    ]
    gold, own = [], []
    for b in range(args.batches):
        batch = items[b * args.batch_size : (b + 1) * args.batch_size]
        grads = []
        for side in (0, 1):
            model.zero_grad(set_to_none=True)
            for mb in data.micro_batches(batch, 64):
                chosen, rejected, _ = pair_logprobs(model, mb, tokenizer.pad_token_id, torch.device("cpu"), False)
                ((chosen if side == 0 else rejected).sum() / len(batch)).backward()
            grads.append(flat_grad(model))
        gold.append(grads[0])
        own.append(grads[1])
        print(f"batch {b + 1}/{args.batches}", file=sys.stderr)
    total = torch.stack(gold).sum(0)
    sft_direction = total / args.batches

    def loo(b: int) -> torch.Tensor:
        """G without batch b: the SFT direction estimated from the other batches (so a batch is not compared with
        itself)"""
        return (total - gold[b]) / (args.batches - 1)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a @ b / (a.norm() * b.norm())).item()

    rows = {
        "|g_gold| per batch": [g.norm().item() for g in gold],
        "|g_own| per batch": [g.norm().item() for g in own],
        "cos(g_gold - g_own, G)": [cos(g - o, loo(b)) for b, (g, o) in enumerate(zip(gold, own))],
        "cos(g_gold, G)": [cos(g, loo(b)) for b, g in enumerate(gold)],
        "cos(g_gold, g_own)": [cos(g, o) for g, o in zip(gold, own)],
    }
    print(f"model {args.model}, pairs {args.pairs}: {args.batches} batches of {args.batch_size} pairs")
    print("| quantity | median | min | max |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    mean_gold, mean_own = sft_direction.norm().item(), torch.stack(own).mean(0).norm().item()
    print(f"| norm of the mean over {args.batches} batches: g_gold | {mean_gold:.3f} | | |")
    print(f"| norm of the mean over {args.batches} batches: g_own | {mean_own:.3f} | | |")
    per_batch_own = statistics.mean(rows["|g_own| per batch"])
    print(
        f"g_own: the mean's norm is {mean_own / per_batch_own:.3f} of a batch's "
        f"(1/sqrt({args.batches}) = {1 / math.sqrt(args.batches):.3f} for pure noise); g_gold: "
        f"{mean_gold / statistics.mean(rows['|g_gold| per batch']):.3f}"
    )
