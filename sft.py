"""Supervised fine-tuning (SFT): maximise the likelihood of demonstration responses.

The loss is the negative log-likelihood of assistant tokens only (system/user turns and padding carry no
label), averaged over all response tokens of the global batch, the standard recipe since InstructGPT
(Ouyang et al., 2022, "Training language models to follow instructions with human feedback", step 1).
Departures from the common recipe: the token average is taken over the *global* batch, so the loss and the
update do not depend on how the batch is split into micro-batches or ranks; and log-probs come from the
fused `kernels.selective_logprob`, which never materialises a (B, T, V) fp32 log-softmax.

With `--packing`, several examples share a row of `--max-seq-len` tokens; a block-diagonal causal mask and
positions restarting per example keep them apart (the packed loss equals the unpacked one, tested).

Run (no flags: the built-in demo task, a tiny Llama built from scratch, ~3 minutes on 2 CPU cores):
    python sft.py
    python sft.py --model-path meta-llama/Llama-3.2-1B-Instruct --data my_sft.jsonl --max-seq-len 2048
    torchrun --nproc_per_node 2 sft.py          # FSDP2 (gloo on CPU, nccl on GPU); same global batch
    python sft.py --resume                      # continue from out/sft/trainer_state
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro

from common import checkpoint, data, lora
from common.dist import autocast, cleanup, init_distributed, seed_everything, wrap_model
from common.generation import demo_eval
from common.lora import LoraArgs
from common.models import load_causal_lm, load_tokenizer, resolve_model_path
from common.tracking import make_tracker
from common.training import (
    Schedule,
    StopSignal,
    make_optimizer,
    make_scheduler,
    nonfinite_step,
    optimizer_step,
)
from kernels import selective_logprob


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "sft"
    """name of the run (wandb run name)"""
    seed: int = 1
    """seed for initialisation, data order and sampling"""
    output_dir: str = "out/sft"
    """where the model (save_pretrained), trainer_state/, metrics.jsonl and eval.json are written"""
    resume: bool = False
    """continue from output_dir/trainer_state (model, optimizer, scheduler, RNG, data position)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "plainalign"
    """wandb project name"""

    # --- model and data ---
    model_path: str = "demo"
    """HF causal LM directory or hub id; `demo` = the built-in tiny Llama, built from scratch"""
    data: str = "demo"
    """SFT data (jsonl/json/parquet/csv or a datasets hub name): messages, or prompt + completion; `demo` = the built-in task"""
    eval_data: str | None = None
    """held-out SFT data for eval/loss; default: the last --eval-size rows of --data"""
    eval_size: int = 256
    """rows held out from --data for eval/loss when --eval-data is not given"""
    max_rows: int = 0
    """train on the first N training rows of --data only (0 = all; the held-out rows are not among them); rows past
    them are never read"""
    max_seq_len: int = 128
    """tokens per example (longer examples are truncated on the right) or per packed row"""
    packing: bool = False
    """pack several examples per row (block-diagonal attention, positions restarting per example)"""
    skip_bad_rows: bool = False
    """skip (and count) malformed rows instead of stopping at the first one"""
    split: str = "train"
    """the split of --data to read (a dataset directory or hub name, e.g. train_prefs; a single file is 'train')"""
    eval_split: str | None = None
    """hold out this split of --data (e.g. test_prefs; of --eval-data when given) instead of its last --eval-size rows"""
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
    learning_rate: float = 2e-3
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)"""
    lr_schedule: Schedule = "cosine"
    """decay after warmup"""
    warmup_steps: int = 50
    """linear warmup steps"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 = off)"""

    # --- batch sizes (local_ = per rank; global = local x accumulation x ranks) ---
    local_micro_batch_size: int = 32
    """examples (or packed rows) per forward/backward on each rank"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    num_epochs: float = 1.0
    """passes over the training data (fractions allowed); ignored when --total-steps > 0"""
    total_steps: int = 0
    """optimizer steps (0 = derived from --num-epochs)"""

    # --- evaluation and logging ---
    log_every: int = 25
    """steps between metric logs"""
    eval_every: int = 250
    """steps between eval/loss measurements (0 = only at the end)"""
    save_every: int = 500
    """steps between checkpoints (0 = only at the end)"""
    demo_eval_prompts: int = 1024
    """held-out demo-task prompts graded at the start and end (0 = off; only with --data demo)"""
    max_new_tokens: int = 64
    """generation length for the demo-task evaluation"""
    skip_nonfinite: bool = False
    """skip steps whose loss is NaN/Inf (counted as train/skipped_steps) instead of stopping"""
    activation_checkpointing: bool = False
    """recompute activations in backward (less memory, ~30% more compute)"""


def count_label_tokens(example: dict) -> int:
    """Tokens that carry a loss: labels shifted by one (position t predicts token t+1)."""
    return sum(label != data.IGNORE_INDEX for label in example["labels"][1:])


def sft_loss_sum(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Summed NLL of the labelled tokens of a batch (normalisation is the caller's, over the global batch)."""
    logits = model(**data.model_inputs(batch, model, device)).logits  # (B, T, V)
    labels = batch["labels"][:, 1:].to(device)  # (B, T-1): position t predicts token t+1
    logprobs = selective_logprob(logits[:, :-1], labels)  # (B, T-1), 0 where label == -100
    return -logprobs.sum()


