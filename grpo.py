"""Critic-free online RL: GRPO and its family (RLOO / NeMo-Aligner's REINFORCE, REINFORCE++, Dr. GRPO, DAPO, GSPO).

No value model: the baseline of a sampled response is computed from the other responses to the same prompt (a
group of --num-generations G samples) or from the batch. Rewards come from programs (`--reward-fn module:function`,
RL with verifiable rewards), from a reward model trained by reward_model.py, or from a weighted sum of both. One
update:
    1. rollout     G samples for each of the update's prompts (left-padded prompts, KV cache, temperature/top-k/top-p,
                   cut after EOS), randomness keyed by (seed, update, prompt position, sample): the same samples on
                   any number of processes; a group never straddles ranks. --dynamic-sampling (DAPO) drops groups
                   whose rewards are all equal and samples more prompts until the batch is full (capped)
    2. rewards     reward functions on the decoded text and/or the reward model on prompt + reply through EOS
                   (common.rewards, the tokens reward_model.py trained on), weighted and summed; DAPO's soft
                   overlong punishment; the reference's log-probs when --kl-coef > 0 (else no reference is loaded)
    3. advantages  `grpo`  (r - mean_group) / std_group                         (Shao et al. 2024, DeepSeekMath)
                   `rloo`  r - mean of the other G-1 rewards                      (Ahmadian et al. 2024; with
                           --kl-in reward this is NeMo-Aligner's REINFORCE)
                   `reinforce_pp`  per-token rewards (score at the last token, -beta KL at every token), returns
                           summed to the end, whitened over the global batch     (Hu 2025, REINFORCE++)
                   `reinforce_pp_baseline`  the same after subtracting the group mean from the score
                   --scale-rewards group|batch|none divides grpo/rloo advantages by the group's or the global batch's
                   std, or not at all (`none` with --loss-agg constant is Dr. GRPO, Liu et al. 2025)
    4. policy      --ppo-epochs passes over --num-minibatches minibatches of the clipped surrogate
                   max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) (DAPO's clip-higher when clip_high > clip_low),
                   optional dual clip for A < 0 (Ye et al. 2020), token ratios or GSPO's sequence ratio
                   exp(mean_t log r_t) (Zheng et al. 2025); the KL to the reference (k1/k2/k3) in the loss or in the
                   reward; the loss aggregated by --loss-agg over the global minibatch, so micro-batching, gradient
                   accumulation and the number of ranks do not change it. With one epoch and one minibatch the
                   old log-probs are the current ones (detached): no extra forward pass
    5. log         reward mean/std overall and per function, zero-spread groups, clip fractions low/high, KL,
                   entropy, response length, truncated fraction, tokens/s; ground truth on the demo task
Departures: rewards of a reply with no EOS can be excluded from the loss (--mask-truncated, DAPO) rather than
penalised; the KL in the loss is always taken against the reference's log-probs of the sampled tokens (k1/k2/k3 of
kernels.kl_estimate), as in the GRPO paper (k3).

Run (no flags: policy out/sft, demo prompts, the demo task's grader as the reward, < 10 minutes on 2 CPU cores):
    python grpo.py
    python grpo.py --reward-model-path out/reward_model                     # a learned reward instead
    python grpo.py --advantage rloo --kl-in reward --kl-coef 0.05           # NeMo-Aligner's REINFORCE
    python grpo.py --scale-rewards none --loss-agg constant                 # Dr. GRPO
    python grpo.py --clip-high 0.28 --dynamic-sampling --overlong-buffer 16 --mask-truncated   # DAPO
    python grpo.py --importance-level sequence --clip-low 3e-4 --clip-high 4e-4 --loss-agg seq_mean_token_mean  # GSPO
    torchrun --nproc_per_node 8 grpo.py --model-path my_sft --data math.jsonl --reward-fn my_rewards:exact_match
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
    response_logprobs,
    truncate_after_eos,
)
from common.lora import LoraArgs
from common.models import end_of_turn_ids, load_causal_lm, load_tokenizer
from common.rewards import combine_rewards
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
from kernels import kl_estimate

Advantage = Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"]


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "grpo"
    """name of the run (wandb run name)"""
    seed: int = 1
    """seed for data order and sampling"""
    output_dir: str = "out/grpo"
    """where the policy (save_pretrained), trainer_state/, metrics.jsonl and eval.json go"""
    resume: bool = False
    """continue from output_dir/trainer_state (policy, optimiser, schedule, RNG, data position)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "plainalign"
    """wandb project name"""

    # --- models, rewards and data ---
    model_path: str = "out/sft"
    """policy to start from; also the frozen reference (loaded only when --kl-coef > 0)"""
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
    learning_rate: float = 5e-5
    """peak learning rate (AdamW); on the demo 5e-5 beat 1e-4 and 2e-4 (which lowered the ground truth below SFT;
    bench/results/grpo_experiments.md)"""
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
    """prompts to train on in total (each sampled --num-generations times); on the demo the ground-truth accuracy
    was 0.590 after 2048, 0.593 after 3072 and 0.621 after 4096 (bench/results/grpo_experiments.md)"""
    local_rollout_batch_size: int = 16
    """prompts per rank per update"""
    num_generations: int = 8
    """G: samples per prompt (a group); its rewards give each sample's baseline"""
    num_minibatches: int = 2
    """minibatches (optimizer steps) per epoch over the update's samples"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch"""
    ppo_epochs: int = 2
    """passes over each update's samples (1 pass and 1 minibatch: no old-log-prob forward is needed; on the demo
    2 epochs x 2 minibatches did better per second than 1 x 1)"""

    # --- generation ---
    response_length: int = 64
    """maximum new tokens per response"""
    temperature: float = 0.7
    """sampling temperature (log-probs are computed at the same temperature); on the demo 1.0 made the tiny model's
    samples so unlike its greedy answers that their gains did not carry over (score 0.428 -> 0.414)"""
    top_k: int = 0
    """sample from the k most likely tokens (0 = off; not corrected for in the log-probs)"""
    top_p: float = 1.0
    """nucleus sampling mass (1.0 = off; not corrected for in the log-probs)"""

    # --- method ---
    advantage: Advantage = "grpo"
    """advantage estimator: grpo (group-normalised), rloo (leave-one-out), reinforce_pp, reinforce_pp_baseline"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo/rloo: divide advantages by the std of the group, of the global batch, or not at all (Dr. GRPO)"""
    loss_agg: LossAgg = "token_mean"
    """token_mean: over the global minibatch's tokens; seq_mean_token_mean: per-sequence token mean, then mean over
    sequences; seq_mean_token_sum: per-sequence sum, mean over sequences; constant: sum / (sequences x
    --response-length) (Dr. GRPO)"""
    clip_low: float = 0.2
    """ratio clip below: 1 - clip_low"""
    clip_high: float = 0.2
    """ratio clip above: 1 + clip_high (DAPO's clip-higher: 0.28)"""
    dual_clip: float | None = None
    """dual clip constant c > 1 for negative advantages (loss at most -A c; None = off)"""
    importance_level: Literal["token", "sequence"] = "token"
    """token ratios (GRPO/PPO) or the sequence ratio exp(mean_t log r_t) on every token (GSPO)"""
    kl_coef: float = 0.0
    """beta of the KL to the reference (0 = no reference model is loaded at all)"""
    kl_in: Literal["loss", "reward"] = "loss"
    """loss: beta x KL estimate added to the loss (GRPO); reward: -beta x KL subtracted from the rewards (the
    sequence sum for grpo/rloo, per token for reinforce_pp)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """per-token KL estimator (kernels.kl_estimate); k3 is the GRPO paper's"""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal (no signal) and sample more prompts to fill the batch"""
    max_extra_rollouts: int = 4
    """dynamic sampling: extra rollout rounds per update at most; groups still missing are masked out (counted)"""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: over the last this-many tokens before --response-length the reward falls
    linearly by up to --overlong-penalty (0 = off)"""
    overlong_penalty: float = 1.0
    """soft overlong punishment at the length limit"""
    mask_truncated: bool = False
    """DAPO: no loss on responses that never emitted EOS"""

    # --- evaluation and logging ---
    log_every: int = 1
    """updates between metric logs"""
    sample_every: int = 10
    """updates between sample tables (prompt, response, reward)"""
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
# Pure helpers (tested one by one in tests/test_grpo.py)
# ---------------------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, dist=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); with shift_mean=False the mean is kept.

    With `dist`, the statistics are those of every rank's entries together, so the result does not depend on
    how the batch is split across processes.
    """
    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if dist is not None:
        dist.all_reduce(sums)
    total, total_sq, n = sums.unbind()
    mean = total / n.clamp(min=1)
    var = (total_sq / n.clamp(min=1) - mean**2).clamp(min=0) * n / (n - 1).clamp(min=1)
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + 1e-8)
    if not shift_mean:
        out = out + mean.to(x.dtype)
    return out * mask


