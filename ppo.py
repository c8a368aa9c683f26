"""RLHF with PPO: a policy and a value model trained against a frozen reward model and a frozen reference.

The algorithm is PPO (Schulman et al. 2017) as applied to language models by Ziegler et al. 2019
("Fine-Tuning Language Models from Human Preferences", the lm-human-preferences code) and Ouyang et al. 2022,
with the implementation details catalogued in "The N+ Implementation Details of RLHF with PPO" (Huang et al.
2024). One update:
    1. rollout   sample a response per prompt from the policy (left-padded prompts, KV cache, temperature);
                 cut after the first EOS; responses that never stop can be penalised (--missing-eos-penalty)
    2. score     the reward model's score of prompt + response through EOS (common.rewards: the tokens it was
                 trained and evaluated on), optionally normalised with the reward model's stored statistics
                 (score_mean/score_std written by reward_model.py over the same kind of sequences)
    3. penalty   per-token KL to the reference, k1 = log pi - log pi_ref or k3, with a fixed or adaptive
                 (Ziegler et al., eq. 2) coefficient; the score is added at the last token
    4. GAE       advantages with (gamma, lambda) from the value model's per-token values, whitened over the
                 batch's response tokens
    5. PPO       --ppo-epochs passes over --num-minibatches minibatches: clipped policy loss, clipped value loss
                 (x --vf-coef), gradient accumulation, clipping; log-probs re-computed at the sampling
                 temperature through `kernels.selective_logprob`, entropy from the same pass
    6. log       the lm-human-preferences metric names (objective/*, ppo/*), samples, ground truth
Departures: the value model is a separate network (initialised from the reward model by default, as in
InstructGPT), not a head on the policy; the reference and reward model are ordinary HF directories.

Run (no flags: policy out/sft, reward model out/reward_model, demo prompts, < 10 minutes on 2 CPU cores):
    python ppo.py
    python ppo.py --kl-estimator k3 --adaptive-kl --kl-target 3 --missing-eos-penalty 1.0
    torchrun --nproc_per_node 8 ppo.py --model-path my_sft --reward-model-path my_rm --data prompts.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro
from transformers import AutoConfig

from common import checkpoint, data, lora, rewards
from common.dist import (
    autocast,
    cleanup,
    exact_div,
    init_distributed,
    sampling_generator,
    seed_everything,
    wrap_model,
)
from common.generation import (
    clock,
    demo_eval,
    generate,
    is_eos,
    paired_difference,
    response_logprobs,
    sample_key,
    sequence_inputs,
    truncate_after_eos,
)
from common.lora import LoraArgs
from common.models import end_of_turn_ids, load_causal_lm, load_sequence_classifier, load_tokenizer
from common.tracking import make_tracker
from common.training import (
    NonFiniteLoss,
    Schedule,
    StopSignal,
    grad_norm_clip,
    make_optimizer,
    make_scheduler,
    nonfinite_step,
)
from kernels import kl_estimate


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "ppo"
    """name of the run (wandb run name)"""
    seed: int = 1
    """seed for data order and sampling (each rank samples with its own stream)"""
    output_dir: str = "out/ppo"
    """where the policy (save_pretrained), value_model/, trainer_state/, metrics.jsonl and eval.json go"""
    resume: bool = False
    """continue from output_dir/trainer_state (policy, value, optimisers, KL controller, RNG)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "plainalign"
    """wandb project name"""

    # --- models and data ---
    model_path: str = "out/sft"
    """policy to start from; also the frozen reference"""
    reward_model_path: str = "out/reward_model"
    """frozen reward model (AutoModelForSequenceClassification with one output)"""
    value_init: Literal["reward", "policy"] = "reward"
    """initialise the value model from the reward model (InstructGPT) or from the policy with a new head"""
    value_lora: bool = False
    """with --lora-r > 0, train the value model as LoRA adapters + its score head too (default: all of it)"""
    data: str = "demo"
    """prompts ({"prompt": str|messages}; SFT rows give their prompt); `demo` = the built-in task"""
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
    """peak learning rate of the policy (AdamW); on the demo task 1e-4 scored 0.363 and 5e-5 0.391 from the same
    SFT model at 0.363 (the faster policy drifted into errors the reward model does not see)"""
    value_learning_rate: float = 3e-4
    """peak learning rate of the value model"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)"""
    lr_schedule: Schedule = "linear"
    """decay over the updates after warmup"""
    warmup_steps: int = 0
    """linear warmup, in optimizer steps"""
    max_grad_norm: float = 1.0
    """gradient clipping, per model (0 = off)"""

    # --- batch sizes (local_ = per rank; global = x ranks) ---
    total_episodes: int = 8192
    """prompts (episodes) to train on in total"""
    local_rollout_batch_size: int = 64
    """prompts per rank per update (one response each)"""
    num_minibatches: int = 2
    """minibatches (optimizer steps) per PPO epoch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch"""
    ppo_epochs: int = 2
    """passes over each rollout batch"""

    # --- generation ---
    response_length: int = 64
    """maximum new tokens per response"""
    temperature: float = 0.7
    """sampling temperature (log-probs are computed at the same temperature)"""
    top_k: int = 0
    """sample from the k most likely tokens (0 = off)"""
    top_p: float = 1.0
    """nucleus sampling mass (1.0 = off)"""
    missing_eos_penalty: float | None = 1.0
    """subtract this from the score of a response that never emits EOS (None = off)"""

    # --- PPO and reward shaping ---
    kl_coef: float = 0.15
    """initial coefficient of the per-token KL penalty (0.15 keeps the demo policy from drifting into errors the
    reward model cannot see; at lr 1e-4, 0.05 reached the same style with lower accuracy: its evals ran 0.35-0.41
    against 0.45 at the end with 0.15)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator in the reward (kernels.kl_estimate)"""
    adaptive_kl: bool = False
    """adapt the KL coefficient towards --kl-target (Ziegler et al. 2019)"""
    kl_target: float = 6.0
    """adaptive KL: target KL per sequence (nats)"""
    kl_horizon: int = 10000
    """adaptive KL: horizon in episodes"""
    normalize_reward: bool = True
    """normalise scores with the reward model's score_mean/score_std (when its config has them)"""
    whiten_rewards: bool = False
    """whiten the shaped per-token rewards over the batch (masked)"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip"""
    cliprange_value: float = 0.2
    """value prediction clip (around the rollout's values)"""
    vf_coef: float = 0.1
    """weight of the value loss"""

    # --- evaluation and logging ---
    log_every: int = 1
    """updates between metric logs"""
    sample_every: int = 10
    """updates between sample tables (prompt, response, score)"""
    eval_every: int = 0
    """updates between demo-task evaluations (0 = only at the start and end)"""
    save_every: int = 20
    """updates between checkpoints (0 = only at the end)"""
    demo_eval_prompts: int = 1024
    """held-out demo-task prompts graded at the start and end (0 = off; only with --data demo)"""
    skip_nonfinite: bool = False
    """skip updates with a NaN/Inf loss (counted) instead of stopping"""
    activation_checkpointing: bool = False
    """recompute activations in backward (less memory, more compute)"""


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (tested one by one in tests/test_ppo.py)
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


