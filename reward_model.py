"""Reward models: Bradley-Terry on preference pairs, or regression over N attributes (SteerLM's model).

Bradley-Terry (`--objective bt`, the InstructGPT reward model, Ouyang et al. 2022, eq. 1):
    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - m)
with m = the pair's `margin` field when `--use-margin` (Llama 2, Touvron et al. 2023, eq. 2) and an optional
reward-centering term c * (r_chosen + r_rejected)^2 (Eisenstein et al. 2023) that pins the free offset of BT
rewards near 0. That is `--loss regular_bt`; on pairs with a preference strength s (HelpSteer2-Preference, Wang
et al. 2024) `--loss margin_bt` uses m = |s| and `--loss scaled_bt` weights the pair's loss by |s|:
    margin_bt: -log sigmoid(r_c - r_r - |s|)        scaled_bt: |s| * -log sigmoid(r_c - r_r)
With `--reward-output NAME` the pairs train one output of a model with several (a regression attribute model,
as HelpSteer2-Preference starts its BT models from a helpfulness regression model); the saved model keeps it alone.

Regression (`--objective regression`, SteerLM's attribute-prediction model, Dong et al. 2023): one output per
attribute, mean squared error over the attributes a row actually has. A missing attribute contributes
nothing to the loss (it is never a 0 label). `--attribute-weights` stores a weighting that merges the
attributes into one scalar reward at inference (HelpSteer2 style); it is saved in the model's config.

The score of a sequence is read at its last token by the model itself (`AutoModelForSequenceClassification` pools
at the last non-pad token), so the saved directory scores identically when loaded by transformers alone. The
sequence is `common.rewards.reward_model_tokens`: prompt + reply up to and including its end-of-turn (EOS) token,
without the newline the chat template writes after it, because that is what a generated reply ends with and
ppo.py/grpo.py score generated replies (the same definition everywhere; see common/rewards.py). The head is initialised N(0, 1/sqrt(H+1)) and chosen and rejected go through one forward.
After training, `score_mean`/`score_std` of the rewards on the held-out set (`--reward-standardization train`:
on every training response; `off`: none) are written to the config, so `ppo.py` and `grpo.py` normalise rewards.

Run (no flags: from out/sft on the demo task's preference pairs, ~1-2 minutes on 2 CPU cores):
    python reward_model.py
    python reward_model.py --loss scaled_bt                         # demo pairs carry a strength (utility gap)
    python reward_model.py --objective regression --data demo      # demo attributes (SteerLM)
    python reward_model.py --model-path Qwen/Qwen2.5-0.5B-Instruct --data Anthropic/hh-rlhf
    torchrun --nproc_per_node 2 reward_model.py
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

from common import checkpoint, data, lora, rewards
from common.dist import autocast, cleanup, init_distributed, seed_everything, wrap_model
from common.lora import LoraArgs
from common.models import end_of_turn_ids, load_sequence_classifier, load_tokenizer
from common.tracking import make_tracker
from common.training import Schedule, StopSignal, make_optimizer, make_scheduler, nonfinite_step, optimizer_step


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "reward_model"
    """name of the run (wandb run name)"""
    seed: int = 1
    """seed for initialisation and data order"""
    output_dir: str = "out/reward_model"
    """where the model (save_pretrained), trainer_state/, metrics.jsonl and eval.json are written"""
    resume: bool = False
    """continue from output_dir/trainer_state"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "plainalign"
    """wandb project name"""

    # --- model and data ---
    model_path: str = "out/sft"
    """HF directory or hub id to start from (a causal LM gets a new score head)"""
    objective: Literal["bt", "regression"] = "bt"
    """bt: Bradley-Terry on preference pairs; regression: MSE on N attributes (SteerLM)"""
    data: str = "demo"
    """bt: preference pairs (prompt/chosen/rejected or Anthropic HH); regression: attribute rows or HelpSteer columns; `demo` = the built-in task"""
    eval_data: str | None = None
    """held-out data; default: the last --eval-size rows of --data"""
    eval_size: int = 512
    """rows held out from --data when --eval-data is not given"""
    max_seq_len: int = 128
    """tokens of prompt + response (responses are truncated to fit)"""
    max_prompt_len: int = 96
    """longest prompt accepted (longer: see --prompt-truncation)"""
    skip_bad_rows: bool = False
    """skip (and count) malformed rows instead of stopping at the first one"""
    split: str = "train"
    """the split of --data to read (a dataset directory or hub name, e.g. train_prefs; a single file is 'train')"""
    eval_split: str | None = None
    """hold out this split of --data (e.g. test_prefs; of --eval-data when given) instead of its last --eval-size rows"""
    prompt_truncation: Literal["left", "skip", "error"] = "error"
    """a prompt over --max-prompt-len: left keeps its last turns (then tokens), skip drops the row, error stops"""
    num_proc: int | None = None
    """processes that tokenise the data (`datasets` map; the tokens are cached on disk, so a rerun with the same data,
    tokenizer and settings reads them back); default: 0 (a plain loop, no cache) under 1000 rows, else min(8, CPUs)"""
    data_cache_dir: str | None = None
    """where tokenised data is cached (default: <HF_DATASETS_CACHE>/plainalign_tokens); safe to delete"""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """attention kernel of the HF model"""
    mixed_precision: Literal["auto", "bf16", "off"] = "auto"
    """bf16 compute, fp32 master weights: `auto` = bf16 on CUDA, fp32 on CPU; `bf16` also on CPU; `off` = fp32"""
    chat_template: str | None = None
    """`chatml`, `llama3`, `plain` (User: / Assistant: turns, EOS after each reply) or a Jinja file; overrides the
    model's own template (base models have none)"""

    lora: tyro.conf.OmitArgPrefixes[LoraArgs] = field(default_factory=LoraArgs)
    """LoRA adapters instead of full fine-tuning: --lora-r > 0 (common/lora.py, docs/lora.md)"""

    # --- optimiser ---
    learning_rate: float = 5e-4
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)"""
    lr_schedule: Schedule = "cosine"
    """decay after warmup"""
    warmup_steps: int = 20
    """linear warmup steps"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 = off)"""

    # --- batch sizes (local_ = per rank) ---
    local_micro_batch_size: int = 32
    """pairs (bt) or rows (regression) per forward/backward on each rank"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    num_epochs: float = 2.0
    """passes over the training data; ignored when --total-steps > 0"""
    total_steps: int = 0
    """optimizer steps (0 = derived from --num-epochs)"""

    # --- method ---
    use_margin: bool = True
    """bt: subtract the row's `margin` field (when present) inside the sigmoid (regular_bt only)"""
    loss: Literal["regular_bt", "margin_bt", "scaled_bt"] = "regular_bt"
    """bt: regular_bt -log sigmoid(r_c - r_r - margin); margin_bt -log sigmoid(r_c - r_r - |s|); scaled_bt
    |s| x -log sigmoid(r_c - r_r), s = the pair's preference strength (HelpSteer2-Preference, Wang et al. 2024)"""
    strength_column: str = "strength"
    """margin_bt/scaled_bt: the data column with each pair's preference strength (a number on every row)"""
    reward_output: str | None = None
    """bt from a model with several outputs (e.g. a regression attribute model): the output, by name, that the
    pairs train (e.g. `helpfulness`); the saved reward model keeps that output only"""
    reward_standardization: Literal["held_out", "train", "off"] = "held_out"
    """the responses whose score mean/std are stored in the config as score_mean/score_std, which ppo.py and
    grpo.py normalise rewards with: the held-out set's, every training response's, or none"""
    center_rewards_coefficient: float = 0.0
    """bt: weight of the (r_chosen + r_rejected)^2 centering term (0 = off; 0.01 is typical)"""
    attribute_weights: str = ""
    """regression: `name=w,...` to merge attributes into one reward at inference (stored in the config)"""

    # --- evaluation and logging ---
    log_every: int = 25
    """steps between metric logs"""
    eval_every: int = 100
    """steps between evaluations on the held-out set (0 = only at the end)"""
    save_every: int = 500
    """steps between checkpoints (0 = only at the end)"""
    skip_nonfinite: bool = False
    """skip steps whose loss is NaN/Inf (counted) instead of stopping"""
    activation_checkpointing: bool = False
    """recompute activations in backward (less memory, more compute)"""


