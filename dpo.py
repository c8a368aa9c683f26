"""Offline preference optimisation: DPO and its loss family, with an optional precomputed reference.

DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7) trains the policy pi directly on pairs
(x, y_w, y_l) with the implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)):
    loss = -log sigmoid(beta * Delta),  Delta = log pi/pi_ref (y_w) - log pi/pi_ref (y_l)
The family (`--loss-type`), each written out in `preference_loss`:
    sigmoid    DPO; with --label-smoothing eps, conservative DPO (Mitchell 2023): the label is wrong w.p. eps
    ipo        IPO (Azar et al. 2023, eq. 17): (Delta - 1/(2 beta))^2, a regression that does not saturate
    hinge      the RSO hinge (Liu et al. 2023, "Statistical Rejection Sampling Improves Preference Optimization"):
               max(0, 1 - beta * Delta), SLiC-HF's calibration loss (Zhao et al. 2023) on log-ratios to the
               reference; SLiC-HF's own, max(0, delta - log pi(y_w|x) + log pi(y_l|x)), has no reference
    simpo      SimPO (Meng et al. 2024, eq. 6): no reference, length-normalised log-probs and a margin gamma
    rpo_sq, rpo_fwd_kl, rpo_bwd_kl   NeMo-Aligner's reward-aware preference optimisation: match beta * Delta
               to the data's reward gap Delta_r = eta (r_w - r_l) by a squared error or a KL between Bernoullis
    kto        KTO (Ethayarajh et al. 2024): unpaired desirable/undesirable completions (`kto_loss`), with the
               paper's reference point z0, an estimate of KL(pi || pi_ref) on mismatched prompt/completion
               pairs, over the whole global batch (`kto_reference_point`; one extra no-grad forward per step)
`--sft-loss-weight` adds the length-normalised NLL of the chosen response (RPO, Pang et al. 2024); it is 1 by
default, which the demo task needed (see the flag's help), and 0 gives plain DPO.

Reference log-probs come from a frozen copy of the starting model (sharded like the policy), or, with
`--precompute-ref-logprobs`, are computed once before training and cached in the output directory, so no
reference model is held during training. The cache is keyed by the reference's weights (a hash of their
content, `common.models.weights_fingerprint`), the exact token ids and the settings that change the numbers,
so a retrained reference at the same path is recomputed. Chosen and rejected go through one forward;
log-probs through `kernels.selective_logprob`, summed over response tokens (averaged for simpo or with
--average-logprobs). Dropout is off in every model (`common.models.disable_dropout`): the policy in train
mode must give the reference's numbers at step 0.

Run (no flags: from out/sft on the demo pairs, a few minutes on 2 CPU cores):
    python dpo.py
    python dpo.py --loss-type ipo --beta 0.5 --precompute-ref-logprobs
    python dpo.py --loss-type kto --data demo                 # demo KTO rows (prompt, completion, label)
    torchrun --nproc_per_node 2 dpo.py
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

from common import checkpoint, data, lora
from common.dist import autocast, cleanup, init_distributed, seed_everything, wrap_model
from common.generation import demo_eval
from common.lora import LoraArgs
from common.models import load_causal_lm, load_tokenizer, weights_fingerprint
from common.tracking import make_tracker
from common.training import Schedule, StopSignal, make_optimizer, make_scheduler, nonfinite_step, optimizer_step
from kernels import selective_logprob

LossType = Literal["sigmoid", "ipo", "hinge", "simpo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl", "kto"]


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "dpo"
    """name of the run (wandb run name)"""
    seed: int = 1
    """seed for data order"""
    output_dir: str = "out/dpo"
    """where the model (save_pretrained), trainer_state/, metrics.jsonl and eval.json are written"""
    resume: bool = False
    """continue from output_dir/trainer_state"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "plainalign"
    """wandb project name"""

    # --- model and data ---
    model_path: str = "out/sft"
    """policy to start from (HF causal LM directory or hub id)"""
    ref_model_path: str | None = None
    """reference model (default: --model-path)"""
    data: str = "demo"
    """preference pairs (prompt/chosen/rejected, Anthropic HH), or KTO rows for --loss-type kto; `demo` = the built-in task"""
    eval_data: str | None = None
    """held-out data; default: the last --eval-size rows of --data"""
    eval_size: int = 256
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
    learning_rate: float = 1e-4
    """peak learning rate (AdamW). On the demo task, without the NLL term, 2e-4 drove both log-probs down by
    ~150 nats and the score from 0.39 to 0.15 while the preference accuracy still rose; with it (the default
    --sft-loss-weight 1), 1e-4 scored 0.623 and 5e-5 0.583 from an SFT model at 0.460"""
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
    """pairs (or KTO rows) per forward/backward on each rank"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    num_epochs: float = 1.0
    """passes over the training data; ignored when --total-steps > 0"""
    total_steps: int = 0
    """optimizer steps (0 = derived from --num-epochs)"""

    # --- method ---
    loss_type: LossType = "sigmoid"
    """the preference loss (see the module docstring): sigmoid (DPO), ipo, hinge (RSO: relu(1 - beta Delta), with
    the reference), simpo, rpo_sq, rpo_fwd_kl, rpo_bwd_kl, kto"""
    beta: float = 0.3
    """strength of the KL regularisation (inverse temperature of the implicit reward); 0.1 is the paper's
    value, 0.3 did better on the demo task (score 0.47 vs 0.41 at lr 5e-5, an earlier SFT model, no NLL term).
    ipo: Delta uses summed log-probs, as in the IPO paper; TRL averages them per token (--average-logprobs), so
    the same beta is a different regularisation there"""
    label_smoothing: float = 0.0
    """sigmoid/simpo: probability that a preference label is flipped (conservative DPO)"""
    simpo_gamma: float = 0.5
    """simpo: target reward margin gamma"""
    rpo_eta: float = 1.0
    """rpo_*: scale eta of the data's reward gap, Delta_r = eta (chosen_reward - rejected_reward)"""
    kto_desirable_weight: float = 1.0
    """kto: weight lambda_D of desirable examples"""
    kto_undesirable_weight: float = 1.0
    """kto: weight lambda_U of undesirable examples"""
    kto_reference_point: Literal["mismatched", "matched_batch_mean"] = "mismatched"
    """kto: z0 = max(0, mean log pi/pi_ref) over mismatched prompt/completion pairs of the global batch (the
    paper's KL estimate; one extra no-grad forward of policy and reference per step), or over each micro-batch's
    own completions on each rank (cheaper, but not a KL estimate: the loss cannot saturate, and the value
    depends on the micro-batch size and the number of ranks)"""
    sft_loss_weight: float = 1.0
    """add this x the length-normalised NLL of the chosen response (RPO, Pang et al. 2024; 0 = plain DPO). On
    the demo task plain DPO lowered the chosen answers' log-probs with the rejected ones and fell below its start
    model (0.460 -> 0.421); weight 1 keeps them up (-> 0.623). bench/results/dpo_experiments.md has the runs"""
    average_logprobs: bool = False
    """use per-token mean instead of summed response log-probs (always on for simpo)"""
    precompute_ref_logprobs: bool = False
    """compute reference log-probs once before training, cache them in output_dir (keyed by the reference's
    weights, the token ids and the settings), hold no reference model"""

    # --- evaluation and logging ---
    log_every: int = 25
    """steps between metric logs"""
    eval_every: int = 100
    """steps between evaluations on held-out pairs (0 = only at the end)"""
    save_every: int = 500
    """steps between checkpoints (0 = only at the end)"""
    demo_eval_prompts: int = 1024
    """held-out demo-task prompts graded at the start and end (0 = off; only with --data demo)"""
    max_new_tokens: int = 64
    """generation length for the demo-task evaluation"""
    skip_nonfinite: bool = False
    """skip steps whose loss is NaN/Inf (counted) instead of stopping"""
    activation_checkpointing: bool = False
    """recompute activations in backward (less memory, more compute)"""


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_data_rewards: torch.Tensor | None = None,
    rejected_data_rewards: torch.Tensor | None = None,
    rpo_eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and implicit rewards of chosen and rejected (B,), detached.

    With rho = log pi - log pi_ref and Delta = rho_chosen - rho_rejected:
        sigmoid     -(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)
        ipo         (Delta - 1 / (2 beta))^2
        hinge       max(0, 1 - beta Delta)
        simpo       -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), z = beta (logp_c - logp_r) - gamma, with
                    length-normalised policy log-probs and no reference (ref_* are ignored)
        rpo_sq      (beta Delta - Delta_r)^2,  Delta_r = eta (r_chosen - r_rejected) from the data
        rpo_bwd_kl  KL(Bernoulli(sigmoid(Delta_r)) || Bernoulli(sigmoid(beta Delta)))
        rpo_fwd_kl  KL(Bernoulli(sigmoid(beta Delta)) || Bernoulli(sigmoid(Delta_r)))
    Rewards are beta * rho (simpo: beta * logp).
    """
    if loss_type == "simpo":
        chosen_rewards, rejected_rewards = beta * policy_chosen_logps, beta * policy_rejected_logps
        z = chosen_rewards - rejected_rewards - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        return losses, chosen_rewards.detach(), rejected_rewards.detach()
    chosen_rho = policy_chosen_logps - ref_chosen_logps
    rejected_rho = policy_rejected_logps - ref_rejected_logps
    delta = chosen_rho - rejected_rho
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type in ("rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"):
        if chosen_data_rewards is None or rejected_data_rewards is None:
            raise ValueError(f"{loss_type} needs per-response rewards (chosen_reward, rejected_reward) in the data")
        target = rpo_eta * (chosen_data_rewards - rejected_data_rewards)
        logit = beta * delta
        if loss_type == "rpo_sq":
            losses = (logit - target) ** 2
        else:
            logp_model, log1mp_model = F.logsigmoid(logit), F.logsigmoid(-logit)
            logp_data, log1mp_data = F.logsigmoid(target), F.logsigmoid(-target)
            if loss_type == "rpo_bwd_kl":  # KL(data || model)
                losses = logp_data.exp() * (logp_data - logp_model) + log1mp_data.exp() * (log1mp_data - log1mp_model)
            else:  # KL(model || data)
                losses = logp_model.exp() * (logp_model - logp_data) + log1mp_model.exp() * (log1mp_model - log1mp_data)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, (beta * chosen_rho).detach(), (beta * rejected_rho).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO per-example losses (B,), rewards beta * rho (B,), and the reference point z0 used.

    rho = log pi(y|x) - log pi_ref(y|x) (Ethayarajh et al. 2024, eq. 8):
        desirable:    lambda_D (1 - sigmoid(beta (rho - z0)))
        undesirable:  lambda_U (1 - sigmoid(beta (z0 - rho)))
    z0 (detached) is `reference_point` when given: the paper's estimate of KL(pi || pi_ref) from mismatched
    prompt/completion pairs (`kto_reference_point`). Without it, z0 = max(0, mean rho over this batch's own
    completions) (--kto-reference-point matched_batch_mean). That is a different quantity, not a cheaper
    estimate of the same one: it follows the batch's own log-ratios, so a batch of only desirable examples
    has rho - z0 centred at 0 and its loss stays near lambda_D / 2 however far rho rises; and it is taken per
    micro-batch and per rank, so it changes with the micro-batch size and the number of ranks.
    """
    rho = policy_logps - ref_logps
    z0 = reference_point if reference_point is not None else rho.detach().mean().clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (rho - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rho))),
    )
    return losses, (beta * rho).detach(), z0