def penalize_missing_eos(
    scores: torch.Tensor, responses: torch.Tensor, eos_id: int | list[int], penalty: float | None
) -> torch.Tensor:
    """Subtract `penalty` from the score of every response without an EOS, any of `eos_id` (it ran out of tokens)
    (B,)."""
    if penalty is None:
        return scores
    return torch.where(is_eos(responses, eos_id).any(-1), scores, scores - penalty)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """GAE (Schulman et al. 2016, eq. 16), vectorised over the batch, looping backwards over time (B, T).

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1}; V and A are 0 past the last
    token (mask), so the final token bootstraps from 0. Returns (advantages, returns = A + V).
    """
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, advantages + values


def ppo_policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange: float, num_tokens=None):
    """Clipped surrogate (PPO eq. 7), as a loss: mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)).

    The mean divides by `num_tokens` when given (the tokens of the whole minibatch, so that micro-batches and
    ranks add up to the minibatch mean), else by this batch's tokens. Returns (loss, clipfrac, approxkl) with
    approxkl = 0.5 E[(log r)^2] (lm-human-preferences) over this batch.
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = (torch.max(losses, losses_clipped) * mask).sum() / (
        num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
    )
    clipfrac = masked_mean((losses_clipped > losses).float(), mask)
    approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac.detach(), approxkl.detach()


def ppo_value_loss(new_values, old_values, returns, mask, cliprange_value: float, num_tokens=None):
    """Clipped value loss: 0.5 mean max((V - R)^2, (clip(V, V_old +- eps) - R)^2). Returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    losses, losses_clipped = (new_values - returns) ** 2, (clipped - returns) ** 2
    denom = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
    loss = 0.5 * (torch.max(losses, losses_clipped) * mask).sum() / denom
    return loss, masked_mean((losses_clipped > losses).float(), mask).detach()


