"""Online rejection sampling (best-of-N fine-tuning, NeMo-Aligner's RS; Touvron et al. 2023, Llama 2 sec. 3.2.3).

The policy samples --num-rollouts responses to each prompt, a reward (programs and/or a reward model, scored as
in grpo.py) ranks them, the --top-n best of each prompt (optionally only those scoring at least --min-reward) are
kept, and the policy is fine-tuned on them with the SFT loss; then it samples again. One update:
    1. rollout     N samples for each of the update's prompts (left-padded prompts, KV cache, temperature/top-k/top-p,
                   cut after EOS), randomness keyed by (seed, update, prompt position, sample): the same samples on
                   any number of processes
    2. rewards     reward functions on the decoded text and/or the reward model on prompt + reply through EOS
                   (common.rewards.RewardSources, exactly as grpo.py), weighted and summed
    3. selection   per prompt, the top-n samples by reward (ties: the earlier sample), among those that emitted EOS
                   (unless --keep-truncated) and reach --min-reward; a prompt may keep fewer than n, or none
    4. fine-tune   --epochs-per-update passes over the kept samples in --num-minibatches minibatches (optimizer
                   steps): the negative log-likelihood of the reply tokens through EOS given the prompt, averaged over
                   the global minibatch's reply tokens (sft.py's loss on these rows; micro-batching and the number of
                   ranks do not change it). A minibatch with no kept sample on any rank takes no optimizer step
    5. log         reward of all and of the kept samples, per reward function, fraction of prompts with a kept
                   sample, kept fraction, lengths, tokens/s; ground truth on the demo task
Departures from NeMo-Aligner's RS: replies that never emitted EOS are not kept by default (training on a cut-off
reply teaches the policy not to stop); the kept set has a fixed number of slots (prompts x top-n) per rank, empty
slots carry no loss, so every rank runs the same forward/backward passes under FSDP2.

Run (no flags: policy out/sft, demo prompts, the demo task's grader as the reward, a few minutes on 2 CPU cores):
    python rejection_sampling.py
    python rejection_sampling.py --reward-model-path out/reward_model --top-n 2
    torchrun --nproc_per_node 8 rejection_sampling.py --model-path my_sft --data math.jsonl \\
        --reward-fn my_rewards:exact_match --min-reward 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro

from common import checkpoint, data, lora, rewards
from common.dist import autocast, cleanup, exact_div, init_distributed, sampling_generator, seed_everything, wrap_model
from common.generation import (
    clock,
    demo_eval,
    generate,
    group_sample_keys,
    is_eos,
    paired_difference,
    truncate_after_eos,
)
from common.lora import LoraArgs
from common.models import end_of_turn_ids, load_causal_lm, load_tokenizer
from common.tracking import make_tracker
from common.training import (
    NonFiniteLoss,
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
    exp_name: str = "rejection_sampling"
    """name of the run (wandb run name)"""
    seed: int = 1
    """seed for data order and sampling"""
    output_dir: str = "out/rejection_sampling"
    """where the policy (save_pretrained), trainer_state/, metrics.jsonl and eval.json go"""
    resume: bool = False
    """continue from output_dir/trainer_state (policy, optimiser, schedule, RNG, data position)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "plainalign"
    """wandb project name"""

    # --- models, rewards and data ---
    model_path: str = "out/sft"
    """policy to start from (an SFT model)"""
    reward_fn: tuple[str, ...] = ()
    """reward functions `module:function` or `file.py:function`, each fn(prompts, completions, **columns) ->
    list[float | None] (columns: the dataset row's other fields); `demo` = the demo task's grader. Default: `demo`
    when --data is demo and no --reward-model-path is given"""
    reward_model_path: str | None = None
    """a reward model from reward_model.py (one output), scored on prompt + reply through EOS"""
    reward_weights: tuple[float, ...] = ()
    """weights of the rewards, in the order: each --reward-fn, then the reward model (default: all 1)"""
    normalize_reward: bool = True
    """normalise reward-model scores with its stored score_mean/score_std (when its config has them)"""
    data: str = "demo"
    """prompts ({"prompt": str|messages} plus any columns the reward functions read); `demo` = the built-in task"""
    max_prompt_len: int = 64
    """longest prompt accepted (longer: see --prompt-truncation)"""
    skip_bad_rows: bool = False
    """skip (and count) malformed rows instead of stopping at the first one"""
    split: str = "train"
    """the split of --data to read (a dataset directory or hub name, e.g. train_prefs; a single file is 'train')"""
    prompt_truncation: Literal["left", "skip", "error"] = "error"
    """a prompt over --max-prompt-len: left keeps its last turns (then tokens), skip drops the row, error stops"""
    num_proc: int | None = None
    """processes that tokenise the data (`datasets` map; the tokens are cached on disk, so a rerun with the same data,
    tokenizer and settings reads them back); default: 0 (a plain loop, no cache) under 1000 rows, else min(8, CPUs)"""
    data_cache_dir: str | None = None
    """where tokenised data is cached (default: <HF_DATASETS_CACHE>/plainalign_tokens); safe to delete"""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """attention kernel of the HF models"""
    mixed_precision: Literal["auto", "bf16", "off"] = "auto"
    """bf16 compute, fp32 master weights: `auto` = bf16 on CUDA, fp32 on CPU; `bf16` also on CPU; `off` = fp32"""
    chat_template: str | None = None
    """`chatml`, `llama3`, `plain` (User: / Assistant: turns, EOS after each reply) or a Jinja file; overrides the
    model's own template (base models have none)"""

    lora: tyro.conf.OmitArgPrefixes[LoraArgs] = field(default_factory=LoraArgs)
    """LoRA adapters instead of full fine-tuning: --lora-r > 0 (common/lora.py, docs/lora.md)"""

    # --- optimiser ---
    learning_rate: float = 1e-4
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)"""
    lr_schedule: Schedule = "constant"
    """decay over the updates after warmup"""
    warmup_steps: int = 0
    """linear warmup, in optimizer steps"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 = off)"""

    # --- batch sizes (local_ = per rank; global = x ranks) ---
    total_episodes: int = 4096
    """prompts to sample for in total (each --num-rollouts times)"""
    local_rollout_batch_size: int = 16
    """prompts per rank per update"""
    num_rollouts: int = 8
    """N: samples per prompt, ranked by reward"""
    top_n: int = 1
    """samples kept per prompt (the best ones)"""
    min_reward: float | None = None
    """keep only samples whose total reward is at least this (None = keep the top-n whatever their reward)"""
    keep_truncated: bool = False
    """also keep replies that never emitted EOS (cut at --response-length)"""
    epochs_per_update: int = 1
    """passes over each update's kept samples"""
    num_minibatches: int = 1
    """minibatches (optimizer steps) per pass over the kept samples"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch"""

    # --- generation ---
    response_length: int = 64
    """maximum new tokens per response"""
    temperature: float = 0.7
    """sampling temperature"""
    top_k: int = 0
    """sample from the k most likely tokens (0 = off)"""
    top_p: float = 1.0
    """nucleus sampling mass (1.0 = off)"""

    # --- evaluation and logging ---
    log_every: int = 1
    """updates between metric logs"""
    sample_every: int = 10
    """updates between sample tables (prompt, kept response, reward)"""
    eval_every: int = 0
    """updates between demo-task evaluations (0 = only at the start and end)"""
    save_every: int = 20
    """updates between checkpoints (0 = only at the end)"""
    demo_eval_prompts: int = 1024
    """held-out demo-task prompts graded at the start and end (0 = off; only with --data demo)"""
    skip_nonfinite: bool = False
    """skip minibatches with a NaN/Inf loss (counted) instead of stopping"""
    activation_checkpointing: bool = False
    """recompute activations in backward (less memory, more compute)"""


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (tested one by one in tests/test_rejection_sampling.py)
# ---------------------------------------------------------------------------------------------------------------