def sequence_logprobs(
    model,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    device: torch.device,
    average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or mean) log-prob of each response given its prompt (B,), and response lengths (B,).

    Sequences are right-padded with position ids from the mask; only response tokens are scored.
    """
    seqs = [p + r for p, r in zip(prompts, responses)]
    labels = [[data.IGNORE_INDEX] * len(p) + r for p, r in zip(prompts, responses)]
    batch = data.collate([{"input_ids": s, "labels": lab} for s, lab in zip(seqs, labels)], pad_id)
    logits = model(**data.model_inputs(batch, model, device)).logits  # (B, T, V)
    targets = batch["labels"][:, 1:].to(device)  # (B, T-1): position t predicts token t+1
    logps = selective_logprob(logits[:, :-1], targets)  # (B, T-1), 0 on prompt and padding
    lengths = (targets != data.IGNORE_INDEX).sum(-1)
    total = logps.sum(-1)
    return (total / lengths.clamp(min=1) if average else total), lengths


def pair_logprobs(
    model, items: list[dict], pad_id: int, device, average: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of pairs in one forward (chosen rows first), and chosen lengths."""
    prompts = [e["prompt_ids"] for e in items] * 2
    responses = [e["chosen_ids"] for e in items] + [e["rejected_ids"] for e in items]
    logps, lengths = sequence_logprobs(model, prompts, responses, pad_id, device, average)
    return logps[: len(items)], logps[len(items) :], lengths[: len(items)]