def make_batch(examples: list, packing: bool, pad_id: int) -> dict:
    return data.collate_packed(examples, pad_id) if packing else data.collate(examples, pad_id)


@torch.no_grad()
def evaluate_loss(model, examples: list, args: Args, dist, pad_id: int) -> float:
    """Token-averaged NLL over a held-out set (sharded across ranks)."""
    model.eval()
    n = len(examples) - len(examples) % dist.world_size
    local = dist.shard(examples[:n])
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for mb in data.micro_batches(local, args.local_micro_batch_size):
        with autocast(dist):
            total[0] += sft_loss_sum(model, make_batch(mb, args.packing, pad_id), dist.device).double()
        total[1] += sum(count_label_tokens(e) for row in mb for e in (row if args.packing else [row]))
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


if __name__ == "__main__":
    args = tyro.cli(Args)
    data.exit_on_data_error()  # a bad row, field or split: one line naming it, no traceback
    dist = init_distributed(args.mixed_precision)
    seed_everything(args.seed)
    stop = StopSignal()

    # 1. model and tokenizer
    model_path = resolve_model_path(args.model_path, dist.is_main, dist.barrier)
    tokenizer = load_tokenizer(model_path, chat_template=args.chat_template)
    model = load_causal_lm(
        model_path, dist.device, attn_implementation=args.attn_implementation, vocab_size=len(tokenizer)
    )
    model = lora.apply_lora(model, args.lora)  # --lora-r > 0: only adapters are trained
    model = wrap_model(model, dist, activation_checkpointing=args.activation_checkpointing)

    # 2. data: parse every row (errors name file, row and field), tokenize, hold out an eval set, pack
    data_path = data.resolve_data_path(args.data, "sft", dist)
    parsed, eval_parsed, eval_source = data.load_train_eval(data_path, args.eval_data, args.eval_size, data.parse_sft,
                                                            args.skip_bad_rows, args.split, args.eval_split, args.max_rows)  # fmt: skip

    def tok(record, context):
        return data.tokenize_sft(tokenizer, record, args.max_seq_len, context)

    train, evals = data.tokenize_train_eval(parsed, eval_parsed, eval_source, tok, args)
    skipped = parsed.skipped + train.skipped
    train_items = data.pack(train.records, args.max_seq_len) if args.packing else train.records
    eval_items = data.pack(evals.records, args.max_seq_len) if args.packing else evals.records

    # 3. batch sizes, optimiser, schedule
    world_batch = args.local_micro_batch_size * args.gradient_accumulation_steps
    global_batch_size = world_batch * dist.world_size
    per_epoch = data.steps_per_epoch(len(train_items), global_batch_size)
    total_steps = args.total_steps or max(1, int(args.num_epochs * per_epoch))
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.lr_schedule, args.warmup_steps, total_steps)
    state = checkpoint.resume_run(args.output_dir, dist, model, optimizer, scheduler) if args.resume else {}
    start_step, skipped_steps, initial = state.get("step", 0), state.get("skipped_steps", 0), state.get("initial", {})
    tracker = make_tracker(
        dist, args.output_dir, args, args.track, args.wandb_project, start_step if args.resume else -1
    )
    tracker.print(f"resolved args: {args}")
    tracker.print(
        f"world_size={dist.world_size} global_batch_size={global_batch_size} total_steps={total_steps} "
        f"train_items={len(train_items)} ({len(train.records)} examples, {sum(e['truncated'] for e in train.records)} "
        f"truncated, {skipped} bad rows skipped) eval_items={len(eval_items)} start_step={start_step}"
    )
    for line in data.skip_report(parsed, train, eval_parsed, evals):
        tracker.print(line)

    def save(step: int) -> None:
        extra = {"step": step, "skipped_steps": skipped_steps, "initial": initial}
        checkpoint.save_run(args.output_dir, dist, model, optimizer, scheduler, tokenizer, extra)

    demo_eval_on = args.demo_eval_prompts > 0 and args.data == "demo"
    if demo_eval_on and not args.resume:
        initial = demo_eval(model, tokenizer, dist, args.demo_eval_prompts, args.max_new_tokens)
        initial.pop("samples")
        tracker.print(f"start: eval/score={initial['eval/score']:.3f} eval/accuracy={initial['eval/accuracy']:.3f}")

    # 4. training loop: each step takes the global batch `data.step_indices(step)`; this rank its slice
    model.train()
    bar = tracker.progress(total_steps, start_step, "sft")
    tokens_seen, t0, step = 0, time.time(), start_step
    for step in range(start_step, total_steps):
        idx = dist.shard(data.step_indices(len(train_items), global_batch_size, step, args.seed))
        local = [train_items[i] for i in idx]
        examples = [e for row in local for e in row] if args.packing else local
        # average over the global batch's label tokens: FSDP averages gradients over ranks, hence x world_size
        n_tokens = dist.sum(sum(count_label_tokens(e) for e in examples))
        loss_sum = torch.zeros((), device=dist.device)
        micro = data.micro_batches(local, args.local_micro_batch_size)
        for k, mb in enumerate(micro):
            if dist.enabled:
                model.set_requires_gradient_sync(k == len(micro) - 1)  # reduce-scatter once per step
            with autocast(dist):
                mb_loss = sft_loss_sum(model, make_batch(mb, args.packing, tokenizer.pad_token_id), dist.device)
            (mb_loss * dist.world_size / n_tokens).backward()
            loss_sum += mb_loss.detach().float()
        if nonfinite_step(loss_sum, step, dist, args.skip_nonfinite):
            optimizer.zero_grad(set_to_none=True)
            skipped_steps += 1
            continue
        grad_norm = optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        tokens_seen += dist.sum(sum(len(e["input_ids"]) for e in examples))
        bar.update(1)

        # 5. log, evaluate, checkpoint
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            loss = dist.sum(loss_sum.item()) / n_tokens
            elapsed = time.time() - t0
            metrics = {
                "train/loss": loss,
                "train/grad_norm": grad_norm,
                "train/lr": scheduler.get_last_lr()[0],
                "train/skipped_steps": skipped_steps,
                "perf/tokens_per_sec": tokens_seen / max(elapsed, 1e-9),
            }
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
                metrics["eval/loss"] = evaluate_loss(model, eval_items, args, dist, tokenizer.pad_token_id)
            tracker.log(metrics, step + 1, echo=False)
            bar.set_postfix(loss=f"{loss:.3f}")
            tokens_seen, t0 = 0, time.time()
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save(step + 1)
        stop.exit_if_requested(dist, lambda: save(step + 1), f"at step {step + 1}", args.output_dir, tracker)
    tracker.close_progress()

    # 6. final evaluation and export
    save(total_steps)
    final = {
        "eval/loss": evaluate_loss(model, eval_items, args, dist, tokenizer.pad_token_id),
        "train/skipped_steps": skipped_steps,
    }
    if demo_eval_on:
        result = demo_eval(model, tokenizer, dist, args.demo_eval_prompts, args.max_new_tokens)
        tracker.table("samples", ["prompt", "response", "score"], result.pop("samples"), total_steps)
        final |= result | {f"initial/{k}": v for k, v in initial.items()}
    tracker.log(final, total_steps)
    tracker.write_eval(final)
    if initial:
        tracker.print(
            f"ground truth ({args.demo_eval_prompts} held-out demo prompts): accuracy {initial['eval/accuracy']:.3f} -> "
            f"{final['eval/accuracy']:.3f}, score {initial['eval/score']:.3f} -> {final['eval/score']:.3f}"
        )
    tracker.print(f"saved {args.output_dir}")
    tracker.finish()
    cleanup(dist)