def bt_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor,
    center_coef: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss (B,): w (-log sigmoid(r_c - r_r - m)) + c (r_c + r_r)^2, w = 1 by default."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if weight is not None:
        loss = weight * loss
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


def pair_margin_and_weight(loss: str, margin: float | None, strength: float | None) -> tuple[float, float]:
    """(m, w) of one pair for `bt_loss` under --loss: regular_bt (the row's margin or 0, 1); margin_bt (|s|, 1);
    scaled_bt (0, |s|). Only the size of s counts: the pair's order already says which reply is better."""
    if loss == "regular_bt":
        return (margin or 0.0), 1.0
    if strength is None:
        raise ValueError(f"--loss {loss} needs the pair's preference strength")
    return (abs(strength), 1.0) if loss == "margin_bt" else (0.0, abs(strength))


def output_index(config, name: str | None, path: str) -> int | None:
    """The output of a model with several outputs that --reward-output names; None for a model with one output
    or a causal LM (which gets a new one-output head). Names: `attribute_names` (reward_model.py --objective
    regression) or `id2label`."""
    is_classifier = any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])
    num_labels = config.num_labels if is_classifier else 1
    if num_labels == 1:
        if name is not None:
            raise ValueError(f"--reward-output {name}: {path} has one output (or none yet); leave --reward-output out")
        return None
    names = getattr(config, "attribute_names", None) or [config.id2label[k] for k in range(num_labels)]
    if name is None:
        raise ValueError(f"{path} has {num_labels} outputs {names}: choose the one to train with --reward-output")
    if name not in names:
        raise ValueError(f"--reward-output {name}: not an output of {path} (its outputs: {names})")
    return names.index(name)