def item_logprobs(model, items: list[dict], pad_id: int, device, average: bool, kto: bool, mismatched: bool = False):
    """(B, 2) log-probs of (chosen, rejected); for KTO (B, 1) of the completion, or with `mismatched` (B, 2) of
    (completion, the item's mismatched completion `mismatched_ids`), in one forward."""
    if kto:
        prompts, responses = [e["prompt_ids"] for e in items], [e["completion_ids"] for e in items]
        if mismatched:
            prompts, responses = prompts * 2, responses + [e["mismatched_ids"] for e in items]
        logps, _ = sequence_logprobs(model, prompts, responses, pad_id, device, average)
        return logps.view(-1, len(items)).T  # (B, 1 or 2)
    chosen, rejected, _ = pair_logprobs(model, items, pad_id, device, average)
    return torch.stack([chosen, rejected], dim=-1)


def mismatched_completions(items: list[dict], max_seq_len: int) -> list[list[int]]:
    """For KTO's reference point: item i's prompt gets another item's completion (truncated to fit).

    The partners form one random cycle through the items, from a fixed seed: order = randperm(N), the item at
    order[k] gets the completion at order[(k + 1) mod N]. So no item gets its own completion, and the pairing is
    the same for every run, rank, step and batch size: the reference's log-probs of the mismatched pairs can be
    precomputed with the rest. Random partners rather than neighbours (TRL shifts the completions by one within
    each batch of the data file): KTO data made from preference pairs lists a prompt's desirable and undesirable
    completions one after the other, and a neighbour would often have the same prompt.
    """
    n = len(items)
    if n == 1:
        raise ValueError("KTO's mismatched reference point needs at least 2 examples (one has no other completion)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    partner = [0] * n
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % n]
    return [items[j]["completion_ids"][: max_seq_len - len(items[i]["prompt_ids"])] for i, j in enumerate(partner)]