def group_advantages(scores: torch.Tensor, estimator: str, scale: str, dist=None, eps: float = 1e-4) -> torch.Tensor:
    """Sequence-level advantages (P, G) of grpo/rloo from the rewards (P, G) of P groups of G samples.

    grpo: r - mean of the group; rloo: r - mean of the other G-1 = G/(G-1) (r - mean). Then divided by the std
    (unbiased) of the group (`group`), of all rewards of the global batch (`batch`), or not at all (`none`). A group
    whose rewards are all equal gets advantage 0 (its std is 0: the eps keeps 0 / 0 away).
    """
    P, G = scores.shape
    if G < 2:
        raise ValueError("group advantages need --num-generations >= 2")
    mean = scores.mean(-1, keepdim=True)
    adv = scores - mean
    if estimator == "rloo":
        adv = adv * G / (G - 1)
    elif estimator != "grpo":
        raise ValueError(f"group_advantages: unknown estimator {estimator!r}")
    if scale == "group":
        adv = adv / (scores.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        ones = torch.ones_like(scores)
        sums = torch.stack([scores.sum(), (scores * scores).sum(), ones.sum()]).double()
        if dist is not None:
            dist.all_reduce(sums)
        total, total_sq, n = sums.unbind()
        var = (total_sq / n - (total / n) ** 2).clamp(min=0) * n / (n - 1).clamp(min=1)
        adv = adv / (var.sqrt().to(adv.dtype) + eps)
    elif scale != "none":
        raise ValueError(f"unknown --scale-rewards {scale!r}")
    return adv


def reinforce_pp_advantages(
    scores: torch.Tensor, token_kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, group_size: int, baseline: bool,
    dist=None,
) -> torch.Tensor:  # fmt: skip
    """REINFORCE++ token advantages (B, T): per-token rewards -kl_coef * KL_t with the score added at the last
    token, returns summed to the end of the response (gamma = 1), whitened over the global batch's tokens.

    With `baseline` (REINFORCE++-baseline), the group mean is subtracted from each score first (samples of a group
    are consecutive rows: B = P x group_size).
    """
    if baseline:
        grouped = scores.view(-1, group_size)
        scores = (grouped - grouped.mean(-1, keepdim=True)).view(-1)
    token_rewards = -kl_coef * token_kl * mask  # (B, T)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    token_rewards[torch.arange(len(scores), device=scores.device), last] += scores
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1) * mask  # sum_{s >= t} r_s
    return whiten(returns, mask, dist=dist)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (B,): 0 up to max_len - buffer tokens, then falling linearly to -penalty at
    max_len (Yu et al. 2025, eq. 13)."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    importance_level: str = "token",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate losses (B, T) and the clipped-token indicators (low, high) (B, T).

    loss_t = max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high)); with dual_clip c and A < 0 the loss is also
    capped at -A c. Token level: r_t = exp(log pi_t - log pi_old_t). Sequence level (GSPO): every token carries the
    sequence ratio s = exp(mean_t log r_t), written sg(s) exp(log pi_t - sg(log pi_t)) so that its value is s and its
    gradient is s grad log pi_t (Zheng et al. 2025, eq. 10/11). `advantages` is (B, T) or (B,).
    Clipped low: A < 0 and r < 1 - clip_low; clipped high: A > 0 and r > 1 + clip_high (where clipping removes the
    gradient).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(new_logprobs)
    log_ratio = new_logprobs - old_logprobs
    if importance_level == "sequence":
        seq = masked_mean(log_ratio, mask, dim=-1)  # (B,)
        log_ratio = new_logprobs - new_logprobs.detach() + seq.detach()[:, None]
    elif importance_level != "token":
        raise ValueError(f"unknown --importance-level {importance_level!r}")
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.max(losses, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -advantages * dual_clip), loss)
    ratio = ratio.detach()
    clipped_low = (advantages < 0) & (ratio < 1 - clip_low) & (mask > 0)
    clipped_high = (advantages > 0) & (ratio > 1 + clip_high) & (mask > 0)
    return loss * mask, clipped_low, clipped_high