class AdaptiveKLController:
    """Ziegler et al. 2019, eq. 2: beta <- beta (1 + K_beta e n / horizon), e = clip(KL / target - 1, +-0.2)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


def per_token_scores(model, queries, responses, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence classifier's head output at every response position (B, T), and its pooled score (B,).

    The head (`model.score`) is applied to every position inside the model's forward; a hook keeps that
    (B, P+T, 1) output before the model pools it at the last non-pad token.
    """
    captured = {}
    handle = model.score.register_forward_hook(lambda mod, inp, out: captured.__setitem__("all", out))
    try:
        pooled = model(**sequence_inputs(queries, responses, pad_id)).logits[:, 0]  # (B,)
    finally:
        handle.remove()
    values = captured["all"][:, queries.shape[1] - 1 : -1, 0]  # (B, T)
    return values.float(), pooled.float()


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

    # batch sizes, in the vocabulary of STYLE.md
    local_mini_batch_size = exact_div(
        args.local_rollout_batch_size, args.num_minibatches, "--local-rollout-batch-size / --num-minibatches"
    )
    local_micro_batch_size = exact_div(
        local_mini_batch_size, args.gradient_accumulation_steps, "local mini batch / --gradient-accumulation-steps"
    )
    rollout_batch_size = args.local_rollout_batch_size * dist.world_size
    num_updates = max(1, args.total_episodes // rollout_batch_size)
    optimizer_steps = num_updates * args.ppo_epochs * args.num_minibatches

    # 1. models: policy + value (trained), reference + reward (frozen); all FSDP2-sharded under torchrun
    tokenizer = load_tokenizer(args.model_path, padding_side="left", chat_template=args.chat_template)
    eos_ids = end_of_turn_ids(tokenizer, args.model_path)  # every id that ends a reply (Llama-3 Instruct: two)
    vocab = len(tokenizer)  # load_tokenizer may have added a pad or template tokens: the embeddings grow to match
    policy = load_causal_lm(
        args.model_path, dist.device, attn_implementation=args.attn_implementation, vocab_size=vocab
    )
    policy = lora.apply_lora(policy, args.lora)  # --lora-r > 0: only adapters are trained
    policy = wrap_model(policy, dist, activation_checkpointing=args.activation_checkpointing)
    if lora.enabled(args.lora):  # the reference is the starting model = the policy with its adapters off
        ref_policy = lora.AdaptersOff(policy)
    else:
        ref_policy = wrap_model(
            load_causal_lm(
                args.model_path, dist.device, attn_implementation=args.attn_implementation, vocab_size=vocab
            ),
            dist,
            trainable=False,
        )
    rm_config = AutoConfig.from_pretrained(args.reward_model_path)
    if rm_config.num_labels != 1:
        raise ValueError(f"{args.reward_model_path}: a reward model with {rm_config.num_labels} outputs; PPO needs 1")
    reward_model = wrap_model(load_sequence_classifier(args.reward_model_path, dist.device, 1, attn_implementation=args.attn_implementation,
                                                       pad_token_id=tokenizer.pad_token_id, vocab_size=vocab), dist, trainable=False)  # fmt: skip
    value_path = args.reward_model_path if args.value_init == "reward" else args.model_path
    value_model = load_sequence_classifier(value_path, dist.device, 1, attn_implementation=args.attn_implementation,
                                           pad_token_id=tokenizer.pad_token_id, init_head=args.value_init == "policy",
                                           vocab_size=vocab)  # fmt: skip
    if args.value_lora:
        value_model = lora.apply_lora(value_model, args.lora, task="seq_cls")
    value_model = wrap_model(value_model, dist, activation_checkpointing=args.activation_checkpointing)
    score_mean = getattr(rm_config, "score_mean", None) if args.normalize_reward else None
    score_std = getattr(rm_config, "score_std", None) if args.normalize_reward else None

    # 2. prompts: errors name file, row and field
    data_path = data.resolve_data_path(args.data, "prompts", dist)
    rows = data.load_rows(data_path, args.split)
    parsed = data.parse_rows(rows, data.parse_prompt, rows.source, args.skip_bad_rows)
    prompts = data.tokenize_rows(parsed.records, lambda r, c: data.tokenize_prompt(tokenizer, r["prompt"], args.max_prompt_len, c,
                                 args.prompt_truncation, r.get("field", "prompt")), parsed.source, args.skip_bad_rows, args.prompt_truncation, args.num_proc, args.data_cache_dir)  # fmt: skip

    # 3. optimisers, schedules, KL controller, resume
    policy_opt = make_optimizer(policy, args.learning_rate, args.weight_decay)
    value_opt = make_optimizer(value_model, args.value_learning_rate, args.weight_decay)
    policy_sched = make_scheduler(policy_opt, args.lr_schedule, args.warmup_steps, optimizer_steps)
    value_sched = make_scheduler(value_opt, args.lr_schedule, args.warmup_steps, optimizer_steps)
    kl_ctl = (
        AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
        if args.adaptive_kl
        else FixedKLController(args.kl_coef)
    )
    models, optimizers = {"policy": policy, "value": value_model}, {"policy": policy_opt, "value": value_opt}
    start_update, skipped_updates, initial, initial_scores = 0, 0, {}, []
    if args.resume:
        state = checkpoint.load_trainer_state(args.output_dir, dist, models, optimizers, {"sampling": generator})
        policy_sched.load_state_dict(state["policy_scheduler"])
        value_sched.load_state_dict(state["value_scheduler"])
        kl_ctl.value = state["kl_coef"]
        start_update, skipped_updates, initial = state["step"], state["skipped_updates"], state["initial"]
        initial_scores = state.get("initial_scores", [])
    tracker = make_tracker(
        dist, args.output_dir, args, args.track, args.wandb_project, start_update if args.resume else -1
    )
    tracker.print(f"resolved args: {args}")
    tracker.print(
        f"world_size={dist.world_size} rollout_batch_size={rollout_batch_size} local_mini_batch_size={local_mini_batch_size} "
        f"local_micro_batch_size={local_micro_batch_size} num_updates={num_updates} prompts={len(prompts.records)} "
        f"skipped_rows={parsed.skipped + prompts.skipped} reward_norm={(score_mean, score_std)} start_update={start_update}"
    )
    for line in data.skip_report(parsed, prompts):
        tracker.print(line)
    if lora.enabled(args.lora):
        tracker.print(f"reference model: {lora.REFERENCE_NOTE}")

    def save(update: int) -> None:
        extra = {
            "step": update, "policy_scheduler": policy_sched.state_dict(), "value_scheduler": value_sched.state_dict(),
            "kl_coef": kl_ctl.value, "skipped_updates": skipped_updates, "initial": initial,
            "initial_scores": initial_scores,
        }  # fmt: skip
        checkpoint.save_trainer_state(args.output_dir, dist, models, optimizers, extra, {"sampling": generator})
        checkpoint.export_pretrained(policy, tokenizer, args.output_dir, dist)
        checkpoint.export_pretrained(value_model, tokenizer, f"{args.output_dir}/value_model", dist)

    demo_eval_on = args.demo_eval_prompts > 0 and args.data == "demo"
    if demo_eval_on and not args.resume:
        initial = evaluate(policy, tokenizer, dist, args, per_prompt=True)
        initial.pop("samples")
        initial_scores = initial.pop("scores")
        tracker.print(f"start: eval/score={initial['eval/score']:.3f} eval/accuracy={initial['eval/accuracy']:.3f}")

    bar = tracker.progress(num_updates, start_update, "ppo")
    final_kl = float("nan")
    for update in range(start_update, num_updates):
        # 1. rollout: this rank's share of the update's prompts, one sampled response each
        t_rollout = clock(dist)
        idx = dist.shard(data.step_indices(len(prompts.records), rollout_batch_size, update, args.seed))
        query_list = [prompts.records[i] for i in idx]
        # randomness keyed by (seed, update, position in the global batch): the same samples on any number of ranks
        keys = [sample_key(args.seed, update, dist.rank * len(idx) + k) for k in range(len(idx))]
        try:
            response_list = generate(policy, query_list, pad_id=tokenizer.pad_token_id, eos_id=eos_ids,
                                     max_new_tokens=args.response_length, dist=dist, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, sample_keys=keys)  # fmt: skip
        except FloatingPointError as e:  # a NaN policy cannot even sample: stop, naming the update
            raise NonFiniteLoss(f"non-finite logits at step {update} (rollout): {e}") from e
        queries = data.pad(query_list, tokenizer.pad_token_id, side="left").to(dist.device)  # (B, P)
        # columns past the longest response would be pure padding (the longest over ranks: same shapes everywhere)
        width = int(dist.all_reduce(torch.tensor(max(map(len, response_list)), device=dist.device), "max"))
        responses = data.pad(response_list, tokenizer.pad_token_id, side="right", length=width).to(
            dist.device
        )  # (B, T)
        responses, mask = truncate_after_eos(responses, eos_ids, tokenizer.pad_token_id)
        mask = mask.float()
        contains_eos = is_eos(responses, eos_ids).any(-1)
        rollout_tokens = mask.sum().item()
        t_rollout = clock(dist) - t_rollout

        # 2. score, and the forward passes the update needs: old log-probs, reference log-probs, values
        t_score = clock(dist)
        with torch.no_grad(), autocast(dist):
            old_logprobs, old_entropy = [], []
            ref_logprobs, old_values, scores = [], [], []
            for s in range(0, len(idx), local_micro_batch_size):
                q, r = queries[s : s + local_micro_batch_size], responses[s : s + local_micro_batch_size]
                lp, ent = response_logprobs(policy, q, r, tokenizer.pad_token_id, args.temperature, with_entropy=True)
                old_logprobs.append(lp.float())
                old_entropy.append(ent.float())
                ref_logprobs.append(
                    response_logprobs(ref_policy, q, r, tokenizer.pad_token_id, args.temperature).float()
                )
                old_values.append(per_token_scores(value_model, q, r, tokenizer.pad_token_id)[0])
                # the reward model reads exactly the tokens it was trained on (common.rewards: prompt + reply
                # through EOS), the same sequences reward_model.py scored for its statistics
                scores.append(rewards.score_replies(reward_model, query_list[s : s + len(q)], response_list[s : s + len(q)],
                                                    tokenizer.pad_token_id, eos_ids, dist.device)[:, 0])  # fmt: skip
            old_logprobs, old_entropy = torch.cat(old_logprobs), torch.cat(old_entropy)  # (B, T)
            ref_logprobs, old_values, scores = torch.cat(ref_logprobs), torch.cat(old_values), torch.cat(scores)
        raw_scores = scores.clone()
        if score_mean is not None and score_std:
            scores = (scores - score_mean) / score_std
        scores = penalize_missing_eos(scores, responses, eos_ids, args.missing_eos_penalty)

        # 3. KL penalty per token; the score lands on the last response token
        kl = kl_estimate(old_logprobs, ref_logprobs, args.kl_estimator) * mask  # (B, T)
        non_score_reward = -kl_ctl.value * kl
        last = (mask.sum(-1).long() - 1).clamp(min=0)  # index of the last kept token (B,)
        token_rewards = non_score_reward.clone()
        token_rewards[torch.arange(len(idx), device=dist.device), last] += scores
        if args.whiten_rewards:
            token_rewards = whiten(token_rewards, mask, shift_mean=False, dist=dist)

        # 4. advantages (GAE) and returns; advantages whitened over the global batch's response tokens
        advantages, returns = compute_gae(token_rewards, old_values, mask, args.gamma, args.lam)
        advantages = whiten(advantages, mask, dist=dist)
        t_score = clock(dist) - t_score

        # 5. PPO epochs over minibatches, with gradient accumulation
        t_train = clock(dist)
        # per micro-batch: approxkl, clipfrac, value clipfrac, count; per minibatch: policy loss, value loss, count
        stats = torch.zeros(7, dtype=torch.float64, device=dist.device)
        nonfinite = False
        for _epoch in range(args.ppo_epochs):
            order = torch.randperm(len(idx), generator=generator, device=dist.device).tolist()
            for mb_start in range(0, len(idx), local_mini_batch_size):
                mini = order[mb_start : mb_start + local_mini_batch_size]
                micro = [mini[i : i + local_micro_batch_size] for i in range(0, len(mini), local_micro_batch_size)]
                # the minibatch's token mean, over all ranks; FSDP averages gradients over ranks, hence / world size
                num_tokens = dist.sum(mask[mini].sum().item()) / dist.world_size
                for k, mi in enumerate(micro):
                    if dist.enabled:
                        for m in (policy, value_model):
                            m.set_requires_gradient_sync(k == len(micro) - 1)
                    mi = torch.tensor(mi, device=dist.device)
                    q, r, mk = queries[mi], responses[mi], mask[mi]
                    with autocast(dist):
                        new_logprobs = response_logprobs(policy, q, r, tokenizer.pad_token_id, args.temperature)
                        new_values, _ = per_token_scores(value_model, q, r, tokenizer.pad_token_id)
                    pg_loss, clipfrac, approxkl = ppo_policy_loss(
                        new_logprobs, old_logprobs[mi], advantages[mi], mk, args.cliprange, num_tokens
                    )
                    vf_loss, vf_clipfrac = ppo_value_loss(
                        new_values, old_values[mi], returns[mi], mk, args.cliprange_value, num_tokens
                    )
                    loss = pg_loss + args.vf_coef * vf_loss
                    if not torch.isfinite(loss):
                        nonfinite = True
                    loss.backward()
                    stats[:4] += torch.stack([approxkl, clipfrac, vf_clipfrac, torch.ones_like(approxkl)]).double()
                    stats[4:6] += torch.stack([pg_loss.detach(), vf_loss.detach()]).double()
                stats[6] += 1
                if nonfinite_step(torch.tensor(float("nan") if nonfinite else 0.0), update, dist, args.skip_nonfinite):
                    policy_opt.zero_grad(set_to_none=True)
                    value_opt.zero_grad(set_to_none=True)
                    nonfinite = False
                    skipped_updates += 1
                    continue
                if args.max_grad_norm > 0:  # (the norm itself is not logged: no pass over the gradients when off)
                    grad_norm_clip(policy, args.max_grad_norm)
                    grad_norm_clip(value_model, args.max_grad_norm)
                policy_opt.step()
                value_opt.step()
                policy_sched.step()
                value_sched.step()
                policy_opt.zero_grad(set_to_none=True)
                value_opt.zero_grad(set_to_none=True)
        t_train = clock(dist) - t_train
        kl_per_seq = dist.sum(kl.sum().item()) / rollout_batch_size
        kl_ctl.update(kl_per_seq, rollout_batch_size)
        final_kl = kl_per_seq
        bar.update(1)

        # 6. log (metrics reduced over ranks once per update)
        if (update + 1) % args.log_every == 0 or update + 1 == num_updates:
            dist.all_reduce(stats)
            sums = torch.tensor([
                (old_entropy * mask).sum(), non_score_reward.sum(), scores.sum(), raw_scores.sum(),
                contains_eos.float().sum(), mask.sum(),
            ], dtype=torch.float64, device=dist.device)  # fmt: skip
            dist.all_reduce(sums)
            n = rollout_batch_size
            metrics = {
                "objective/kl": kl_per_seq,
                "objective/kl_coef": kl_ctl.value,
                "objective/entropy": sums[0].item() / n,
                "objective/non_score_reward": sums[1].item() / n,
                "objective/rlhf_reward": (sums[2].item() + sums[1].item()) / n,
                "objective/scores": sums[2].item() / n,
                "objective/raw_scores": sums[3].item() / n,
                "ppo/policy/approxkl_avg": stats[0].item() / stats[3].item(),
                "ppo/policy/clipfrac_avg": stats[1].item() / stats[3].item(),
                "ppo/loss/policy_avg": stats[4].item() / stats[6].item(),
                "ppo/loss/value_avg": stats[5].item() / stats[6].item(),
                "ppo/val/clipfrac_avg": stats[2].item() / stats[3].item(),
                "ppo/val/num_eos_tokens": sums[4].item(),
                "ppo/val/response_length": sums[5].item() / n,
                "ppo/lr": policy_sched.get_last_lr()[0],
                "ppo/skipped_updates": skipped_updates,
                "perf/rollout_tokens_per_sec": dist.sum(rollout_tokens) / max(t_rollout, 1e-9),
                "perf/tokens_per_sec": dist.sum(rollout_tokens) * args.ppo_epochs / max(t_train, 1e-9),
                "perf/time_rollout": t_rollout,
                "perf/time_score": t_score,
                "perf/time_train": t_train,
                "episodes": (update + 1) * rollout_batch_size,
            }
            if dist.device.type == "cuda":
                metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            if args.eval_every and demo_eval_on and (update + 1) % args.eval_every == 0:
                metrics |= {k: v for k, v in evaluate(policy, tokenizer, dist, args).items() if k != "samples"}
            tracker.log(metrics, update + 1, echo=False)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{kl_per_seq:.2f}")
        if args.sample_every and (update + 1) % args.sample_every == 0:
            texts = tokenizer.batch_decode(responses[:4], skip_special_tokens=True)
            rows = [
                [tokenizer.decode(query_list[i], skip_special_tokens=True), texts[i], round(raw_scores[i].item(), 3)]
                for i in range(min(4, len(texts)))
            ]
            tracker.table("samples", ["prompt", "response", "score"], rows, update + 1)
        if args.save_every and (update + 1) % args.save_every == 0 and update + 1 < num_updates:
            save(update + 1)
        stop.exit_if_requested(dist, lambda: save(update + 1), f"at update {update + 1}", args.output_dir, tracker)
    tracker.close_progress()

    # 7. final evaluation and export
    save(num_updates)
    final = {"objective/kl": final_kl, "ppo/skipped_updates": skipped_updates}
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
        tracker.print(
            f"ground truth ({args.demo_eval_prompts} held-out demo prompts): score {initial['eval/score']:.3f} -> "
            f"{final['eval/score']:.3f} ({final.get('eval/score_gain', float('nan')):+.3f} ± "
            f"{2 * final.get('eval/score_gain_se', float('nan')):.3f}, 2 s.e. paired), accuracy {initial['eval/accuracy']:.3f} -> {final['eval/accuracy']:.3f}; "
            f"KL to the reference {final_kl:.3f} nats/sequence"
        )
    tracker.print(f"saved {args.output_dir}")
    tracker.finish()
    cleanup(dist)