@torch.no_grad()
def mismatched_logratios(model, ref_model, items: list[dict], ref_logps, args: Args, dist, pad_id: int, average: bool):
    """log pi/pi_ref (B,) of this rank's items' mismatched pairs: the policy now, the reference from `ref_logps`
    (B,) when precomputed, else from `ref_model`."""
    out = []
    for k, mb in enumerate(data.micro_batches(items, args.local_micro_batch_size)):
        prompts, responses = [e["prompt_ids"] for e in mb], [e["mismatched_ids"] for e in mb]
        with autocast(dist):
            pol = sequence_logprobs(model, prompts, responses, pad_id, dist.device, average)[0].float()
            if ref_logps is not None:
                start = k * args.local_micro_batch_size
                ref = ref_logps[start : start + len(mb)].to(dist.device)
            else:
                ref = sequence_logprobs(ref_model, prompts, responses, pad_id, dist.device, average)[0].float()
        out.append(pol - ref)
    return torch.cat(out) if out else torch.zeros(0, device=dist.device)


def kto_reference_point(mismatched_rho: torch.Tensor, dist) -> torch.Tensor:
    """KTO's z0 (Ethayarajh et al. 2024, sec. 4.2) = max(0, mean of log pi/pi_ref over the mismatched pairs of
    the whole global batch), detached: each rank passes its own pairs' log-ratios (B,), the sum and the count
    are all-reduced, so every rank, micro-batch and world size gets the same z0."""
    rho = mismatched_rho.detach().double()
    total = dist.all_reduce(torch.stack([rho.sum(), rho.new_tensor(len(rho))]))  # (sum, count)
    return (total[0] / total[1].clamp(min=1)).clamp(min=0).float()


@torch.no_grad()
def reference_logprobs(ref_model, items: list[dict], args: Args, dist, pad_id: int, kto: bool) -> torch.Tensor:
    """Reference log-probs of every item (N, 2 or 1), computed sharded and gathered on every rank.

    KTO: (N, 1) of the completion, or (N, 2) with the mismatched pair's (--kto-reference-point mismatched).
    """
    mismatched = kto and args.kto_reference_point == "mismatched"
    n = len(items)
    padded = items + items[: (-n) % dist.world_size]  # equal shards; the duplicates are dropped after gathering
    local = dist.shard(padded)
    out = []
    for mb in data.micro_batches(local, args.local_micro_batch_size):
        with autocast(dist):
            logps = item_logprobs(ref_model, mb, pad_id, dist.device, args.average_logprobs, kto, mismatched)
            out.append(logps.float().cpu())
    gathered = dist.all_gather_object(torch.cat(out))
    return torch.cat(gathered)[:n]


