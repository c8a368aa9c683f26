"""How well a reward model ranks a policy's OWN samples: AUC of its score for right vs wrong answers (demo task).

Held-out pairwise accuracy measures a reward model on the preference data's pairs; what RL needs is that it ranks
the policy's samples, whose mistakes may look nothing like the data's. This samples --samples answers per held-out
demo prompt from the policy (temperature --temperature, keyed sampling, fixed seed), grades them with the demo task's
grader, scores them with the reward model exactly as ppo.py and grpo.py do (common.rewards.score_replies: prompt +
reply through EOS), and prints:
  auc            P(score of a right answer > score of a wrong answer), over all right x wrong pairs (ties count 1/2)
  within-prompt  the same over right x wrong pairs of the same prompt (what a group baseline compares)
  spearman       rank correlation of the score with the graded utility over all samples

    python bench/reward_model_auc.py                                   # out/sft samples, out/reward_model scores
    python bench/reward_model_auc.py --reward-model-path out/rm_other --read-at newline   # the old read-out
`--read-at newline` scores prompt + reply + the chat template's text after the end-of-turn token (what
reward_model.py trained on before common.rewards): for before/after comparisons only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import data, demo_task, rewards  # noqa: E402
from common.dist import init_distributed, seed_everything  # noqa: E402
from common.generation import generate, sample_key  # noqa: E402
from common.models import load_causal_lm, load_sequence_classifier, load_tokenizer  # noqa: E402


@dataclass
class Args:
    policy_path: str = "out/sft"
    """policy whose samples are ranked"""
    reward_model_path: str = "out/reward_model"
    """reward model (one output)"""
    prompts: int = 512
    """held-out demo prompts"""
    samples: int = 4
    """samples per prompt"""
    temperature: float = 0.7
    """sampling temperature (ppo.py's default)"""
    max_new_tokens: int = 64
    """answer length limit"""
    seed: int = 1
    """sampling seed"""
    read_at: Literal["eos", "newline"] = "eos"
    """eos: common.rewards' tokens (prompt + reply through EOS); newline: also the template's text after EOS"""
    output: str | None = None
    """also write the result as JSON here"""


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(pos > neg) + 0.5 P(pos == neg) over all pairs (the Mann-Whitney statistic)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry / (rx.norm() * ry.norm())).item()


if __name__ == "__main__":
    args = tyro.cli(Args)
    dist = init_distributed()
    seed_everything(args.seed)
    tokenizer = load_tokenizer(args.policy_path)
    policy = load_causal_lm(args.policy_path, dist.device).eval()
    rm = load_sequence_classifier(args.reward_model_path, dist.device, 1, pad_token_id=tokenizer.pad_token_id).eval()
    texts = demo_task.eval_prompts(args.prompts)
    prompt_ids = [data.render(tokenizer, [{"role": "user", "content": p}], True) for p in texts]
    queries = [q for q in prompt_ids for _ in range(args.samples)]
    keys = [sample_key(args.seed, k, s) for k in range(len(texts)) for s in range(args.samples)]
    replies = generate(policy, queries, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                       max_new_tokens=args.max_new_tokens, dist=dist, temperature=args.temperature,
                       sample_keys=keys)  # fmt: skip
    answers = tokenizer.batch_decode(replies, skip_special_tokens=True)
    grades = [demo_task.grade(texts[i // args.samples], answers[i]) for i in range(len(answers))]
    scores = []
    with torch.no_grad():
        for s in range(0, len(queries), 64):
            q, r = queries[s : s + 64], replies[s : s + 64]
            if args.read_at == "eos":
                scores.append(rewards.score_replies(rm, q, r, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                    dist.device)[:, 0])  # fmt: skip
            else:  # the rendered conversation, with whatever the template writes after the end-of-turn token
                seqs = [data.render(tokenizer, [{"role": "user", "content": texts[(s + i) // args.samples]},
                                                {"role": "assistant", "content": answers[s + i]}])
                        for i in range(len(q))]  # fmt: skip
                scores.append(rewards.score_sequences(rm, seqs, tokenizer.pad_token_id, dist.device)[:, 0])
    scores = torch.cat(scores).cpu()
    correct = torch.tensor([g["correct"] > 0 for g in grades])
    utility = torch.tensor([g["score"] for g in grades])
    within = []
    for k in range(len(texts)):
        sl = slice(k * args.samples, (k + 1) * args.samples)
        sc, ok = scores[sl], correct[sl]
        if ok.any() and (~ok).any():
            diff = sc[ok][:, None] - sc[~ok][None, :]
            within += ((diff > 0).double() + 0.5 * (diff == 0).double()).flatten().tolist()
    result = {
        "policy": args.policy_path,
        "reward_model": args.reward_model_path,
        "read_at": args.read_at,
        "samples": len(scores),
        "accuracy_of_samples": correct.double().mean().item(),
        "auc": auc(scores[correct], scores[~correct]),
        "within_prompt_auc": sum(within) / len(within) if within else float("nan"),
        "within_prompt_pairs": len(within),
        "spearman_utility": spearman(scores, utility),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
