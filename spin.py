"""Self-play fine-tuning (SPIN): the model learns to tell the gold demonstrations from its own generations.

SPIN (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
Algorithm 1) iterates from an SFT model p_0. At iteration t the current model p_t answers every SFT prompt x
with y' ~ p_t(.|x); then p_{t+1} is trained on the pairs (x, y = the gold response, y') to minimise
    l(lambda log p(y|x)/p_t(y|x) - lambda log p(y'|x)/p_t(y'|x)),   l(u) = log(1 + e^-u)
which is DPO's sigmoid loss (`dpo.py`) with beta = lambda, chosen = the gold, rejected = the model's own answer,
and the reference = the model at the start of the iteration. The fixed point is p = p_data: once the model's
answers cannot be told from the data's, the two log-ratios match and the gradient vanishes. `--loss-type hinge`
(another monotonically decreasing convex l, as the paper allows) and `ipo` (a squared error) swap the loss.

Where this file departs from the paper or makes a choice it leaves open:
- The reference is fixed within an iteration, so its log-probs are computed once, by the policy itself before
  its first update, and saved with the iteration's pairs in output_dir/pairs/iter_k.pt. No reference copy is held.
- A pair whose generation equals the gold (as text) has Delta = 0 at every step and teaches nothing; it is
  dropped and counted (`spin/dropped_pairs`).
- Each iteration is a fresh fine-tuning run from the previous iteration's weights: new AdamW moments, a new
  warmup + decay schedule and a new data order, as separate per-iteration training runs would have.
- `--mix-previous` adds the previous iteration's pairs (gold vs the previous model's answers) to the current
  ones, as the paper's experiments do; the reference for both is the current iteration's start model.
- Generations are decoded to text and rendered with the chat template like the gold, so chosen and rejected
  end the same way (a generation cut by --max-new-tokens gets the template's end-of-turn too).
- `--num-prompts` takes the first N SFT rows (the paper samples 50k of UltraChat's 200k).
- The default loss is IPO's squared error, (Delta - 1/(2 beta))^2, not the paper's logistic loss
  (`--loss-type sigmoid`): it pulls the margin to a fixed target instead of pushing it up without end, and on the
  demo task it was the only loss whose first iteration beat the start model beyond noise, once (one iteration from
  one SFT model: ipo +0.027 +- 0.021, sigmoid +0.008 +- 0.025, hinge -0.029 +- 0.027); from three later SFT
  models (three seeds) it stays within noise of the start model.

Defaults: the ipo loss (a departure: see above), 8192 prompts, 128 pairs per optimizer step, lr 1e-4, beta 0.5,
temperature 1, one epoch per iteration.
On the demo task SPIN does not beat plain SFT continued on the same gold answers, at any setting tried: at the
defaults its iterations stay within noise of the start model on three SFT seeds (-0.019..+0.014), and the reason is
measured: at the start of an iteration the self-play half of the gradient has expectation zero (the answers are
the model's own samples), so the expected update is SFT's on the gold, plus noise (bench/results/spin_experiments.md,
docs/spin.md). `gap/*` logs how far the model's sampled answers are from the gold (demo task).

Outputs: output_dir/iter_k/ (the model after iteration k) and output_dir/ (the final model), both
`save_pretrained` directories; eval.json holds the held-out ground truth per iteration (`iter_k/eval/score`,
`iter_k/eval/accuracy`, ...) next to the start model's (`initial/eval/score`, ...).

Run (no flags: from out/sft on 8192 demo SFT prompts, 2 iterations, ~5 minutes on 2 CPU cores):
    python sft.py && python spin.py
    python spin.py --iterations 3 --mix-previous --num-prompts 4096
    torchrun --nproc_per_node 2 spin.py
    python spin.py --resume                     # continue from out/spin/trainer_state (within or across iterations)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

from common import checkpoint, data, lora
from common.dist import autocast, cleanup, init_distributed, reshard, sampling_generator, seed_everything, wrap_model
from common.generation import demo_eval, generate, paired_difference
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

LossType = Literal["sigmoid", "hinge", "ipo"]


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "spin"
    """name of the run (wandb run name)"""
    seed: int = 1
    """seed for data order and sampling"""
    output_dir: str = "out/spin"
    """where the final model (save_pretrained), iter_k/, pairs/, trainer_state/, metrics.jsonl and eval.json are written"""
    resume: bool = False
    """continue from output_dir/trainer_state (within an iteration or at the start of the next one)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "plainalign"
    """wandb project name"""

    # --- model and data ---
    model_path: str = "out/sft"
    """model to start from, normally the SFT model (HF causal LM directory or hub id)"""
    data: str = "demo"
    """SFT rows (messages, or prompt + completion; gold = the last assistant turn); `demo` = the built-in task"""
    eval_data: str | None = None
    """held-out SFT rows; default: the last --eval-size rows of --data"""
    eval_size: int = 128
    """rows held out from --data when --eval-data is not given"""
    num_prompts: int = 8192
    """SFT rows used (the first N of --data; 0 = all); each iteration answers every one of their prompts"""
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
    """peak learning rate (AdamW), restarted every iteration"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)"""
    lr_schedule: Schedule = "cosine"
    """decay after warmup, within each iteration"""
    warmup_steps: int = 2
    """linear warmup steps at the start of each iteration"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 = off)"""

    # --- batch sizes (local_ = per rank) ---
    local_micro_batch_size: int = 64
    """pairs per forward/backward on each rank"""
    gradient_accumulation_steps: int = 2
    """micro-batches per optimizer step"""
    epochs_per_iteration: float = 1.0
    """passes over the iteration's pairs; ignored when --steps-per-iteration > 0"""
    steps_per_iteration: int = 0
    """optimizer steps per iteration (0 = derived from --epochs-per-iteration)"""
    local_generation_batch_size: int = 256
    """prompts per generation batch on each rank"""

    # --- method ---
    iterations: int = 2
    """SPIN iterations: generate with the current model, then train gold-vs-generation with it as reference"""
    loss_type: LossType = "ipo"
    """sigmoid = the paper's logistic loss; hinge and ipo: other losses of the DPO family (see preference_loss).
    ipo is the default: on the demo task it was the only loss that beat the start model beyond noise, once, and it
    stays within noise of it from three SFT seeds (bench/results/spin_experiments.md)"""
    beta: float = 0.5
    """lambda of the paper: strength of the KL regularisation toward the iteration's start model"""
    mix_previous: bool = False
    """also train on the previous iteration's pairs (gold vs the previous model's generations), as in the paper"""
    num_generations: int = 1
    """self-play answers per prompt, each paired with the prompt's gold (k pairs per prompt: the push-down is
    averaged over k draws of the model's answer instead of one)"""
    temperature: float = 1.0
    """sampling temperature of the self-play generations (0 = greedy)"""
    top_k: int = 0
    """sample among the k most likely tokens (0 = all)"""
    top_p: float = 1.0
    """nucleus sampling mass (1 = off)"""
    max_new_tokens: int = 64
    """tokens generated per response (self-play generations and the demo-task evaluation)"""

    # --- evaluation and logging ---
    log_every: int = 4
    """steps between metric logs"""
    eval_every: int = 0
    """steps between evaluations on held-out (gold, generation) pairs (0 = only at the end of each iteration)"""
    save_every: int = 0
    """steps between checkpoints (0 = only at the end of each iteration)"""
    demo_eval_prompts: int = 1024
    """held-out demo-task prompts graded at the start and after each iteration (0 = off; only with --data demo)"""
    gap_prompts: int = 1024
    """with --data demo: the model's sampled answers to the first N training prompts are graded against their gold
    at the start and after each iteration (gap/*: how far the model is from the data; 0 = off)"""
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and implicit rewards of gold (chosen) and generation (rejected) (B,), detached.

    With rho = log p_theta - log p_t (p_t = the model at the start of the iteration) and
    Delta = rho_gold - rho_generated:
        sigmoid  l(beta Delta), l(u) = log(1 + e^-u) = -log sigmoid(u)   (the paper's logistic loss, lambda = beta)
        hinge    max(0, 1 - beta Delta)
        ipo      (Delta - 1 / (2 beta))^2
    Rewards are beta * rho. Example: log p_theta = -1 (gold), -3 (generated); log p_t = -2, -2; beta = 0.5:
    rho = +1, -1, Delta = 2, sigmoid loss = log(1 + e^-1) = 0.3132617, rewards +0.5 and -0.5.
    """
    chosen_rho = policy_chosen_logps - ref_chosen_logps
    rejected_rho = policy_rejected_logps - ref_rejected_logps
    delta = chosen_rho - rejected_rho
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, (beta * chosen_rho).detach(), (beta * rejected_rho).detach()


def split_gold(messages: list[dict], context: str) -> tuple[list[dict], str]:
    """(prompt, gold) of an SFT conversation: the gold is the last assistant turn, the prompt every turn before it.

    Turns after the last assistant turn have no answer to imitate and are dropped.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        raise data.DataError(f"{context}, field 'messages': no prompt turn before the last assistant turn")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]  # SteerLM attributes dropped
    return prompt, messages[last]["content"]