def select_top_n(
    scores: torch.Tensor, top_n: int, min_reward: float | None = None, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """The kept samples (P, top_n) of P prompts' N rewards (P, N): each row's top-n sample indices, best first,
    and -1 for an empty slot (fewer than n eligible samples reach min_reward).

    Ties go to the earlier sample (a stable sort), so the choice never depends on the sort's implementation.
    """
    if top_n < 1 or top_n > scores.shape[1]:
        raise ValueError(f"--top-n must be between 1 and --num-rollouts ({scores.shape[1]}), got {top_n}")
    ok = torch.ones_like(scores, dtype=torch.bool) if eligible is None else eligible.bool()
    if min_reward is not None:
        ok = ok & (scores >= min_reward)
    ranked = torch.where(ok, scores, torch.full_like(scores, -torch.inf))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :top_n]  # (P, n)
    return torch.where(ok.gather(1, order), order, torch.full_like(order, -1))


def nll_sum(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Summed NLL of the labelled (reply) tokens of a batch of {"input_ids", "labels"} rows: sft.py's loss."""
    logits = model(**data.model_inputs(batch, model, device)).logits  # (B, L, V)
    labels = batch["labels"][:, 1:].to(device)  # position t predicts token t+1
    return -selective_logprob(logits[:, :-1], labels).sum()


def sft_example(prompt_ids: list[int], reply_ids: list[int]) -> dict:
    """A kept sample as an SFT row: the prompt carries no label, the reply (through its EOS) does."""
    return {
        "input_ids": list(prompt_ids) + list(reply_ids),
        "labels": [data.IGNORE_INDEX] * len(prompt_ids) + list(reply_ids),
    }


if __name__ == "__main__":
    args = tyro.cli(Args)
    data.exit_on_data_error()  # a bad row, field or split: one line naming it, no traceback
    dist = init_distributed(args.mixed_precision)
    seed_everything(args.seed)
    stop = StopSignal()
    generator = sampling_generator(args.seed, dist)

    # batch sizes: a rollout batch is prompts; the kept set has prompts x top-n slots per rank
    N, P = args.num_rollouts, args.local_rollout_batch_size
    if not 1 <= args.top_n <= N:
        raise ValueError(f"--top-n must be between 1 and --num-rollouts ({N}), got {args.top_n}")
    slots = P * args.top_n
    local_mini_batch_size = exact_div(slots, args.num_minibatches, "prompts x --top-n per rank / --num-minibatches")
    local_micro_batch_size = exact_div(
        local_mini_batch_size, args.gradient_accumulation_steps, "local mini batch / --gradient-accumulation-steps"
    )
    rollout_batch_size = P * dist.world_size
    num_updates = max(1, args.total_episodes // rollout_batch_size)
    optimizer_steps = num_updates * args.epochs_per_update * args.num_minibatches

    # 1. the policy (the only model trained or sampled from)
    tokenizer = load_tokenizer(args.model_path, padding_side="left", chat_template=args.chat_template)
    pad_id, eos_ids = tokenizer.pad_token_id, end_of_turn_ids(tokenizer, args.model_path)
    vocab = len(tokenizer)
    policy = load_causal_lm(
        args.model_path, dist.device, attn_implementation=args.attn_implementation, vocab_size=vocab
    )
    policy = lora.apply_lora(policy, args.lora)  # --lora-r > 0: only adapters are trained
    policy = wrap_model(policy, dist, activation_checkpointing=args.activation_checkpointing)

    # 2. rewards: functions and/or a reward model, with weights (common.rewards: as grpo.py scores)
    sources = rewards.RewardSources(args.reward_fn, args.reward_model_path, args.reward_weights, args.data,
                                    args.normalize_reward, dist, pad_id, vocab, args.attn_implementation)  # fmt: skip

    # 3. prompts (with their other columns, for the reward functions): errors name file, row and field
    data_path = data.resolve_data_path(args.data, "prompts", dist)
    rows = data.load_rows(data_path, args.split)
    parsed = data.parse_rows(rows, data.parse_prompt_row, rows.source, args.skip_bad_rows)
    prompts = data.tokenize_rows(
        parsed.records,
        lambda r, c: data.tokenize_prompt_row(tokenizer, r, args.max_prompt_len, c, args.prompt_truncation),
        parsed.source,
        args.skip_bad_rows,
        args.prompt_truncation,
        args.num_proc,
        args.data_cache_dir,
    )

    # 4. optimiser, schedule, resume
    optimizer = make_optimizer(policy, args.learning_rate, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.lr_schedule, args.warmup_steps, optimizer_steps)
    start_update, skipped, empty_steps, initial, initial_scores = 0, 0, 0, {}, []
    if args.resume:
        state = checkpoint.load_trainer_state(args.output_dir, dist, {"policy": policy}, {"policy": optimizer},
                                              {"sampling": generator})  # fmt: skip
        scheduler.load_state_dict(state["scheduler"])
        start_update, skipped, empty_steps = state["step"], state["skipped_minibatches"], state["empty_minibatches"]
        initial, initial_scores = state["initial"], state["initial_scores"]
    tracker = make_tracker(
        dist, args.output_dir, args, args.track, args.wandb_project, start_update if args.resume else -1
    )
    tracker.print(f"resolved args: {args}")
    tracker.print(
        f"world_size={dist.world_size} rollout_batch_size={rollout_batch_size} prompts x {N} samples, top {args.top_n} "
        f"kept (min_reward={args.min_reward}) local_mini_batch_size={local_mini_batch_size} "
        f"local_micro_batch_size={local_micro_batch_size} num_updates={num_updates} prompts={len(prompts.records)} "
        f"skipped_rows={parsed.skipped + prompts.skipped} {sources.describe()} start_update={start_update}"
    )
    for line in data.skip_report(parsed, prompts):
        tracker.print(line)

    def save(update: int) -> None:
        extra = {"step": update, "scheduler": scheduler.state_dict(), "skipped_minibatches": skipped,
                 "empty_minibatches": empty_steps, "initial": initial, "initial_scores": initial_scores}  # fmt: skip
        checkpoint.save_trainer_state(args.output_dir, dist, {"policy": policy}, {"policy": optimizer}, extra,
                                      {"sampling": generator})  # fmt: skip
        checkpoint.export_pretrained(policy, tokenizer, args.output_dir, dist)

    demo_eval_on = args.demo_eval_prompts > 0 and args.data == "demo"
    if demo_eval_on and not args.resume:
        initial = demo_eval(policy, tokenizer, dist, args.demo_eval_prompts, args.response_length, per_prompt=True)
        initial.pop("samples")
        initial_scores = initial.pop("scores")
        tracker.print(f"start: eval/score={initial['eval/score']:.3f} eval/accuracy={initial['eval/accuracy']:.3f}")

    bar = tracker.progress(num_updates, start_update, "rejection sampling")
    for update in range(start_update, num_updates):
        # 1. rollout: N samples per prompt, keyed by (seed, update, position in the global batch, sample)
        t_rollout = clock(dist)
        idx = dist.shard(data.step_indices(len(prompts.records), rollout_batch_size, update, args.seed))
        records = [prompts.records[i] for i in idx]
        query_list = [r["ids"] for r in records for _ in range(N)]  # a prompt's samples are consecutive rows
        keys = group_sample_keys(args.seed, update, 0, dist.rank * len(idx), len(idx), N)
        try:
            response_list = generate(policy, query_list, pad_id=pad_id, eos_id=eos_ids, max_new_tokens=args.response_length,
                                     dist=dist, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     sample_keys=keys)  # fmt: skip
        except FloatingPointError as e:  # a NaN policy cannot even sample: stop, naming the update
            raise NonFiniteLoss(f"non-finite logits at update {update} (rollout): {e}") from e
        responses, mask = truncate_after_eos(data.pad(response_list, pad_id), eos_ids, pad_id)  # (B, T)
        ended = is_eos(responses, eos_ids).any(-1)  # (B,) emitted EOS
        lengths = mask.sum(-1)
        t_rollout = clock(dist) - t_rollout

        # 2. rewards of every sample
        completions = tokenizer.batch_decode(response_list, skip_special_tokens=True)
        per_source, t_score = sources.score(records, N, completions, query_list, response_list, eos_ids, update,
                                            local_micro_batch_size, dist)  # fmt: skip
        scores = sources.combine(per_source)  # (B,)

        # 3. selection: the top-n of each prompt; empty slots (-1) carry no loss
        eligible = None if args.keep_truncated else ended.view(P, N)
        chosen = select_top_n(scores.view(P, N), args.top_n, args.min_reward, eligible)  # (P, n)
        live = (chosen >= 0).view(-1)  # (slots,)
        rows = (torch.arange(P, device=chosen.device)[:, None] * N + chosen.clamp(min=0)).view(-1).tolist()
        examples = [sft_example(query_list[i], responses[i, : lengths[i]].tolist()) for i in rows]
        reply_tokens = torch.tensor([len(e["input_ids"]) - len(query_list[i]) for e, i in zip(examples, rows)],
                                    device=dist.device) * live  # fmt: skip

        # 4. fine-tune on the kept samples: the SFT loss over the global minibatch's reply tokens
        t_train = clock(dist)
        stats = torch.zeros(2, dtype=torch.float64, device=dist.device)  # loss sum over stepped minibatches, steps
        for _ in range(args.epochs_per_update):
            order = torch.randperm(slots, generator=generator, device=dist.device).tolist()
            for mb_start in range(0, slots, local_mini_batch_size):
                mini = order[mb_start : mb_start + local_mini_batch_size]
                # FSDP averages gradients over ranks: the global token count is divided by the world size
                tokens = dist.sum(reply_tokens[mini].sum().item())
                if tokens == 0:  # nothing kept in this minibatch on any rank: no step (Adam would still move)
                    empty_steps += 1
                    continue
                loss_sum = torch.zeros((), device=dist.device)
                micro = data.micro_batches(mini, local_micro_batch_size)
                for k, mi in enumerate(micro):
                    if dist.enabled:
                        policy.set_requires_gradient_sync(k == len(micro) - 1)
                    batch = data.collate([examples[j] for j in mi], pad_id)
                    weight = live[mi].to(torch.float32)  # empty slots: a row that is run but weighs nothing
                    batch["labels"] = torch.where(weight.cpu()[:, None] > 0, batch["labels"], data.IGNORE_INDEX)
                    with autocast(dist):
                        loss = nll_sum(policy, batch, dist.device) * dist.world_size / tokens
                    loss.backward()
                    loss_sum += loss.detach()
                if nonfinite_step(loss_sum, update, dist, args.skip_nonfinite):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                optimizer_step(policy, optimizer, scheduler, args.max_grad_norm)
                stats[0] += dist.sum(loss_sum.item()) / dist.world_size  # the global minibatch's loss
                stats[1] += 1
        t_train = clock(dist) - t_train
        bar.update(1)

        # 5. log (metrics reduced over ranks once per update)
        if (update + 1) % args.log_every == 0 or update + 1 == num_updates:
            kept_scores = scores[rows] * live
            sums = torch.stack([scores.sum(), kept_scores.sum(), live.sum(), (chosen >= 0).any(-1).sum(),
                                lengths.sum(), reply_tokens.sum(), (~ended).sum()]).double()  # fmt: skip
            dist.all_reduce(sums)
            n = rollout_batch_size * N
            kept = sums[2].item()
            metrics = {
                "reward/mean": sums[0].item() / n,
                "reward/kept_mean": sums[1].item() / max(kept, 1),
                **sources.means(per_source, dist),
                "rs/kept_frac": kept / (rollout_batch_size * args.top_n),
                "rs/prompts_with_kept": sums[3].item() / rollout_batch_size,
                "rs/loss": stats[0].item() / max(stats[1].item(), 1),
                "rs/response_length": sums[4].item() / n,
                "rs/kept_response_length": sums[5].item() / max(kept, 1),
                "rs/truncated_frac": sums[6].item() / n,
                "rs/empty_minibatches": empty_steps,
                "rs/skipped_minibatches": skipped,
                "rs/lr": scheduler.get_last_lr()[0],
                "perf/rollout_tokens_per_sec": sums[4].item() / max(t_rollout, 1e-9),
                "perf/tokens_per_sec": sums[5].item() * args.epochs_per_update / max(t_train, 1e-9),
                "perf/time_rollout": t_rollout,
                "perf/time_score": t_score,
                "perf/time_train": t_train,
                "episodes": (update + 1) * rollout_batch_size,
            }
            if dist.device.type == "cuda":
                metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            if args.eval_every and demo_eval_on and (update + 1) % args.eval_every == 0:
                result = demo_eval(policy, tokenizer, dist, args.demo_eval_prompts, args.response_length)
                metrics |= {k: v for k, v in result.items() if k != "samples"}
            tracker.log(metrics, update + 1, echo=False)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kept=f"{metrics['reward/kept_mean']:.3f}")
        if args.sample_every and (update + 1) % args.sample_every == 0:
            table = [[tokenizer.decode(query_list[i], skip_special_tokens=True), completions[i], round(scores[i].item(), 3)]
                     for i, ok in zip(rows[: 4 * args.top_n], live[: 4 * args.top_n].tolist()) if ok]  # fmt: skip
            tracker.table("kept samples", ["prompt", "response", "reward"], table, update + 1)
        if args.save_every and (update + 1) % args.save_every == 0 and update + 1 < num_updates:
            save(update + 1)
        stop.exit_if_requested(dist, lambda: save(update + 1), f"at update {update + 1}", args.output_dir, tracker)
    tracker.close_progress()

    # 6. final evaluation and export
    save(num_updates)
    final = {"rs/skipped_minibatches": skipped, "rs/empty_minibatches": empty_steps}
    if demo_eval_on:
        result = demo_eval(policy, tokenizer, dist, args.demo_eval_prompts, args.response_length,
                           per_prompt=bool(initial_scores))  # fmt: skip
        tracker.table("eval samples", ["prompt", "response", "score"], result.pop("samples"), num_updates)
        if initial_scores:  # the gain over the start policy on the same prompts, and its standard error
            gain, gain_se = paired_difference(result.pop("scores"), initial_scores)
            result |= {"eval/score_gain": gain, "eval/score_gain_se": gain_se}
        final |= result | {f"initial/{k}": v for k, v in initial.items()}
    tracker.log(final, num_updates)
    tracker.write_eval(final)
    if initial:
        tracker.print(
            f"ground truth ({args.demo_eval_prompts} held-out demo prompts): score {initial['eval/score']:.3f} -> "
            f"{final['eval/score']:.3f} ({final.get('eval/score_gain', float('nan')):+.3f} ± "
            f"{2 * final.get('eval/score_gain_se', float('nan')):.3f}, 2 s.e. paired), accuracy "
            f"{initial['eval/accuracy']:.3f} -> {final['eval/accuracy']:.3f}"
        )
    tracker.print(f"saved {args.output_dir}")
    tracker.finish()
    cleanup(dist)