def aggregate(token_losses: torch.Tensor, mask: torch.Tensor, loss_agg: str, norm: dict) -> torch.Tensor:
    """The loss of a micro-batch as its share of the minibatch loss, from per-token losses (B, T).

    `norm` holds the global minibatch's counts (over all micro-batches and ranks): tokens, sequences, and the
    response length limit, so summing the micro-batch results over micro-batches and ranks gives exactly the
    minibatch loss (FSDP's gradient averaging over ranks is undone by the caller's world-size factor).
    """
    if loss_agg == "token_mean":
        return token_losses.sum() / norm["tokens"]
    if loss_agg == "seq_mean_token_mean":
        return (token_losses.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / norm["sequences"]
    if loss_agg == "seq_mean_token_sum":
        return token_losses.sum() / norm["sequences"]
    if loss_agg == "constant":
        return token_losses.sum() / (norm["sequences"] * norm["max_len"])
    raise ValueError(f"unknown --loss-agg {loss_agg!r}")


@torch.no_grad()
def no_grad_logprobs(model, queries, responses, pad_id: int, temperature: float, micro_batch_size: int, dist):
    """fp32 log-probs (B, T) of sampled responses, micro-batch by micro-batch, without a graph (old / reference)."""
    with autocast(dist):
        return torch.cat([
            response_logprobs(model, queries[s : s + micro_batch_size], responses[s : s + micro_batch_size], pad_id,
                              temperature).float()
            for s in range(0, len(queries), micro_batch_size)
        ])  # fmt: skip


def evaluate(policy, tokenizer, dist, args: Args, per_prompt: bool = False) -> dict:
    """Ground truth on held-out demo prompts (greedy answers graded by the demo task's scorer)."""
    return demo_eval(policy, tokenizer, dist, args.demo_eval_prompts, args.response_length, per_prompt=per_prompt)


if __name__ == "__main__":
    args = tyro.cli(Args)
    data.exit_on_data_error()  # a bad row, field or split: one line naming it, no traceback
    dist = init_distributed(args.mixed_precision)
    seed_everything(args.seed)
    stop = StopSignal()
    generator = sampling_generator(args.seed, dist)

    # batch sizes, in the vocabulary of STYLE.md: a rollout batch is prompts; its samples are prompts x G
    G = args.num_generations
    if G < 2:
        raise ValueError("--num-generations must be at least 2: the baseline comes from the other samples of a group")
    local_samples = args.local_rollout_batch_size * G
    local_mini_batch_size = exact_div(local_samples, args.num_minibatches, "samples per rank / --num-minibatches")
    local_micro_batch_size = exact_div(
        local_mini_batch_size, args.gradient_accumulation_steps, "local mini batch / --gradient-accumulation-steps"
    )
    rollout_batch_size = args.local_rollout_batch_size * dist.world_size
    num_updates = max(1, args.total_episodes // rollout_batch_size)
    optimizer_steps = num_updates * args.ppo_epochs * args.num_minibatches
    reuse_logprobs = args.ppo_epochs == 1 and args.num_minibatches == 1  # old log-probs = current ones, detached
    for name, value in (("--clip-low", args.clip_low), ("--clip-high", args.clip_high)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if args.dual_clip is not None and args.dual_clip <= 1:
        raise ValueError(f"--dual-clip must be > 1, got {args.dual_clip}")
    if args.overlong_buffer >= args.response_length:
        raise ValueError(f"--overlong-buffer {args.overlong_buffer} must be below --response-length")

    # 1. models: the policy (trained); the reference only with a KL term
    tokenizer = load_tokenizer(args.model_path, padding_side="left", chat_template=args.chat_template)
    pad_id, eos_ids = tokenizer.pad_token_id, end_of_turn_ids(tokenizer, args.model_path)  # Llama-3 Instruct: two
    vocab = len(tokenizer)  # load_tokenizer may have added a pad or template tokens: the embeddings grow to match
    policy = load_causal_lm(
        args.model_path, dist.device, attn_implementation=args.attn_implementation, vocab_size=vocab
    )
    policy = lora.apply_lora(policy, args.lora)  # --lora-r > 0: only adapters are trained
    policy = wrap_model(policy, dist, activation_checkpointing=args.activation_checkpointing)
    ref_policy = None
    if args.kl_coef > 0 and lora.enabled(args.lora):  # the starting model = the policy with its adapters off
        ref_policy = lora.AdaptersOff(policy)
    elif args.kl_coef > 0:
        ref_policy = wrap_model(
            load_causal_lm(args.model_path, dist.device, attn_implementation=args.attn_implementation, vocab_size=vocab),
            dist, trainable=False,
        )  # fmt: skip

    # 2. rewards: functions and/or a reward model, with weights (common.rewards: as every online script scores)
    sources = rewards.RewardSources(args.reward_fn, args.reward_model_path, args.reward_weights, args.data,
                                    args.normalize_reward, dist, pad_id, vocab, args.attn_implementation)  # fmt: skip
    weights = sources.weights

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
    start_update, skipped, initial, initial_scores = 0, 0, {}, []
    if args.resume:
        state = checkpoint.load_trainer_state(args.output_dir, dist, {"policy": policy}, {"policy": optimizer},
                                              {"sampling": generator})  # fmt: skip
        scheduler.load_state_dict(state["scheduler"])
        start_update, skipped, initial = state["step"], state["skipped_minibatches"], state["initial"]
        initial_scores = state.get("initial_scores", [])
    tracker = make_tracker(
        dist, args.output_dir, args, args.track, args.wandb_project, start_update if args.resume else -1
    )
    tracker.print(f"resolved args: {args}")
    tracker.print(
        f"world_size={dist.world_size} rollout_batch_size={rollout_batch_size} prompts x {G} samples "
        f"local_mini_batch_size={local_mini_batch_size} local_micro_batch_size={local_micro_batch_size} "
        f"num_updates={num_updates} prompts={len(prompts.records)} skipped_rows={parsed.skipped + prompts.skipped} "
        f"{sources.describe()} reference={'none (kl_coef 0)' if ref_policy is None else 'policy, adapters off' if lora.enabled(args.lora) else 'loaded'} "
        f"old_logprobs={'reused' if reuse_logprobs else 'forward'} "
        f"start_update={start_update}"
    )
    for line in data.skip_report(parsed, prompts):
        tracker.print(line)
    if isinstance(ref_policy, lora.AdaptersOff):
        tracker.print(f"reference model: {lora.REFERENCE_NOTE}")

    def save(update: int) -> None:
        extra = {"step": update, "scheduler": scheduler.state_dict(), "skipped_minibatches": skipped,
                 "initial": initial, "initial_scores": initial_scores}  # fmt: skip
        checkpoint.save_trainer_state(args.output_dir, dist, {"policy": policy}, {"policy": optimizer}, extra,
                                      {"sampling": generator})  # fmt: skip
        checkpoint.export_pretrained(policy, tokenizer, args.output_dir, dist)

    def rollout_round(update: int, round_: int) -> dict:
        """G samples of this rank's share of a round's prompts, decoded, and every reward source's value."""
        seed = args.seed if round_ == 0 else args.seed + 7919 * round_  # extra rounds: other prompts, same stream
        idx = dist.shard(data.step_indices(len(prompts.records), rollout_batch_size, update, seed))
        records = [prompts.records[i] for i in idx]
        query_list = [r["ids"] for r in records for _ in range(G)]  # a group's samples are consecutive rows
        # randomness keyed by (seed, update, round, position in the global batch, sample): any number of ranks
        keys = group_sample_keys(args.seed, update, round_, dist.rank * len(idx), len(idx), G)
        try:
            response_list = generate(policy, query_list, pad_id=pad_id, eos_id=eos_ids, max_new_tokens=args.response_length,
                                     dist=dist, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     sample_keys=keys)  # fmt: skip
        except FloatingPointError as e:  # a NaN policy cannot even sample: stop, naming the update
            raise NonFiniteLoss(f"non-finite logits at update {update} (rollout): {e}") from e
        completions = tokenizer.batch_decode(response_list, skip_special_tokens=True)
        per_source, reward_time = sources.score(records, G, completions, query_list, response_list, eos_ids, update,
                                                local_micro_batch_size, dist)  # fmt: skip
        return {"records": records, "queries": query_list, "responses": response_list, "completions": completions,
                "per_source": per_source, "reward_time": reward_time}  # fmt: skip

    demo_eval_on = args.demo_eval_prompts > 0 and args.data == "demo"
    if demo_eval_on and not args.resume:
        initial = evaluate(policy, tokenizer, dist, args, per_prompt=True)
        initial.pop("samples")
        initial_scores = initial.pop("scores")
        tracker.print(f"start: eval/score={initial['eval/score']:.3f} eval/accuracy={initial['eval/accuracy']:.3f}")

    bar = tracker.progress(num_updates, start_update, "grpo")
    final_kl = float("nan")
    for update in range(start_update, num_updates):
        # 1. rollout: G samples per prompt; with dynamic sampling, more rounds until every group has a reward spread
        t_rollout = clock(dist)
        reward_time, extra_rounds = 0.0, 0
        batch = rollout_round(update, 0)
        reward_time += batch["reward_time"]
        groups = [list(range(p * G, (p + 1) * G)) for p in range(args.local_rollout_batch_size)]
        spread = combine_rewards(batch["per_source"], weights).view(-1, G).std(-1) > 0  # (P,)
        zero_std_frac = dist.sum((~spread).sum().item()) / rollout_batch_size
        if args.dynamic_sampling:
            kept = [k for k in range(len(groups)) if spread[k]]
            pool = [batch]
            # every rank runs the same number of rounds (generation keeps ranks in lock-step): decide on the minimum
            while dist.all_reduce(torch.tensor(len(kept), device=dist.device), "min").item() < len(groups) and (
                extra_rounds < args.max_extra_rollouts
            ):
                extra_rounds += 1
                more = rollout_round(update, extra_rounds)
                reward_time += more["reward_time"]
                more_spread = combine_rewards(more["per_source"], weights).view(-1, G).std(-1) > 0
                kept += [len(pool) * len(groups) + k for k in range(len(groups)) if more_spread[k]]
                pool.append(more)
            # this rank's batch: the first kept groups; missing ones are filled with dropped groups, masked out
            dropped = [k for k in range(len(pool) * len(groups)) if k not in set(kept)]
            chosen = (kept + dropped)[: len(groups)]
            filled = max(0, len(groups) - len(kept))

            def take(key):
                rows = []
                for k in chosen:
                    src = pool[k // len(groups)]
                    rows += [src[key][(k % len(groups)) * G + g] for g in range(G)]
                return rows

            per_source = torch.cat(
                [
                    pool[k // len(groups)]["per_source"][(k % len(groups)) * G : (k % len(groups) + 1) * G]
                    for k in chosen
                ]
            )
            batch = {"queries": take("queries"), "responses": take("responses"), "completions": take("completions"),
                     "records": [pool[k // len(groups)]["records"][k % len(groups)] for k in chosen],
                     "per_source": per_source}  # fmt: skip
            live = torch.tensor([i < len(groups) - filled for i in range(len(groups)) for _ in range(G)],
                                device=dist.device)  # fmt: skip
        else:
            filled = 0
            live = torch.ones(local_samples, dtype=torch.bool, device=dist.device)
        # groups trained on that have no reward spread (with dynamic sampling: 0 unless the batch could not be filled)
        trained_spread = combine_rewards(batch["per_source"], weights).view(-1, G).std(-1) > 0  # (P,)
        zero_std_trained = dist.sum((live.view(-1, G)[:, 0] & ~trained_spread).sum().item()) / rollout_batch_size
        query_list, response_list = batch["queries"], batch["responses"]
        queries = data.pad(query_list, pad_id, side="left").to(dist.device)  # (B, P)
        width = int(dist.all_reduce(torch.tensor(max(map(len, response_list)), device=dist.device), "max"))
        responses = data.pad(response_list, pad_id, side="right", length=width).to(dist.device)  # (B, T)
        responses, mask = truncate_after_eos(responses, eos_ids, pad_id)
        truncated = ~is_eos(responses, eos_ids).any(-1)  # (B,) never emitted EOS
        lengths = mask.sum(-1)
        rollout_tokens = lengths.sum().item()
        t_rollout = clock(dist) - t_rollout - reward_time

        # 2. rewards (computed in the rollout rounds), overlong punishment; reference (and old) log-probs
        t_score = clock(dist)
        scores = combine_rewards(batch["per_source"], weights)  # (B,)
        scores = scores + overlong_penalty(lengths, args.response_length, args.overlong_buffer, args.overlong_penalty)
        loss_mask = mask.float() * live[:, None]
        if args.mask_truncated:
            loss_mask = loss_mask * (~truncated)[:, None]
        # the old log-probs need their own forward unless one epoch over one minibatch reuses the training forward's
        # (detached); the KL in the reward needs them before the advantages, so then they are computed here anyway
        ref_logprobs = old_logprobs = None
        if ref_policy is not None:
            ref_logprobs = no_grad_logprobs(ref_policy, queries, responses, pad_id, args.temperature,
                                            local_micro_batch_size, dist)  # fmt: skip
        if not reuse_logprobs or (ref_policy is not None and args.kl_in == "reward"):
            old_logprobs = no_grad_logprobs(policy, queries, responses, pad_id, args.temperature,
                                            local_micro_batch_size, dist)  # fmt: skip
        t_score = clock(dist) - t_score + reward_time

        # 3. advantages
        token_kl_reward = None
        if ref_policy is not None and args.kl_in == "reward":
            token_kl_reward = kl_estimate(old_logprobs, ref_logprobs, args.kl_estimator) * mask  # (B, T)
        if args.advantage in ("grpo", "rloo"):
            seq_rewards = scores if token_kl_reward is None else scores - args.kl_coef * token_kl_reward.sum(-1)
            advantages = group_advantages(seq_rewards.view(-1, G), args.advantage, args.scale_rewards, dist).view(-1)
            advantages = advantages[:, None].expand_as(loss_mask)  # (B, T)
        else:
            token_kl = token_kl_reward if token_kl_reward is not None else torch.zeros_like(loss_mask)
            advantages = reinforce_pp_advantages(scores, token_kl, loss_mask, args.kl_coef, G,
                                                 args.advantage == "reinforce_pp_baseline", dist)  # fmt: skip

        # 4. policy epochs over minibatches, with gradient accumulation
        t_train = clock(dist)
        # sums: loss (per minibatch), clipped-low tokens, clipped-high tokens, tokens, minibatches stepped
        stats = torch.zeros(5, dtype=torch.float64, device=dist.device)
        entropy_sum, kl_seq_sum = torch.zeros((), device=dist.device), torch.zeros((), device=dist.device)
        for epoch in range(args.ppo_epochs):
            order = torch.randperm(local_samples, generator=generator, device=dist.device).tolist()
            if reuse_logprobs:
                order = list(range(local_samples))
            for mb_start in range(0, local_samples, local_mini_batch_size):
                mini = order[mb_start : mb_start + local_mini_batch_size]
                micro = [mini[i : i + local_micro_batch_size] for i in range(0, len(mini), local_micro_batch_size)]
                # the minibatch's normalisers over all ranks; FSDP averages gradients over ranks, hence / world size
                counts = dist.all_reduce(torch.tensor([loss_mask[mini].sum().item(), float(len(mini))],
                                                      dtype=torch.float64, device=dist.device))  # fmt: skip
                norm = {"tokens": max(counts[0].item(), 1.0) / dist.world_size,
                        "sequences": counts[1].item() / dist.world_size, "max_len": args.response_length}  # fmt: skip
                loss_sum = torch.zeros((), device=dist.device)
                for k, mi in enumerate(micro):
                    if dist.enabled:
                        policy.set_requires_gradient_sync(k == len(micro) - 1)
                    mi = torch.tensor(mi, device=dist.device)
                    q, r, mk = queries[mi], responses[mi], loss_mask[mi]
                    with autocast(dist):
                        new_logprobs, entropy = response_logprobs(policy, q, r, pad_id, args.temperature, True)
                    old = new_logprobs.detach() if reuse_logprobs else old_logprobs[mi]
                    token_losses, low, high = policy_loss(new_logprobs, old, advantages[mi], mk, args.clip_low,
                                                          args.clip_high, args.dual_clip, args.importance_level)  # fmt: skip
                    if ref_policy is not None:
                        kl = kl_estimate(new_logprobs, ref_logprobs[mi], args.kl_estimator) * mask[mi]  # (b, T)
                        if args.kl_in == "loss":
                            token_losses = token_losses + args.kl_coef * kl * mk
                        if epoch == 0:
                            kl_seq_sum += kl.detach().sum()
                    loss = aggregate(token_losses, mk, args.loss_agg, norm)
                    loss.backward()
                    loss_sum += loss.detach()
                    if epoch == 0:
                        entropy_sum += (entropy.detach() * mask[mi]).sum()
                    stats[1:4] += torch.stack([low.sum(), high.sum(), mk.sum()]).double()
                if nonfinite_step(loss_sum, update, dist, args.skip_nonfinite):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                optimizer_step(policy, optimizer, scheduler, args.max_grad_norm)
                stats[0] += loss_sum.double()
                stats[4] += 1
        t_train = clock(dist) - t_train
        bar.update(1)

        # 5. log (metrics reduced over ranks once per update)
        if (update + 1) % args.log_every == 0 or update + 1 == num_updates:
            sums = torch.stack([scores.sum(), (scores * scores).sum(), kl_seq_sum, entropy_sum, mask.sum(),
                                truncated.float().sum(), torch.tensor(float(filled * G), device=dist.device)]).double()  # fmt: skip
            dist.all_reduce(sums)
            dist.all_reduce(stats)
            n = rollout_batch_size * G
            mean = sums[0].item() / n
            final_kl = sums[2].item() / n
            metrics = {
                "reward/mean": mean,
                "reward/std": max(sums[1].item() / n - mean**2, 0.0) ** 0.5,
                **sources.means(batch["per_source"], dist),
                "objective/entropy": sums[3].item() / max(sums[4].item(), 1),
                "grpo/loss": stats[0].item() / max(stats[4].item(), 1),
                "grpo/clipfrac_low": stats[1].item() / max(stats[3].item(), 1),
                "grpo/clipfrac_high": stats[2].item() / max(stats[3].item(), 1),
                "grpo/zero_std_groups": zero_std_frac,
                "grpo/zero_std_groups_trained": zero_std_trained,
                "grpo/response_length": sums[4].item() / n,
                "grpo/truncated_frac": sums[5].item() / n,
                "grpo/extra_rollout_rounds": extra_rounds,
                "grpo/masked_fill_samples": sums[6].item(),
                "grpo/skipped_minibatches": skipped,
                "grpo/lr": scheduler.get_last_lr()[0],
                "perf/rollout_tokens_per_sec": dist.sum(rollout_tokens) / max(t_rollout, 1e-9),
                "perf/tokens_per_sec": dist.sum(rollout_tokens) * args.ppo_epochs / max(t_train, 1e-9),
                "perf/time_rollout": t_rollout,
                "perf/time_score": t_score,
                "perf/time_train": t_train,
                "episodes": (update + 1) * rollout_batch_size,
            }  # fmt: skip
            if ref_policy is not None:  # (no reference, no KL: nothing is logged rather than a 0)
                metrics["objective/kl"] = final_kl
            if dist.device.type == "cuda":
                metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            if args.eval_every and demo_eval_on and (update + 1) % args.eval_every == 0:
                metrics |= {k: v for k, v in evaluate(policy, tokenizer, dist, args).items() if k != "samples"}
            tracker.log(metrics, update + 1, echo=False)
            bar.set_postfix(reward=f"{mean:.3f}", len=f"{metrics['grpo/response_length']:.1f}")
        if args.sample_every and (update + 1) % args.sample_every == 0:
            rows = [[tokenizer.decode(query_list[i], skip_special_tokens=True), batch["completions"][i],
                     round(scores[i].item(), 3)] for i in range(0, min(4 * G, len(query_list)), G)]  # fmt: skip
            tracker.table("samples", ["prompt", "response", "reward"], rows, update + 1)
        if args.save_every and (update + 1) % args.save_every == 0 and update + 1 < num_updates:
            save(update + 1)
        stop.exit_if_requested(dist, lambda: save(update + 1), f"at update {update + 1}", args.output_dir, tracker)
    tracker.close_progress()

    # 6. final evaluation and export
    save(num_updates)
    final = {"grpo/skipped_minibatches": skipped} | ({"objective/kl": final_kl} if ref_policy is not None else {})
    if demo_eval_on:
        result = evaluate(policy, tokenizer, dist, args, per_prompt=bool(initial_scores))
        tracker.table("eval samples", ["prompt", "response", "score"], result.pop("samples"), num_updates)
        if initial_scores:  # the gain over the start policy on the same prompts, and its standard error
            gain, gain_se = paired_difference(result.pop("scores"), initial_scores)
            result |= {"eval/score_gain": gain, "eval/score_gain_se": gain_se}
        final |= result | {f"initial/{k}": v for k, v in initial.items()}
    tracker.log(final, num_updates)
    tracker.write_eval(final)
    if initial:
        kl_note = f"KL to the reference {final_kl:.3f} nats/sequence" if ref_policy is not None else "no KL term"
        tracker.print(
            f"ground truth ({args.demo_eval_prompts} held-out demo prompts): score {initial['eval/score']:.3f} -> "
            f"{final['eval/score']:.3f} ({final.get('eval/score_gain', float('nan')):+.3f} ± "
            f"{2 * final.get('eval/score_gain_se', float('nan')):.3f}, 2 s.e. paired), accuracy "
            f"{initial['eval/accuracy']:.3f} -> {final['eval/accuracy']:.3f}; {kl_note}"
        )
    tracker.print(f"saved {args.output_dir}")
    tracker.finish()
    cleanup(dist)