def build_pairs(
    records: list[dict], generations: list[str], iteration: int, previous: list[dict] | None = None
) -> tuple[list[dict], int]:
    """(prompt, chosen = gold, rejected = generation) pairs of this iteration, then `previous` (with
    --mix-previous: the last iteration's pairs, which keep their older generations), and how many of this
    iteration's were dropped because the generation equals the gold (compared as whitespace-stripped text).

    With k generations per record (`generations` holds record 0's k answers, then record 1's, ...), each answer
    makes its own pair with the record's gold.
    """
    if len(generations) % max(len(records), 1) or (generations and not records):
        raise ValueError(f"{len(generations)} generations for {len(records)} records: not k per record")
    k = len(generations) // max(len(records), 1)
    pairs, dropped = [], 0
    for record, generated in zip((r for r in records for _ in range(k)), generations, strict=True):
        if generated.strip() == record["gold"].strip():
            dropped += 1
            continue
        pairs.append(
            {
                "prompt": record["prompt"],
                "chosen": record["gold"],
                "rejected": generated,
                "row": record["row"],
                "iteration": iteration,
            }
        )
    return pairs + list(previous or []), dropped


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


@torch.no_grad()
def generate_responses(
    model, prompt_ids: list[list[int]], tokenizer, args: Args, dist, generator: torch.Generator
) -> list[str]:
    """One sampled answer (text, special tokens removed) per prompt, generated sharded and gathered on every rank.

    Prompts are padded with repeats to a multiple of world_size, so every rank generates the same number (the
    generation loop steps all ranks together); the repeats' answers are dropped after gathering.
    """
    n = len(prompt_ids)
    padded = prompt_ids + prompt_ids[: (-n) % dist.world_size]
    responses = generate(model, dist.shard(padded), pad_id=tokenizer.pad_token_id,
                         eos_id=end_of_turn_ids(tokenizer, args.model_path),
                         max_new_tokens=args.max_new_tokens, dist=dist, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=generator, batch_size=args.local_generation_batch_size)  # fmt: skip
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [t for shard in dist.all_gather_object(texts) for t in shard][:n]