def cached_reference(path: Path, key: str, dist, compute) -> tuple[torch.Tensor, bool]:
    """Reference log-probs from `path` when it was computed for the same `key`, else computed and saved; and
    whether they came from the cache.

    `key` hashes what the numbers depend on (the reference's weights, data, lengths, settings); a stale cache
    is recomputed.
    """
    saved = torch.load(path, weights_only=False) if path.exists() else None
    if dist.broadcast_object(saved is not None and saved["key"] == key):  # every rank takes the same branch
        return saved["logps"], True
    logps = compute()  # collective: every rank computes its shard, all receive the whole
    if dist.is_main:
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"key": key, "logps": logps}, tmp)
        tmp.replace(path)
    return logps, False


@torch.no_grad()
def evaluate(model, items: list[dict], ref_logps: torch.Tensor, args: Args, dist, pad_id: int, kto: bool) -> dict:
    """Held-out preference metrics: eval/rewards/{chosen,rejected,accuracies,margins}, eval/loss.

    KTO: the loss with the training's weights and reference point; the mismatched z0 is taken over the whole
    held-out set (eval/kto_reference_point)."""
    model.eval()
    average = args.average_logprobs or args.loss_type == "simpo"
    n = len(items) - len(items) % dist.world_size
    per_rank = n // dist.world_size
    local, local_ref = dist.shard(items[:n]), ref_logps[dist.rank * per_rank : (dist.rank + 1) * per_rank]
    z0 = None
    if kto and args.kto_reference_point == "mismatched":
        rho = mismatched_logratios(model, None, local, local_ref[:, 1], args, dist, pad_id, average)
        z0 = kto_reference_point(rho, dist)
    total = torch.zeros(7, dtype=torch.float64, device=dist.device)
    for k, mb in enumerate(data.micro_batches(local, args.local_micro_batch_size)):
        ref = local_ref[k * args.local_micro_batch_size : k * args.local_micro_batch_size + len(mb)].to(dist.device)
        with autocast(dist):
            pol = item_logprobs(model, mb, pad_id, dist.device, average, kto).float()
        if kto:
            desirable = torch.tensor([e["label"] for e in mb], device=dist.device)
            losses, rewards, used_z0 = kto_loss(pol[:, 0], ref[:, 0], desirable, args.beta, args.kto_desirable_weight,
                                                args.kto_undesirable_weight, z0)  # fmt: skip
            rc, rr = rewards[desirable], rewards[~desirable]
            total += torch.tensor(
                [losses.sum(), rc.sum(), rr.sum(), len(rc), len(rr), len(mb), used_z0 * len(mb)],
                dtype=torch.float64,
                device=dist.device,
            )
            continue
        data_r = [
            torch.tensor([e[k] for e in mb], device=dist.device) if mb[0][k] is not None else None
            for k in ("chosen_reward", "rejected_reward")
        ]
        losses, rc, rr = preference_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], args.loss_type, args.beta,
                                         args.label_smoothing, args.simpo_gamma, *data_r, args.rpo_eta)  # fmt: skip
        total += torch.stack(
            [
                losses.sum(),
                rc.sum(),
                rr.sum(),
                (rc > rr).sum(),
                (rc - rr).sum(),
                torch.tensor(len(mb), device=dist.device),
                torch.zeros((), device=dist.device),
            ]
        ).double()
    dist.all_reduce(total)
    model.train()
    if kto:
        return {"eval/loss": total[0].item() / total[5].item(), "eval/rewards/chosen": total[1].item() / max(total[3].item(), 1),
                "eval/rewards/rejected": total[2].item() / max(total[4].item(), 1),
                "eval/kto_reference_point": total[6].item() / total[5].item()}  # fmt: skip
    count = total[5].item()
    return {
        "eval/loss": total[0].item() / count,
        "eval/rewards/chosen": total[1].item() / count,
        "eval/rewards/rejected": total[2].item() / count,
        "eval/rewards/accuracies": total[3].item() / count,
        "eval/rewards/margins": total[4].item() / count,
    }