def keep_output(model, index: int, name: str) -> None:
    """Cut the score head of a model with several outputs down to output `index` (its weights kept), so the
    trained reward model has the one output ppo.py and grpo.py read. The config loses the other outputs'
    names, weights and statistics."""
    head = model.score
    new = torch.nn.Linear(head.in_features, 1, bias=head.bias is not None, device=head.weight.device)
    with torch.no_grad():
        new.weight.copy_(head.weight[index : index + 1])
        if head.bias is not None:
            new.bias.copy_(head.bias[index : index + 1])
    model.score = new.to(head.weight.dtype)
    model.num_labels = model.config.num_labels = 1
    model.config.id2label, model.config.label2id = {0: name}, {name: 0}
    for key in ("attribute_names", "attribute_weights", "score_mean", "score_std"):
        if hasattr(model.config, key):
            delattr(model.config, key)


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors over present attributes, their count); target NaN = missing (B, N)."""
    present = ~torch.isnan(target)
    err = torch.where(present, pred.float() - torch.nan_to_num(target), torch.zeros_like(pred, dtype=torch.float32))
    return (err**2).sum(), present.sum()


def tokenize_example(
    tokenizer, record: dict, args: Args, names: list[str], context: str, eos_ids: list[int] | None = None
) -> dict:
    """bt: {"chosen", "rejected"} token ids (prompt + reply through EOS, any of `eos_ids`, default the tokenizer's:
    `rewards.reward_model_tokens`), the margin and the weight of the pair's loss (`pair_margin_and_weight`);
    regression: {"input_ids", "target"} with NaN for a missing attribute."""
    eos = eos_ids or tokenizer.eos_token_id
    if args.objective == "bt":
        if args.loss != "regular_bt" and record["strength"] is None:
            raise data.DataError(
                f"{context}, field '{args.strength_column}': missing (--loss {args.loss} needs each pair's preference "
                "strength; --strength-column names the column)"
            )
        t = data.tokenize_pair(
            tokenizer, record, args.max_seq_len, args.max_prompt_len, context, args.prompt_truncation
        )
        margin, weight = pair_margin_and_weight(
            args.loss, record["margin"] if args.use_margin else None, record.get("strength")
        )
        return {
            "chosen": rewards.reward_model_tokens(t["prompt_ids"], t["chosen_ids"], eos),
            "rejected": rewards.reward_model_tokens(t["prompt_ids"], t["rejected_ids"], eos),
            "margin": margin,
            "weight": weight,
        }
    ids = rewards.conversation_reward_tokens(tokenizer, record["messages"], context, eos_ids)
    if len(ids) > args.max_seq_len:
        raise data.DataError(f"{context}: {len(ids)} tokens, over --max-seq-len {args.max_seq_len}")
    target = [math.nan if record["attributes"].get(n) is None else record["attributes"][n] for n in names]
    return {"input_ids": ids, "target": target}


def parse_weights(spec: str, names: list[str]) -> list[float] | None:
    if not spec:
        return None
    weights = dict.fromkeys(names, 0.0)
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in weights:
            raise ValueError(f"--attribute-weights: unknown attribute {name.strip()!r} (have {names})")
        weights[name.strip()] = float(value)
    return [weights[n] for n in names]


@torch.no_grad()
def evaluate(model, items: list[dict], args: Args, dist, pad_id: int, names: list[str]) -> tuple[dict, torch.Tensor]:
    """bt: eval/accuracy (chosen scored higher), eval/margin, eval/loss (the training loss: BT with the pairs'
    margins or strength weights and the centering term); regression: eval/loss (mean squared error) and per-attribute MAE/RMSE.

    Also returns this rank's scores of every held-out response, for the reward statistics.
    """
    model.eval()
    n = len(items) - len(items) % dist.world_size
    local = dist.shard(items[:n])
    all_scores = []
    if args.objective == "bt":
        total = torch.zeros(4, dtype=torch.float64, device=dist.device)  # correct, margin, loss, count
        for mb in data.micro_batches(local, args.local_micro_batch_size):
            with autocast(dist):
                r = rewards.score_sequences(
                    model, [e["chosen"] for e in mb] + [e["rejected"] for e in mb], pad_id, dist.device
                )[:, 0]
            rc, rr = r[: len(mb)], r[len(mb) :]
            margin = torch.tensor([e["margin"] for e in mb], device=dist.device)
            weight = torch.tensor([e["weight"] for e in mb], device=dist.device)
            # the training objective itself (margin, weight and centering term included): compares with train/loss
            loss = bt_loss(rc, rr, margin, args.center_rewards_coefficient, weight)
            total += torch.stack(
                [(rc > rr).sum(), (rc - rr).sum(), loss.sum(), torch.tensor(len(mb), device=dist.device)]
            ).double()
            all_scores.append(r)
        dist.all_reduce(total)
        metrics = {
            "eval/accuracy": total[0] / total[3],
            "eval/margin": total[1] / total[3],
            "eval/loss": total[2] / total[3],
        }
    else:
        err = torch.zeros(3, len(names), dtype=torch.float64, device=dist.device)  # |e|, e^2, count
        for mb in data.micro_batches(local, args.local_micro_batch_size):
            with autocast(dist):
                pred = rewards.score_sequences(model, [e["input_ids"] for e in mb], pad_id, dist.device)
            target = torch.tensor([e["target"] for e in mb], device=dist.device)
            present = ~torch.isnan(target)
            diff = torch.where(present, pred - torch.nan_to_num(target), 0.0).double()
            err += torch.stack([diff.abs().sum(0), (diff**2).sum(0), present.sum(0).double()])
            all_scores.append(pred)
        dist.all_reduce(err)
        count = err[2].clamp(min=1)
        metrics = {"eval/loss": (err[1].sum() / count.sum())}
        for k, name in enumerate(names):
            metrics[f"eval/mae/{name}"] = err[0, k] / count[k]
            metrics[f"eval/rmse/{name}"] = (err[1, k] / count[k]).sqrt()
    model.train()
    return {k: float(v) for k, v in metrics.items()}, torch.cat(all_scores)


if __name__ == "__main__":
    args = tyro.cli(Args)
    data.exit_on_data_error()  # a bad row, field or split: one line naming it, no traceback
    if args.objective != "bt" and (args.loss != "regular_bt" or args.reward_output is not None):
        raise ValueError("--loss and --reward-output are for --objective bt (preference pairs)")
    dist = init_distributed(args.mixed_precision)
    seed_everything(args.seed)
    stop = StopSignal()
    tokenizer = load_tokenizer(args.model_path, chat_template=args.chat_template)
    eos_ids = end_of_turn_ids(tokenizer, args.model_path)  # what generation stops at in PPO/GRPO: score through it

    # 1. data: pairs (bt) or attribute rows (regression); errors name file, row and field
    kind, parse = (
        ("preference", data.parse_preference) if args.objective == "bt" else ("attributes", data.parse_attributes)
    )
    if args.objective == "bt" and args.loss != "regular_bt":  # read (and check) the strength column
        parse = functools.partial(data.parse_preference, strength_column=args.strength_column)
    data_path = data.resolve_data_path(args.data, kind, dist)
    parsed, eval_parsed, eval_source = data.load_train_eval(
        data_path, args.eval_data, args.eval_size, parse, args.skip_bad_rows, args.split, args.eval_split
    )
    names: list[str] = []
    if args.objective == "regression":  # attribute order: first seen; the model's outputs follow it
        for r in parsed.records:
            names += [n for n in r["attributes"] if n not in names]

    def tok(record, context):
        return tokenize_example(tokenizer, record, args, names, context, eos_ids)

    train, evals = data.tokenize_train_eval(parsed, eval_parsed, eval_source, tok, args)

    # 2. model: a sequence classifier with 1 (bt) or N (regression) outputs; bt from a model with several outputs
    # trains the one --reward-output names, cut out of its head
    from transformers import AutoConfig

    start_config = AutoConfig.from_pretrained(args.model_path)
    keep = output_index(start_config, args.reward_output, args.model_path) if args.objective == "bt" else None
    num_labels = (1 if keep is None else start_config.num_labels) if args.objective == "bt" else len(names)
    fresh_head = not getattr(start_config, "plainalign_reward_model", False) and keep is None
    model = load_sequence_classifier(
        args.model_path, dist.device, num_labels, attn_implementation=args.attn_implementation,
        pad_token_id=tokenizer.pad_token_id, init_head=fresh_head and not args.resume, vocab_size=len(tokenizer),
    )  # fmt: skip
    if keep is not None:
        keep_output(model, keep, args.reward_output)
    model = lora.apply_lora(model, args.lora, task="seq_cls")  # --lora-r > 0: adapters + the score head are trained
    model = wrap_model(model, dist, activation_checkpointing=args.activation_checkpointing)

    # 3. batch sizes, optimiser, schedule, resume
    global_batch_size = args.local_micro_batch_size * args.gradient_accumulation_steps * dist.world_size
    per_epoch = data.steps_per_epoch(len(train.records), global_batch_size)
    total_steps = args.total_steps or max(1, int(args.num_epochs * per_epoch))
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.lr_schedule, args.warmup_steps, total_steps)
    state = checkpoint.resume_run(args.output_dir, dist, model, optimizer, scheduler) if args.resume else {}
    start_step, skipped_steps = state.get("step", 0), state.get("skipped_steps", 0)
    tracker = make_tracker(
        dist, args.output_dir, args, args.track, args.wandb_project, start_step if args.resume else -1
    )
    tracker.print(f"resolved args: {args}")
    tracker.print(
        f"world_size={dist.world_size} global_batch_size={global_batch_size} total_steps={total_steps} "
        f"train={len(train.records)} eval={len(evals.records)} skipped_rows={parsed.skipped + train.skipped} "
        f"attributes={names or None} start_step={start_step}"
    )
    for line in data.skip_report(parsed, train, eval_parsed, evals):
        tracker.print(line)

    def save(step: int, extra_config: dict | None = None) -> None:
        config = {"plainalign_reward_model": True, "objective": args.objective} | (extra_config or {})
        if args.objective == "bt":
            config["loss"] = args.loss
        if names:
            config |= {
                "attribute_names": names,
                "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)},
            }
            config["attribute_weights"] = parse_weights(args.attribute_weights, names)
        extra = {"step": step, "skipped_steps": skipped_steps}
        checkpoint.save_run(args.output_dir, dist, model, optimizer, scheduler, tokenizer, extra, config)

    # 4. training loop
    model.train()
    bar = tracker.progress(total_steps, start_step, "reward_model")
    t0, seqs = time.time(), 0
    for step in range(start_step, total_steps):
        idx = dist.shard(data.step_indices(len(train.records), global_batch_size, step, args.seed))
        local = [train.records[i] for i in idx]
        if args.objective == "bt":
            denom = global_batch_size / dist.world_size  # mean over the global batch's pairs; FSDP averages ranks
        else:
            denom = dist.sum(sum(sum(not math.isnan(t) for t in e["target"]) for e in local)) / dist.world_size
        loss_sum = torch.zeros((), device=dist.device)
        stats = torch.zeros(3, device=dist.device)  # accuracy, margin, mean reward (summed over pairs)
        micro = data.micro_batches(local, args.local_micro_batch_size)
        for k, mb in enumerate(micro):
            if dist.enabled:
                model.set_requires_gradient_sync(k == len(micro) - 1)
            with autocast(dist):
                if args.objective == "bt":
                    r = rewards.score_sequences(
                        model,
                        [e["chosen"] for e in mb] + [e["rejected"] for e in mb],
                        tokenizer.pad_token_id,
                        dist.device,
                    )[:, 0]
                    rc, rr = r[: len(mb)], r[len(mb) :]
                    margin = torch.tensor([e["margin"] for e in mb], device=dist.device)
                    weight = torch.tensor([e["weight"] for e in mb], device=dist.device)
                    mb_loss = bt_loss(rc, rr, margin, args.center_rewards_coefficient, weight).sum()
                    stats += torch.stack([(rc > rr).float().sum(), (rc - rr).sum(), (rc + rr).sum() / 2]).detach()
                else:
                    pred = rewards.score_sequences(
                        model, [e["input_ids"] for e in mb], tokenizer.pad_token_id, dist.device
                    )
                    mb_loss, _ = regression_loss(pred, torch.tensor([e["target"] for e in mb], device=dist.device))
            (mb_loss / denom).backward()
            loss_sum += mb_loss.detach()
            seqs += len(mb) * (2 if args.objective == "bt" else 1)
        if nonfinite_step(loss_sum, step, dist, args.skip_nonfinite):
            optimizer.zero_grad(set_to_none=True)
            skipped_steps += 1
            continue
        grad_norm = optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        bar.update(1)

        # 5. log, evaluate, checkpoint
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            dist.all_reduce(stats)
            total_loss = dist.sum(loss_sum.item())
            metrics = {
                "train/loss": total_loss / (global_batch_size if args.objective == "bt" else denom * dist.world_size),
                "train/grad_norm": grad_norm,
                "train/lr": scheduler.get_last_lr()[0],
                "train/skipped_steps": skipped_steps,
                "perf/sequences_per_sec": dist.sum(seqs) / max(time.time() - t0, 1e-9),
            }
            if args.objective == "bt":
                metrics |= {
                    "train/accuracy": stats[0].item() / global_batch_size,
                    "train/margin": stats[1].item() / global_batch_size,
                    "train/reward_mean": stats[2].item() / global_batch_size,
                }
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
                metrics |= evaluate(model, evals.records, args, dist, tokenizer.pad_token_id, names)[0]
            tracker.log(metrics, step + 1, echo=False)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
            t0, seqs = time.time(), 0
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save(step + 1)
        stop.exit_if_requested(dist, lambda: save(step + 1), f"at step {step + 1}", args.output_dir, tracker)
    tracker.close_progress()

    # 6. final evaluation; the score statistics (--reward-standardization) go into the config for ppo.py/grpo.py
    final, scores = evaluate(model, evals.records, args, dist, tokenizer.pad_token_id, names)
    final["train/skipped_steps"] = skipped_steps
    stats_config = {"score_mean": None, "score_std": None}  # off: none (also over a start model's): raw scores
    if args.reward_standardization != "off":
        if args.reward_standardization == "train":  # every training response, scored as the held-out ones are
            scores = evaluate(model, train.records, args, dist, tokenizer.pad_token_id, names)[1]
        gathered = torch.cat([torch.as_tensor(s) for s in dist.all_gather_object(scores.cpu())])  # (M, N)
        mean, std = gathered.mean(0), gathered.std(0)
        stats_config = {"score_mean": mean.tolist(), "score_std": std.tolist()}
        if args.objective == "bt":
            stats_config = {"score_mean": mean.item(), "score_std": std.item()}
        final |= {f"reward/{k}": v for k, v in stats_config.items()}
    stats_config["score_stats_from"] = args.reward_standardization
    save(total_steps, stats_config)
    tracker.log(final, total_steps)
    tracker.write_eval(final)
    if args.objective == "bt":
        tracker.print(
            f"held-out pairwise accuracy {final['eval/accuracy']:.3f}, mean margin {final['eval/margin']:.3f}"
        )
    tracker.print(f"saved {args.output_dir}")
    tracker.finish()
    cleanup(dist)