def self_play_gap(prompts: list[str], golds: list[str], answers: list[str]) -> dict:
    """How far the model's own answers are from the data's, graded by the demo task on the same prompts.

    gap/{gold,own}_{score,accuracy,verbosity}: means over the prompts; gap/verbosity_tv: the total-variation
    distance between the two answers' verbosity histograms (0 = the same style mix, 1 = disjoint). SPIN's fixed
    point is own == gold on every one of these.
    """
    from common import demo_task

    if not prompts:
        return {}
    gold = [demo_task.grade(p, g) for p, g in zip(prompts, golds, strict=True)]
    own = [demo_task.grade(p, a) for p, a in zip(prompts, answers, strict=True)]
    out = {}
    for name, grades in (("gold", gold), ("own", own)):
        for key, metric in (("score", "score"), ("correct", "accuracy"), ("verbosity", "verbosity")):
            out[f"gap/{name}_{metric}"] = sum(g[key] for g in grades) / len(grades)
    hist = [[sum(g["verbosity"] == v for g in grades) / len(grades) for v in range(5)] for grades in (gold, own)]
    out["gap/verbosity_tv"] = 0.5 * sum(abs(a - b) for a, b in zip(*hist))
    return out


@torch.no_grad()
def reference_logprobs(ref_model, items: list[dict], args: Args, dist, pad_id: int) -> torch.Tensor:
    """Reference log-probs (N, 2) of (chosen, rejected) for every pair, computed sharded and gathered on every rank."""
    n = len(items)
    if n == 0:
        return torch.zeros(0, 2)
    padded = items + items[: (-n) % dist.world_size]  # equal shards; the duplicates are dropped after gathering
    local = dist.shard(padded)
    out = []
    for mb in data.micro_batches(local, args.local_micro_batch_size):
        with autocast(dist):
            chosen, rejected, _ = pair_logprobs(ref_model, mb, pad_id, dist.device, average=False)
        out.append(torch.stack([chosen, rejected], dim=-1).float().cpu())
    gathered = dist.all_gather_object(torch.cat(out))
    return torch.cat(gathered)[:n]