if __name__ == "__main__":
    args = tyro.cli(Args)
    data.exit_on_data_error()  # a bad row, field or split: one line naming it, no traceback
    dist = init_distributed(args.mixed_precision)
    seed_everything(args.seed)
    stop = StopSignal()
    kto = args.loss_type == "kto"
    mismatched = kto and args.kto_reference_point == "mismatched"  # KTO's z0 from mismatched pairs (the paper's)
    average = args.average_logprobs or args.loss_type == "simpo"
    uses_ref = args.loss_type != "simpo"

    # 1. policy, tokenizer, and (unless precomputing or simpo) the frozen reference
    tokenizer = load_tokenizer(args.model_path, chat_template=args.chat_template)
    model = load_causal_lm(args.model_path, dist.device, attn_implementation=args.attn_implementation,
                           vocab_size=len(tokenizer))  # fmt: skip
    model = lora.apply_lora(model, args.lora)  # --lora-r > 0: only adapters are trained
    model = wrap_model(model, dist, activation_checkpointing=args.activation_checkpointing)
    ref_path = args.ref_model_path or args.model_path
    ref_model = None
    shared_ref = uses_ref and lora.shares_reference(args.lora, args.ref_model_path, args.model_path)
    if shared_ref:  # the starting model = the policy with its adapters off: no second copy
        ref_model = lora.AdaptersOff(model)
    elif uses_ref:
        ref_model = wrap_model(
            load_causal_lm(
                ref_path, dist.device, attn_implementation=args.attn_implementation, vocab_size=len(tokenizer)
            ),
            dist,
            trainable=False,
        )

    # 2. data: pairs (or KTO rows); errors name file, row and field
    kind, parse = ("kto", data.parse_kto) if kto else ("preference", data.parse_preference)
    data_path = data.resolve_data_path(args.data, kind, dist)
    parsed, eval_parsed, eval_source = data.load_train_eval(
        data_path, args.eval_data, args.eval_size, parse, args.skip_bad_rows, args.split, args.eval_split
    )

    def tok(record, context):
        if kto:
            prompt, full_prompt_ids, cut = data.fit_prompt(
                tokenizer, record["prompt"], args.max_prompt_len, context, args.prompt_truncation
            )
            completion = data.tokenize_response(tokenizer, prompt, full_prompt_ids, record["completion"], context)
            prompt_ids = full_prompt_ids[cut:]
            return {
                "prompt_ids": prompt_ids,
                "completion_ids": completion[: args.max_seq_len - len(prompt_ids)],
                "label": record["label"],
            }
        if args.loss_type.startswith("rpo") and (record["chosen_reward"] is None or record["rejected_reward"] is None):
            missing = "chosen_reward" if record["chosen_reward"] is None else "rejected_reward"
            raise data.DataError(f"{context}, field '{missing}': missing ({args.loss_type} needs per-response rewards)")
        t = data.tokenize_pair(
            tokenizer, record, args.max_seq_len, args.max_prompt_len, context, args.prompt_truncation
        )
        return t | {"chosen_reward": record["chosen_reward"], "rejected_reward": record["rejected_reward"]}

    train, evals = data.tokenize_train_eval(parsed, eval_parsed, eval_source, tok, args)
    if mismatched:  # each row's prompt with another row's completion, fixed for the run (precomputable)
        for records in (train.records, evals.records):
            for e, other in zip(records, mismatched_completions(records, args.max_seq_len)):
                e["mismatched_ids"] = other

    # 3. reference log-probs: precomputed once (cached on disk) or per batch from the frozen reference
    width = 2 if mismatched or not kto else 1
    ref_source = f"computed per batch by {ref_path}" + (" with the LoRA adapters disabled" if shared_ref else "")
    if not uses_ref:
        train_ref, eval_ref = torch.zeros(len(train.records), width), torch.zeros(len(evals.records), width)
        ref_source = "none (simpo)"
    elif args.precompute_ref_logprobs:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        # The key hashes what the numbers depend on: the reference's weights (their content: a retrain into the
        # same directory keeps the path and the file sizes), the exact token ids (data, template, truncation,
        # KTO's mismatched pairs), summed vs mean log-probs, the compute precision (bf16 autocast / FSDP mixed
        # precision on CUDA) and the attention kernel.
        fields = ("prompt_ids", "completion_ids") if kto else ("prompt_ids", "chosen_ids", "rejected_ids")
        fields += ("mismatched_ids",) if mismatched else ()
        tokens = [[e[f] for f in fields] for e in train.records + evals.records]
        weights = dist.broadcast_object(weights_fingerprint(ref_path) if dist.is_main else None)
        precision = "bfloat16" if dist.bf16 else "float32"
        settings = {"weights": weights, "average": args.average_logprobs, "precision": precision,
                    "attn_implementation": args.attn_implementation}  # fmt: skip
        key = hashlib.sha256(json.dumps([settings, tokens]).encode()).hexdigest()
        cache = Path(args.output_dir) / "ref_logprobs.pt"
        both, cached = cached_reference(cache, key, dist, lambda: reference_logprobs(
            ref_model, train.records + evals.records, args, dist, tokenizer.pad_token_id, kto))  # fmt: skip
        train_ref, eval_ref = both[: len(train.records)], both[len(train.records) :]
        ref_model = None  # not held during training
        ref_source = (
            f"{'cached' if cached else 'computed'} ({cache}, key {key[:12]}, {ref_path} weights {weights[:12]})"
        )
    else:
        eval_ref = reference_logprobs(ref_model, evals.records, args, dist, tokenizer.pad_token_id, kto)

    # 4. batch sizes, optimiser, schedule, resume
    global_batch_size = args.local_micro_batch_size * args.gradient_accumulation_steps * dist.world_size
    per_epoch = data.steps_per_epoch(len(train.records), global_batch_size)
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
        f"train={len(train.records)} eval={len(evals.records)} skipped_rows={parsed.skipped + train.skipped} "
        f"reference={'none (simpo)' if not uses_ref else 'precomputed' if args.precompute_ref_logprobs else ref_path} "
        f"start_step={start_step}"
    )
    tracker.print(f"reference log-probs: {ref_source}")
    if shared_ref:
        tracker.print(f"reference model: {lora.REFERENCE_NOTE}")
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

    # 5. training loop
    model.train()
    bar = tracker.progress(total_steps, start_step, "dpo")
    t0, seqs = time.time(), 0
    for step in range(start_step, total_steps):
        global_idx = data.step_indices(len(train.records), global_batch_size, step, args.seed)
        idx = dist.shard(global_idx)
        local = [train.records[i] for i in idx]
        local_ref = train_ref[idx] if args.precompute_ref_logprobs or not uses_ref else None
        z0 = None  # KTO's reference point for the whole step (--kto-reference-point mismatched)
        if mismatched:
            rho = mismatched_logratios(model, ref_model, local, local_ref[:, 1] if local_ref is not None else None,
                                       args, dist, tokenizer.pad_token_id, average)  # fmt: skip
            z0 = kto_reference_point(rho, dist)
        # metrics summed over pairs: loss, rewards/chosen, rewards/rejected, accuracies, margins, logps/chosen,
        # logps/rejected, sft nll, KTO's reference point
        stats = torch.zeros(9, dtype=torch.float64, device=dist.device)
        micro = data.micro_batches(list(range(len(local))), args.local_micro_batch_size)
        for k, mb_idx in enumerate(micro):
            mb = [local[i] for i in mb_idx]
            if dist.enabled:
                model.set_requires_gradient_sync(k == len(micro) - 1)
            with autocast(dist):
                if local_ref is not None:
                    ref = local_ref[mb_idx].to(dist.device)
                else:
                    with torch.no_grad():
                        ref = item_logprobs(ref_model, mb, tokenizer.pad_token_id, dist.device, average, kto).float()
                if kto:
                    logps, _ = sequence_logprobs(model, [e["prompt_ids"] for e in mb], [e["completion_ids"] for e in mb],
                                                 tokenizer.pad_token_id, dist.device, average)  # fmt: skip
                    desirable = torch.tensor([e["label"] for e in mb], device=dist.device)
                    losses, rewards, used_z0 = kto_loss(
                        logps.float(), ref[:, 0], desirable, args.beta,
                        args.kto_desirable_weight, args.kto_undesirable_weight, z0,
                    )  # fmt: skip
                    chosen_rewards, rejected_rewards = rewards[desirable], rewards[~desirable]
                    chosen_logps, rejected_logps = logps[desirable].detach(), logps[~desirable].detach()
                    nll = torch.zeros((), device=dist.device)
                else:
                    used_z0 = torch.zeros((), device=dist.device)
                    chosen_logps, rejected_logps, chosen_len = pair_logprobs(
                        model, mb, tokenizer.pad_token_id, dist.device, average
                    )
                    data_r = [torch.tensor([e[f] for e in mb], device=dist.device) if mb[0][f] is not None else None
                              for f in ("chosen_reward", "rejected_reward")]  # fmt: skip
                    losses, chosen_rewards, rejected_rewards = preference_loss(
                        chosen_logps.float(), rejected_logps.float(), ref[:, 0], ref[:, 1], args.loss_type, args.beta,
                        args.label_smoothing, args.simpo_gamma, *data_r, args.rpo_eta,
                    )  # fmt: skip
                    summed = chosen_logps * chosen_len if average else chosen_logps
                    nll = -(summed / chosen_len.clamp(min=1)).sum()  # length-normalised NLL of the chosen responses
                    if args.sft_loss_weight:
                        losses = losses + args.sft_loss_weight * (-(summed / chosen_len.clamp(min=1)))
            # mean over the global batch; FSDP averages over ranks, hence / local batch size
            (losses.sum() / len(local)).backward()
            stats += torch.stack([
                losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                (chosen_rewards > rejected_rewards).sum() if not kto else torch.zeros((), device=dist.device),
                (chosen_rewards - rejected_rewards).sum() if not kto else torch.zeros((), device=dist.device),
                chosen_logps.detach().sum(), rejected_logps.detach().sum(), nll.detach(), used_z0 * len(mb),
            ]).double()  # fmt: skip
            seqs += len(mb) * (1 if kto else 2)
        if nonfinite_step(stats[0], step, dist, args.skip_nonfinite):
            optimizer.zero_grad(set_to_none=True)
            skipped_steps += 1
            continue
        grad_norm = optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        bar.update(1)

        # 6. log, evaluate, checkpoint
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            dist.all_reduce(stats)
            s = (stats / global_batch_size).tolist()
            metrics = {
                "train/loss": s[0],
                "rewards/chosen": s[1],
                "rewards/rejected": s[2],
                "rewards/accuracies": s[3],
                "rewards/margins": s[4],
                "logps/chosen": s[5],
                "logps/rejected": s[6],
                "train/sft_nll": s[7],
                "train/kto_reference_point": s[8],
                "train/grad_norm": grad_norm,
                "train/lr": scheduler.get_last_lr()[0],
                "train/skipped_steps": skipped_steps,
                "perf/sequences_per_sec": dist.sum(seqs) / max(time.time() - t0, 1e-9),
            }
            if kto:  # rewards of desirable / undesirable examples; accuracies and margins do not apply
                for key in ("rewards/accuracies", "rewards/margins", "train/sft_nll"):
                    metrics.pop(key)
            else:
                metrics.pop("train/kto_reference_point")
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
                metrics |= evaluate(model, evals.records, eval_ref, args, dist, tokenizer.pad_token_id, kto)
            tracker.log(metrics, step + 1, echo=False)
            bar.set_postfix(loss=f"{s[0]:.3f}")
            t0, seqs = time.time(), 0
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save(step + 1)
        stop.exit_if_requested(dist, lambda: save(step + 1), f"at step {step + 1}", args.output_dir, tracker)
    tracker.close_progress()

    # 7. final evaluation and export
    save(total_steps)
    final = evaluate(model, evals.records, eval_ref, args, dist, tokenizer.pad_token_id, kto) | {
        "train/skipped_steps": skipped_steps
    }
    if demo_eval_on:
        result = demo_eval(model, tokenizer, dist, args.demo_eval_prompts, args.max_new_tokens)
        tracker.table("samples", ["prompt", "response", "score"], result.pop("samples"), total_steps)
        final |= result | {f"initial/{k}": v for k, v in initial.items()}
    tracker.log(final, total_steps)
    tracker.write_eval(final)
    if initial:
        tracker.print(
            f"ground truth ({args.demo_eval_prompts} held-out demo prompts): score {initial['eval/score']:.3f} -> "
            f"{final['eval/score']:.3f}, accuracy {initial['eval/accuracy']:.3f} -> {final['eval/accuracy']:.3f}"
        )
    tracker.print(f"saved {args.output_dir}")
    tracker.finish()
    cleanup(dist)