def save_pairs(path: Path, payload: dict, dist) -> None:
    """Write an iteration's pairs and reference log-probs atomically (rank 0), so a resume reuses them."""
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
    dist.barrier()


def check_model_path(path: str) -> None:
    """The default start model is out/sft, which `python sft.py` writes: say so instead of a hub lookup error."""
    if not Path(path).exists() and (path == Args.model_path or path.startswith(("/", "./", "../"))):
        hint = "build it first with `python sft.py` (~4 min on 2 CPU cores), or pass --model-path"
        raise SystemExit(f"error: --model-path {path}: no such model directory; {hint}")


def iteration_table(initial: dict, results: dict[int, dict]) -> str:
    """A plain-text table: one row for the start model, one per iteration, the metrics a reader compares."""
    columns = ["spin/pairs", "spin/dropped_pairs", "train/loss", "rewards/accuracies", "eval/rewards/accuracies",
               "eval/score", "eval/score_gain", "eval/score_gain_se", "eval/accuracy", "eval/verbosity",
               "gap/own_accuracy", "gap/own_verbosity", "gap/verbosity_tv", "spin/iteration_seconds"]  # fmt: skip

    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    rows = [["iteration", *columns], ["initial", *(cell(initial.get(c, "")) for c in columns)]]
    rows += [[str(k), *(cell(r.get(c, "")) for c in columns)] for k, r in sorted(results.items())]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) + 1)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


@torch.no_grad()
def evaluate(model, items: list[dict], ref_logps: torch.Tensor, args: Args, dist, pad_id: int) -> dict:
    """Held-out (gold, generation) metrics: eval/rewards/{chosen,rejected,accuracies,margins}, eval/loss."""
    model.eval()
    n = len(items) - len(items) % dist.world_size
    if n == 0:
        model.train()
        return {}
    per_rank = n // dist.world_size
    local, local_ref = dist.shard(items[:n]), ref_logps[dist.rank * per_rank : (dist.rank + 1) * per_rank]
    total = torch.zeros(6, dtype=torch.float64, device=dist.device)
    for k, mb in enumerate(data.micro_batches(local, args.local_micro_batch_size)):
        ref = local_ref[k * args.local_micro_batch_size : k * args.local_micro_batch_size + len(mb)].to(dist.device)
        with autocast(dist):
            chosen, rejected, _ = pair_logprobs(model, mb, pad_id, dist.device, average=False)
        losses, rc, rr = preference_loss(
            chosen.float(), rejected.float(), ref[:, 0], ref[:, 1], args.loss_type, args.beta
        )
        total += torch.stack(
            [
                losses.sum(),
                rc.sum(),
                rr.sum(),
                (rc > rr).sum(),
                (rc - rr).sum(),
                torch.tensor(len(mb), device=dist.device),
            ]
        ).double()
    dist.all_reduce(total)
    model.train()
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
    if args.num_generations < 1:
        raise SystemExit(f"--num-generations must be at least 1, got {args.num_generations}")
    dist = init_distributed(args.mixed_precision)
    seed_everything(args.seed)
    stop = StopSignal()
    generator = sampling_generator(args.seed, dist)  # per rank: ranks answer different prompts with different draws

    # 1. the policy and tokenizer; no reference copy (its log-probs are computed once per iteration, step 4b)
    check_model_path(args.model_path)
    tokenizer = load_tokenizer(args.model_path, chat_template=args.chat_template)
    model = load_causal_lm(args.model_path, dist.device, attn_implementation=args.attn_implementation,
                           vocab_size=len(tokenizer))  # fmt: skip
    model = lora.apply_lora(model, args.lora)  # --lora-r > 0: only adapters are trained
    model = wrap_model(model, dist, activation_checkpointing=args.activation_checkpointing)

    # 2. data: SFT rows -> (prompt, gold); errors name file, row and field
    data_path = data.resolve_data_path(args.data, "sft", dist)
    parsed, eval_parsed, eval_source = data.load_train_eval(
        data_path, args.eval_data, args.eval_size, data.parse_sft, args.skip_bad_rows, args.split, args.eval_split
    )
    if args.num_prompts:
        parsed.records = parsed.records[: args.num_prompts]

    def tok(record, context):
        prompt, gold = split_gold(record["messages"], context)
        # --prompt-truncation left: `prompt` becomes the turns kept, so the pairs render what the model saw
        prompt, full_prompt_ids, cut = data.fit_prompt(
            tokenizer, prompt, args.max_prompt_len, context, args.prompt_truncation, "messages"
        )
        prompt_ids = full_prompt_ids[cut:]
        if len(prompt_ids) >= args.max_seq_len:
            raise data.DataError(
                f"{context}: the prompt ({len(prompt_ids)} tokens) leaves no room for a response in {args.max_seq_len}"
            )
        data.tokenize_response(tokenizer, prompt, full_prompt_ids, gold, context)  # the gold renders (checked here)
        return {"prompt": prompt, "gold": gold, "prompt_ids": prompt_ids, "row": record["row"]}

    def tok_pair(pair, source):
        context = f"{source}: row {pair['row']}"
        return data.tokenize_pair(
            tokenizer, pair, args.max_seq_len, args.max_prompt_len, context, args.prompt_truncation
        )

    train, evals = data.tokenize_train_eval(parsed, eval_parsed, eval_source, tok, args)

    # 3. batch sizes, optimiser, resume (the schedule is made per iteration, its length depends on the pairs)
    global_batch_size = args.local_micro_batch_size * args.gradient_accumulation_steps * dist.world_size
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay)
    scheduler = None
    start_iteration, start_step, global_step, skipped_steps, initial, results = 1, 0, 0, 0, {}, {}
    initial_scores = []  # the start model's per-prompt ground truth, for the paired gain of each iteration
    pairs_ready = False  # resuming inside an iteration whose pairs (and reference log-probs) are saved
    if args.resume:
        state = checkpoint.load_trainer_state(
            args.output_dir, dist, {"model": model}, {"model": optimizer}, {"sampling": generator}
        )
        start_iteration, start_step, global_step = state["iteration"], state["iteration_step"], state["step"]
        skipped_steps, initial, results = state["skipped_steps"], state["initial"], state["results"]
        initial_scores = state.get("initial_scores", [])
        pairs_ready = state["pairs_ready"]
    tracker = make_tracker(
        dist, args.output_dir, args, args.track, args.wandb_project, global_step if args.resume else -1
    )
    tracker.print(f"resolved args: {args}")
    tracker.print(
        f"world_size={dist.world_size} global_batch_size={global_batch_size} iterations={args.iterations} "
        f"prompts={len(train.records)} eval={len(evals.records)} skipped_rows={parsed.skipped + train.skipped} "
        f"reference=the model at the start of each iteration (log-probs computed once per iteration) "
        f"start_iteration={start_iteration} start_step={start_step}"
    )
    for line in data.skip_report(parsed, train, eval_parsed, evals):
        tracker.print(line)

    def save(iteration: int, iteration_step: int, iteration_stats: torch.Tensor, pairs_ready: bool) -> None:
        """`pairs_ready`: the iteration's pairs are saved and the sampling generator has moved past them."""
        extra = {"step": global_step, "iteration": iteration, "iteration_step": iteration_step, "pairs_ready": pairs_ready,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None, "skipped_steps": skipped_steps,
                 "initial": initial, "results": results, "iteration_stats": iteration_stats.cpu(),
                 "initial_scores": initial_scores}  # fmt: skip
        reshard(model)
        checkpoint.save_trainer_state(
            args.output_dir, dist, {"model": model}, {"model": optimizer}, extra, {"sampling": generator}
        )
        checkpoint.export_pretrained(model, tokenizer, args.output_dir, dist)

    def stop_now(where: str) -> None:
        stop.exit(dist, where, args.output_dir, tracker)

    demo_eval_on = args.demo_eval_prompts > 0 and args.data == "demo"
    if demo_eval_on and not args.resume:
        initial = demo_eval(model, tokenizer, dist, args.demo_eval_prompts, args.max_new_tokens, per_prompt=True)
        initial.pop("samples")
        initial_scores = initial.pop("scores")
        tracker.log({f"initial/{k}": v for k, v in initial.items()}, 0, echo=False)
        tracker.print(f"start: eval/score={initial['eval/score']:.3f} eval/accuracy={initial['eval/accuracy']:.3f}")

    gap_records = train.records[: args.gap_prompts] if args.data == "demo" else []

    def measure_gap() -> dict:
        """gap/*: sampled answers (--temperature, ...) to the first --gap-prompts training prompts vs their gold."""
        if not gap_records:
            return {}
        g = torch.Generator(device=dist.device)  # its own stream: the self-play samples are the same with or without
        g.manual_seed(args.seed * 1000 + 997 + dist.rank)
        answers = generate_responses(model, [r["prompt_ids"] for r in gap_records], tokenizer, args, dist, g)
        prompts = [r["prompt"][-1]["content"] for r in gap_records]
        return self_play_gap(prompts, [r["gold"] for r in gap_records], answers)

    if gap_records and not args.resume:
        initial |= measure_gap()
        tracker.log({f"initial/{k}": v for k, v in initial.items() if k.startswith("gap/")}, 0, echo=False)
        tracker.print(
            "data vs model on the first {} training prompts: accuracy {:.3f} vs {:.3f}, verbosity {:.2f} vs {:.2f}, "
            "verbosity TV {:.3f}".format(len(gap_records), *(initial[f"gap/{k}"] for k in (
                "gold_accuracy", "own_accuracy", "gold_verbosity", "own_verbosity", "verbosity_tv")))
        )  # fmt: skip

    pairs_dir = Path(args.output_dir) / "pairs"
    prompt_ids, eval_prompt_ids = [r["prompt_ids"] for r in train.records], [r["prompt_ids"] for r in evals.records]
    previous = []  # the last iteration's own pairs, for --mix-previous
    if args.mix_previous and start_iteration > 1 and start_iteration <= args.iterations:
        previous = torch.load(pairs_dir / f"iter_{start_iteration - 1}.pt", weights_only=False)["pairs"]

    # 4. SPIN iterations
    model.train()
    for iteration in range(start_iteration, args.iterations + 1):
        resumed = args.resume and iteration == start_iteration and pairs_ready
        pairs_file = pairs_dir / f"iter_{iteration}.pt"
        t_iter = time.time()

        # 4a. self-play: the current model answers every prompt; (gold, own answer) pairs. A resume inside the
        # iteration reuses the saved pairs: the model (and the sampling generator) have moved since.
        if resumed:
            saved = torch.load(pairs_file, weights_only=False)
            if saved["iteration"] != iteration:
                raise RuntimeError(f"--resume: {pairs_file} holds iteration {saved['iteration']}, expected {iteration}")
        else:
            try:
                k_prompt_ids = [p for p in prompt_ids for _ in range(args.num_generations)]  # a prompt's k in a row
                generations = generate_responses(model, k_prompt_ids, tokenizer, args, dist, generator)
                eval_generations = generate_responses(model, eval_prompt_ids, tokenizer, args, dist, generator)
            except FloatingPointError as e:  # NaN logits: every loss of the iteration would be NaN as well
                if not args.skip_nonfinite:
                    raise NonFiniteLoss(
                        f"non-finite loss at step {global_step} (NaN or Inf): {e} (generating iteration {iteration}'s "
                        "answers); pass --skip-nonfinite to skip such steps, or check the model"
                    ) from e
                tracker.print(f"iteration {iteration}: {e}; answers left empty, the steps will be skipped")
                generations = [""] * (len(prompt_ids) * args.num_generations)
                eval_generations = [""] * len(eval_prompt_ids)
            own, dropped = build_pairs(train.records, generations, iteration)
            eval_pairs, eval_dropped = build_pairs(evals.records, eval_generations, iteration)
            saved = {
                "iteration": iteration,
                "pairs": own,
                "dropped": dropped,
                "eval_pairs": eval_pairs,
                "eval_dropped": eval_dropped,
            }
        pairs = saved["pairs"] + (previous if args.mix_previous else [])
        items = [tok_pair(p, parsed.source) for p in pairs]
        eval_items = [tok_pair(p, eval_source) for p in saved["eval_pairs"]]
        tracker.print(
            f"iteration {iteration}: {len(train.records)} prompts -> {len(saved['pairs'])} pairs "
            f"({saved['dropped']} dropped: generation == gold)"
            + (
                f" + {len(pairs) - len(saved['pairs'])} from iteration {iteration - 1}"
                if previous and args.mix_previous
                else ""
            )
            + f", {time.time() - t_iter:.0f}s"
        )
        for p in saved["pairs"][:2]:
            tracker.print(f"  gold: {p['chosen'][:80]!r}\n  own:  {p['rejected'][:80]!r}")

        # 4b. reference = the model now, before this iteration's first update: log-probs once, saved with the pairs
        if resumed:
            ref, eval_ref = saved["ref"], saved["eval_ref"]
        else:
            ref = reference_logprobs(model, items, args, dist, tokenizer.pad_token_id)
            eval_ref = reference_logprobs(model, eval_items, args, dist, tokenizer.pad_token_id)
            save_pairs(pairs_file, saved | {"ref": ref, "eval_ref": eval_ref}, dist)

        # 4c. a fresh fine-tuning run on the pairs: new AdamW moments and schedule (restored when resuming)
        per_epoch = data.steps_per_epoch(len(items), global_batch_size)
        total_steps = args.steps_per_iteration or max(1, int(args.epochs_per_iteration * per_epoch))
        first_step = start_step if resumed else 0
        reshard(model)
        if first_step == 0:
            optimizer = make_optimizer(model, args.learning_rate, args.weight_decay)
        scheduler = make_scheduler(optimizer, args.lr_schedule, args.warmup_steps, total_steps)
        # sums over the iteration's pairs: loss, rewards/chosen, rewards/rejected, accuracies, margins, logps/chosen,
        # logps/rejected, count
        iteration_stats = torch.zeros(8, dtype=torch.float64, device=dist.device)
        if first_step > 0:
            scheduler.load_state_dict(state["scheduler"])
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr  # a new scheduler set the warmup's first lr; the restored step needs its own
            iteration_stats = state["iteration_stats"].to(dist.device)
        if stop.requested(dist):  # a signal during generation: keep the pairs, stop before the first update
            save(iteration, first_step, iteration_stats, pairs_ready=True)
            stop_now(f"at iteration {iteration} step {first_step}")
        bar = tracker.progress(total_steps, first_step, f"spin {iteration}/{args.iterations}")
        t0, seqs = time.time(), 0
        for step in range(first_step, total_steps):
            global_idx = data.step_indices(len(items), global_batch_size, step, args.seed * 1000 + iteration)
            idx = dist.shard(global_idx)
            local = [items[i] for i in idx]
            local_ref = ref[idx]
            stats = torch.zeros(8, dtype=torch.float64, device=dist.device)
            micro = data.micro_batches(list(range(len(local))), args.local_micro_batch_size)
            for k, mb_idx in enumerate(micro):
                mb = [local[i] for i in mb_idx]
                if dist.enabled:
                    model.set_requires_gradient_sync(k == len(micro) - 1)
                with autocast(dist):
                    mb_ref = local_ref[mb_idx].to(dist.device)
                    chosen_logps, rejected_logps, _ = pair_logprobs(
                        model, mb, tokenizer.pad_token_id, dist.device, average=False
                    )
                    losses, chosen_rewards, rejected_rewards = preference_loss(
                        chosen_logps.float(),
                        rejected_logps.float(),
                        mb_ref[:, 0],
                        mb_ref[:, 1],
                        args.loss_type,
                        args.beta,
                    )
                # mean over the global batch; FSDP averages over ranks, hence / local batch size
                (losses.sum() / len(local)).backward()
                stats += torch.stack([
                    losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                    (chosen_rewards > rejected_rewards).sum(), (chosen_rewards - rejected_rewards).sum(),
                    chosen_logps.detach().sum(), rejected_logps.detach().sum(), torch.tensor(len(mb), device=dist.device),
                ]).double()  # fmt: skip
                seqs += len(mb) * 2
            if nonfinite_step(stats[0], global_step, dist, args.skip_nonfinite):
                optimizer.zero_grad(set_to_none=True)
                skipped_steps += 1
                global_step += 1
                continue
            grad_norm = optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
            global_step += 1
            bar.update(1)
            dist.all_reduce(stats)  # once per update: the iteration's totals need every step
            iteration_stats += stats

            # 4d. log, evaluate, checkpoint
            if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
                s = (stats / global_batch_size).tolist()
                metrics = {
                    "train/loss": s[0],
                    "rewards/chosen": s[1],
                    "rewards/rejected": s[2],
                    "rewards/accuracies": s[3],
                    "rewards/margins": s[4],
                    "logps/chosen": s[5],
                    "logps/rejected": s[6],
                    "train/grad_norm": grad_norm,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/skipped_steps": skipped_steps,
                    "spin/iteration": iteration,
                    "spin/iteration_step": step + 1,
                    "perf/sequences_per_sec": dist.sum(seqs) / max(time.time() - t0, 1e-9),
                }
                if args.eval_every and (step + 1) % args.eval_every == 0:
                    metrics |= evaluate(model, eval_items, eval_ref, args, dist, tokenizer.pad_token_id)
                tracker.log(metrics, global_step, echo=False)
                bar.set_postfix(loss=f"{s[0]:.3f}")
                t0, seqs = time.time(), 0
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
                save(iteration, step + 1, iteration_stats, pairs_ready=True)
            if stop.requested(dist):
                save(iteration, step + 1, iteration_stats, pairs_ready=True)
                stop_now(f"at iteration {iteration} step {step + 1}")
        tracker.close_progress()

        # 4e. end of iteration: export iter_k, ground truth and held-out pairs, then checkpoint the boundary
        checkpoint.export_pretrained(model, tokenizer, Path(args.output_dir) / f"iter_{iteration}", dist)
        totals = (iteration_stats / iteration_stats[7].clamp(min=1)).tolist()
        result = {"spin/pairs": len(pairs), "spin/dropped_pairs": saved["dropped"], "train/loss": totals[0],
                  "rewards/accuracies": totals[3], "rewards/margins": totals[4]}  # fmt: skip
        result |= evaluate(model, eval_items, eval_ref, args, dist, tokenizer.pad_token_id)
        if demo_eval_on:
            ground_truth = demo_eval(model, tokenizer, dist, args.demo_eval_prompts, args.max_new_tokens,
                                     per_prompt=bool(initial_scores))  # fmt: skip
            tracker.table("samples", ["prompt", "response", "score"], ground_truth.pop("samples"), global_step)
            if initial_scores:  # gain over the start model on the same prompts, with its standard error
                gain, gain_se = paired_difference(ground_truth.pop("scores"), initial_scores)
                ground_truth |= {"eval/score_gain": gain, "eval/score_gain_se": gain_se}
            result |= ground_truth
        result |= measure_gap()
        result["spin/iteration_seconds"] = time.time() - t_iter
        results[iteration] = result
        tracker.log(
            result | {"spin/iteration": iteration} | {f"iter_{iteration}/{k}": v for k, v in result.items()},
            global_step,
            echo=False,
        )
        tracker.print(
            f"iteration {iteration} done: "
            + " ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float))
        )
        previous = saved["pairs"]
        save(iteration + 1, 0, torch.zeros(8, dtype=torch.float64), pairs_ready=False)
        if stop.requested(dist):
            stop_now(f"at the end of iteration {iteration}")

    # 5. final export, eval.json, per-iteration table
    checkpoint.export_pretrained(model, tokenizer, args.output_dir, dist)
    final = {"train/skipped_steps": skipped_steps}
    if results:
        final |= results[max(results)]
    for k, result in sorted(results.items()):
        final |= {f"iter_{k}/{name}": v for name, v in result.items()}
    final |= {f"initial/{k}": v for k, v in initial.items()}
    tracker.write_eval(final)
    tracker.print("per iteration (eval/*: greedy answers to held-out demo prompts, graded by the task):")
    tracker.print(iteration_table(initial, results))
    tracker.print(f"saved {args.output_dir} (and iter_1 .. iter_{args.iterations})")
    tracker.finish()
    cleanup(dist)
