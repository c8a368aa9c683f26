"""Knowledge distillation: a student learns a teacher's token distributions, offline or on-policy.

Two modes (`--mode`), one loss family: per-token divergences between the teacher's and the student's next-token
distributions, summed over response tokens and averaged over the tokens of the global batch.

    offline    NeMo-Aligner's SFT with knowledge distillation. Stage 1 (`--offline-stage topk`) runs the teacher
               over the SFT rows once and stores, for every response token, its top-K token ids and log-probs
               (`--top-k`, 64) in a compact cache (int32 ids + fp16 log-probs, streamed to disk per rank, swapped in
               atomically, keyed by a hash of the teacher's weights, the token ids and the settings: a stale cache is
               never used). Stage 2 (`--offline-stage train`) trains the student on
                   kd_weight x KL on the top-K support (`kernels.topk_kl`) + sft_weight x NLL of the data's tokens
               and never loads the teacher. `--kd-loss fwd_kl` is KL(teacher || student) (NeMo-Aligner's default),
               `rev_kl` KL(student || teacher); `--topk-mass renorm` renormalises both over the K ids (the mass
               outside them is dropped: NeMo-Aligner's default), `tail` keeps it as a (K+1)-th bucket (its "K+1").
               The default `both` computes the cache when it is missing or stale, frees the teacher, then trains.
    on_policy  The student samples a response to each prompt (`common.generation.generate`, randomness keyed by
               (seed, step, prompt position): the same samples on any number of processes), the teacher scores
               every token of it, and the student minimises the per-token reverse KL(student || teacher), exact
               over the whole vocabulary (`kernels.full_kl`) or on the teacher's top K (`--on-policy-kl topk`) (Agarwal
               et al. 2024, GKD; Lu & Thinking Machines 2025, "On-Policy Distillation"). With `--lmbda` < 1 a step
               uses the data's responses instead with probability 1 - lmbda (GKD's mix of on- and off-policy data,
               decided per step as in GKD's algorithm 1). `--jsd-beta` replaces the KL by GKD's generalised
               Jensen-Shannon divergence JSD(beta) = beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S
               (T teacher, S student; beta -> 0 approaches forward KL, beta = 1 is reverse KL; the TRL convention).

Teacher and student may differ in size but must share the tokenizer (vocabulary, special tokens, chat template):
the losses compare distributions token id by token id, so a mismatch is an error, not a warning.
Departures: the KD temperature divides both models' logits and the loss is not multiplied by T^2 (NeMo-Aligner
does not either); JSD is plain PyTorch and materialises (N, V) fp32 log-softmaxes (the KLs do not); no packing.

Run (no flags: on-policy, student out/sft_student, teacher out/grpo, demo prompts; 19 min on a busy shared CPU):
    python sft.py --model-path demo:2 --output-dir out/sft_student     # the student: the demo base, 2 of 4 layers
    python distill.py                                                   # on-policy distillation -> out/distill
    python distill.py --mode offline --output-dir out/distill_offline   # top-K cache, then offline KD
    python distill.py --mode offline --offline-stage topk               # stage 1 only (loads the teacher)
    python distill.py --lmbda 0.5 --jsd-beta 0.5                        # GKD's defaults in TRL
    torchrun --nproc_per_node 2 distill.py                              # FSDP2; the same samples and losses
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro

from common import checkpoint, data, lora
from common.dist import autocast, cleanup, init_distributed, seed_everything, wrap_model
from common.generation import (
    clock,
    demo_eval,
    generate,
    never_sampled,
    paired_difference,
    sample_key,
    sequence_inputs,
    truncate_after_eos,
)
from common.lora import LoraArgs
from common.models import end_of_turn_ids, load_causal_lm, load_tokenizer, resolve_model_path, weights_fingerprint
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
from kernels import full_kl, selective_logprob, topk_kl, topk_of


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "distill"
    """name of the run (wandb run name)"""
    seed: int = 1
    """seed for data order and sampling"""
    output_dir: str = "out/distill"
    """where the student (save_pretrained), trainer_state/, metrics.jsonl, eval.json (and the top-K cache) go"""
    resume: bool = False
    """continue from output_dir/trainer_state (student, optimizer, scheduler, RNG, data position)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "plainalign"
    """wandb project name"""

    # --- models and data ---
    model_path: str = "out/sft_student"
    """the student to train (HF causal LM directory or hub id; `demo:L` = the demo base cut to its first L layers)"""
    teacher_path: str = "out/grpo"
    """the frozen teacher; it must use the student's tokenizer"""
    data: str = "demo"
    """SFT rows (messages, or prompt + completion): offline, the responses the teacher grades; on-policy, the
    prompts (and, with --lmbda < 1, the off-policy responses); `demo` = the built-in task"""
    eval_data: str | None = None
    """offline: held-out SFT rows for eval/kd_loss; default: the last --eval-size rows of --data"""
    eval_size: int = 256
    """offline: rows held out from --data for eval/kd_loss when --eval-data is not given"""
    max_rows: int = 0
    """use only the first N training rows of --data (0 = all; rows past them are never read): the offline cache
    covers only these"""
    max_seq_len: int = 128
    """tokens per example (longer examples are truncated on the right)"""
    max_prompt_len: int = 64
    """on-policy: longest prompt accepted (longer: see --prompt-truncation)"""
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
    """attention kernel of the HF models"""
    mixed_precision: Literal["auto", "bf16", "off"] = "auto"
    """bf16 compute, fp32 master weights: `auto` = bf16 on CUDA, fp32 on CPU; `bf16` also on CPU; `off` = fp32"""
    chat_template: str | None = None
    """`chatml`, `llama3`, `plain` or a Jinja file; overrides both models' own template (base models have none)"""

    lora: tyro.conf.OmitArgPrefixes[LoraArgs] = field(default_factory=LoraArgs)
    """LoRA adapters on the student instead of full fine-tuning: --lora-r > 0 (common/lora.py, docs/lora.md)"""

    # --- optimiser ---
    learning_rate: float = 1e-3
    """peak learning rate (AdamW); on the demo (on-policy, from the SFT student) 1e-3 beat 5e-4 (ground truth 0.632 vs
    0.619; bench/results/distill_demo.md)"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)"""
    lr_schedule: Schedule = "cosine"
    """decay after warmup (offline on the demo: cosine 0.543, constant 0.453, both at 5e-4)"""
    warmup_steps: int = 10
    """linear warmup steps"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 = off)"""

    # --- batch sizes (local_ = per rank; global = local x accumulation x ranks) ---
    local_micro_batch_size: int = 32
    """examples (offline) or prompts, one sample each (on-policy) per forward/backward on each rank"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    total_steps: int = 300
    """optimizer steps"""

    # --- method ---
    mode: Literal["on_policy", "offline"] = "on_policy"
    """on_policy: the student samples, the teacher grades every token live; offline: cached teacher top-K on the
    data's responses"""
    temperature: float = 1.0
    """KD temperature: both models' logits are divided by it in the loss (the offline cache is keyed by it)"""
    top_k: int = 64
    """teacher tokens kept per position: the offline cache, and the on-policy loss with --on-policy-kl topk"""
    topk_mass: Literal["renorm", "tail"] = "renorm"
    """the teacher's mass outside its top K: `renorm` drops it (both distributions renormalised over the K ids;
    tokens outside them get no gradient); `tail` keeps it as one (K+1)-th bucket, 1 - sum of the K probabilities,
    for the teacher and the student (whose K probabilities are normalised over the whole vocabulary)"""
    kd_loss: Literal["fwd_kl", "rev_kl"] = "fwd_kl"
    """offline divergence on the top-K support: fwd_kl = KL(teacher || student), rev_kl = KL(student || teacher)"""
    kd_weight: float = 1.0
    """offline: weight of the KD loss"""
    sft_weight: float = 0.0
    """offline: weight of the NLL of the data's own tokens (0: the teacher alone; the demo rows contain wrong
    answers)"""
    offline_stage: Literal["both", "topk", "train"] = "both"
    """topk: only compute the teacher's top-K cache (stage 1); train: only train from it (stage 2, never loads the
    teacher; an error when the cache is missing or stale); both: stage 1 when needed, then stage 2"""
    cache_dir: str | None = None
    """offline: the top-K cache directory (default: output_dir/teacher_topk)"""
    on_policy_kl: Literal["full", "topk"] = "full"
    """on-policy reverse KL(student || teacher): exact over the vocabulary (kernels.full_kl) or on the teacher's top
    K (kernels.topk_kl, --topk-mass)"""
    lmbda: float = 1.0
    """on-policy: probability that a step trains on the student's own samples; otherwise on the data's responses
    (GKD's lambda; 1 = purely on-policy)"""
    jsd_beta: float | None = None
    """on-policy: use GKD's generalised JSD(beta) instead of the reverse KL (0 < beta <= 1; plain PyTorch, (N, V)
    fp32 temporaries)"""
    sampling_temperature: float = 0.7
    """on-policy: temperature of the student's samples; on the demo (greedy evaluation) 0.7 with a cosine schedule gave
    0.619 where 1.0 with a constant rate gave 0.562 (two changes at once; bench/results/distill_demo.md)"""
    response_length: int = 64
    """on-policy: maximum new tokens per sample; also the demo evaluation's generation length"""

    # --- evaluation and logging ---
    log_every: int = 10
    """steps between metric logs"""
    eval_every: int = 0
    """steps between demo-task evaluations (and offline eval/kd_loss) (0 = only at the start and end)"""
    save_every: int = 100
    """steps between checkpoints (0 = only at the end)"""
    demo_eval_prompts: int = 1024
    """held-out demo-task prompts graded at the start and end (0 = off; only with --data demo)"""
    skip_nonfinite: bool = False
    """skip steps whose loss is NaN/Inf (counted as train/skipped_steps) instead of stopping"""
    activation_checkpointing: bool = False
    """recompute activations in backward (less memory, more compute)"""


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (tested one by one in tests/test_distill.py)
# ---------------------------------------------------------------------------------------------------------------


def check_same_tokenizer(student, teacher, student_path: str, teacher_path: str) -> None:
    """Raise a one-line error unless student and teacher tokenize the same way: the same token -> id map, special
    token ids and chat template (the losses compare the two distributions id by id)."""
    problems = []
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:3]
        problems.append(f"vocabularies differ ({len(s_vocab)} vs {len(t_vocab)} tokens; e.g. {differ})")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(student, name) != getattr(teacher, name):
            problems.append(f"{name} {getattr(student, name)} vs {getattr(teacher, name)}")
    if student.chat_template != teacher.chat_template:
        problems.append("chat templates differ (pass --chat-template to give both the same)")
    if problems:
        raise ValueError(
            f"teacher {teacher_path} and student {student_path} must share the tokenizer: " + "; ".join(problems)
        )


def label_positions(example: dict) -> list[int]:
    """Positions t of `input_ids` whose next token carries a label: the rows of the teacher's top-K cache."""
    return [t for t, label in enumerate(example["labels"][1:]) if label != data.IGNORE_INDEX]


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float):
    """GKD's JSD(beta) per position (...,): beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S.

    beta = 1 is KL(S || T) exactly; small beta approaches beta x KL(T || S). Plain PyTorch: (..., V) fp32.
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"--jsd-beta must be in (0, 1], got {beta}")
    # floored: a masked token (-inf: the pad) has p = 0 in both, and -inf - -inf in the mixture would be NaN
    s = torch.log_softmax(student_logits.float() / temperature, -1).clamp(min=-1e4)
    t = torch.log_softmax(teacher_logits.float() / temperature, -1).clamp(min=-1e4)

    def kl(logp, logq):  # sum p (log p - log q), 0 where p == 0 (masked vocabulary entries)
        p = logp.exp()
        return (p * (logp - logq).masked_fill(p == 0, 0.0)).sum(-1)

    if beta == 1.0:
        return kl(s, t)
    m = torch.logsumexp(torch.stack([s + torch.log1p(torch.tensor(-beta)), t + torch.log(torch.tensor(beta))]), 0)
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def response_logits(model, queries: torch.Tensor, responses: torch.Tensor, pad_id: int, vocab: int) -> torch.Tensor:
    """Logits (B, T, V) of the positions that predict the response tokens, under the distribution generation samples
    from (the pad token at -inf), cut to the tokenizer's `vocab` ids (teacher and student may pad their embeddings
    differently)."""
    P, T = queries.shape[1], responses.shape[1]
    positions = torch.arange(P - 1, P - 1 + T, device=queries.device)  # (T,)
    logits = model(**sequence_inputs(queries, responses, pad_id), logits_to_keep=positions).logits
    logits = logits if logits.shape[-1] == vocab else logits[..., :vocab]
    return never_sampled(logits, pad_id)


def on_policy_token_losses(student_logits, teacher_logits, args: Args) -> torch.Tensor:
    """Per-token divergence (B, T) of the student from the teacher on the same positions."""
    if args.jsd_beta is not None:
        return generalized_jsd(student_logits, teacher_logits, args.jsd_beta, args.temperature)
    if args.on_policy_kl == "full":
        return full_kl(student_logits, teacher_logits.detach(), args.temperature)  # KL(student || teacher)
    ids, teacher_logprobs = topk_of(teacher_logits, args.top_k, args.temperature)
    return topk_kl(student_logits, ids, teacher_logprobs, args.temperature, "rev_kl", args.topk_mass)


def offline_loss_sums(model, batch: dict, ids, teacher_logprobs, args: Args, device, vocab: int):
    """Summed losses of a micro-batch: (kd_weight x KD + sft_weight x NLL, KD, NLL), each summed over label tokens.

    `ids`/`teacher_logprobs` (B, T-1, K) hold the cached teacher top-K at every position whose next token is
    labelled, -100 / 0 elsewhere (those positions have KL 0)."""
    logits = model(**data.model_inputs(batch, model, device)).logits[:, :-1]  # (B, T-1, V): t predicts t+1
    logits = logits if logits.shape[-1] == vocab else logits[..., :vocab]
    kd = topk_kl(logits, ids.to(device), teacher_logprobs.to(device), args.temperature, args.kd_loss, args.topk_mass)
    kd_sum = kd.sum()
    nll_sum = torch.zeros((), device=device)
    if args.sft_weight > 0:
        nll_sum = -selective_logprob(logits, batch["labels"][:, 1:].to(device)).sum()
    return args.kd_weight * kd_sum + args.sft_weight * nll_sum, kd_sum.detach(), nll_sum.detach()


# ---------------------------------------------------------------------------------------------------------------
# The teacher's top-K cache: meta.json + per-rank parts of int32 ids and fp16 log-probs, (rows, K) each
# ---------------------------------------------------------------------------------------------------------------

CACHE_VERSION = 1


def cache_key(weights: str, examples: list[dict], args: Args, precision: str) -> str:
    """sha256 of what the cached numbers depend on: the teacher's weights (their content), the exact token ids and
    labels of every example, K, the temperature, the compute precision and attention kernel."""
    settings = {"version": CACHE_VERSION, "weights": weights, "top_k": args.top_k, "temperature": args.temperature,
                "precision": precision, "attn_implementation": args.attn_implementation}  # fmt: skip
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for e in examples:
        h.update(json.dumps([e["input_ids"], e["labels"]]).encode())
    return h.hexdigest()


class TopKCache:
    """Read side: the rows of example i (its label positions in order) from memory-mapped part files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.k = self.meta["top_k"]
        self.parts = []  # (first example, row offsets of its examples (n + 1,), ids, log-probs)
        for part in self.meta["parts"]:
            rows = part["rows"]
            ids = torch.from_file(str(self.path / part["ids"]), size=rows * self.k, dtype=torch.int32)
            lp = torch.from_file(str(self.path / part["logprobs"]), size=rows * self.k, dtype=torch.float16)
            offsets = torch.tensor([0] + part["example_rows"]).cumsum(0).tolist()
            self.parts.append((part["first_example"], offsets, ids.view(rows, self.k), lp.view(rows, self.k)))

    @property
    def key(self) -> str:
        return self.meta["key"]

    def rows(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (n, K) int64, log-probs (n, K) fp32) of example i."""
        for first, offsets, ids, lp in self.parts:
            if first <= i < first + len(offsets) - 1:
                a, b = offsets[i - first], offsets[i - first + 1]
                return ids[a:b].long(), lp[a:b].float()
        raise IndexError(f"{self.path}: no example {i} in the cache")


def open_cache(path: Path, key: str) -> TopKCache | None:
    """The cache at `path` if it is complete and was made for `key`, else None (missing or stale)."""
    if not (Path(path) / "COMPLETE").exists():
        return None
    cache = TopKCache(path)
    return cache if cache.key == key else None


@torch.no_grad()
def write_topk_cache(path: Path, key: str, teacher, examples: list[dict], args: Args, dist, pad_id: int, vocab: int):
    """Stage 1: every rank runs the teacher over its contiguous share of `examples`, streaming the top-K ids and
    log-probs of each label position to its own part files; the main process writes meta.json and COMPLETE and
    swaps the directory in (a kill mid-way leaves the previous cache or none, never a partial one)."""
    path = Path(path)
    tmp = checkpoint.staging_dir(path, dist)
    per_rank = -(-len(examples) // dist.world_size)
    first = dist.rank * per_rank
    local = examples[first : first + per_rank]
    example_rows = []
    names = {"ids": f"ids-{dist.rank:05d}.int32", "logprobs": f"logprobs-{dist.rank:05d}.fp16"}
    with open(tmp / names["ids"], "wb") as f_ids, open(tmp / names["logprobs"], "wb") as f_lp:
        for mb in data.micro_batches(local, args.local_micro_batch_size):
            batch = data.collate(mb, pad_id)
            with autocast(dist):
                logits = teacher(**data.model_inputs(batch, teacher, dist.device)).logits[:, :-1, :vocab]
            labelled = (batch["labels"][:, 1:] != data.IGNORE_INDEX).to(dist.device)  # (B, T-1)
            ids, lp = topk_of(logits[labelled], args.top_k, args.temperature)  # (n, K): batch-major, position order
            f_ids.write(ids.to(torch.int32).cpu().numpy().tobytes())
            f_lp.write(lp.to(torch.float16).cpu().numpy().tobytes())
            example_rows += labelled.sum(-1).tolist()
    # micro-batches that run on some ranks only (uneven shares) would leave FSDP waiting: every rank runs the same
    # number of teacher forwards; ranks with fewer examples run a dummy one
    n_local = len(data.micro_batches(local, args.local_micro_batch_size))
    n_max = int(dist.all_reduce(torch.tensor(n_local, device=dist.device), "max"))
    for _ in range(n_max - n_local):
        with autocast(dist):
            teacher(**data.model_inputs(data.collate(examples[:1], pad_id), teacher, dist.device))
    parts = dist.all_gather_object({"first_example": first, "example_rows": example_rows, "rows": sum(example_rows),
                                    **names} if local else None)  # fmt: skip
    if dist.is_main:
        meta = {"key": key, "top_k": min(args.top_k, vocab), "temperature": args.temperature,
                "examples": len(examples), "parts": [p for p in parts if p is not None]}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
        (tmp / "COMPLETE").write_text("")
        checkpoint.swap_in(path)
    dist.barrier()


def topk_batch(cache: TopKCache, indices: list[int], examples: list[dict], width: int):
    """The cached teacher top-K of a micro-batch laid out like its logits[:, :-1]: ids (B, width, K) with -100 and
    log-probs (B, width, K) with 0 where no label follows."""
    ids = torch.full((len(indices), width, cache.k), data.IGNORE_INDEX, dtype=torch.long)
    lp = torch.zeros(len(indices), width, cache.k)
    for b, i in enumerate(indices):
        positions = torch.tensor(label_positions(examples[i]), dtype=torch.long)
        row_ids, row_lp = cache.rows(i)
        if len(row_ids) != len(positions):
            raise RuntimeError(f"{cache.path}: example {i} has {len(row_ids)} cached rows, {len(positions)} labels")
        ids[b, positions], lp[b, positions] = row_ids, row_lp
    return ids, lp


def on_policy_record(tokenizer, record: dict, args: Args, context: str) -> dict:
    """An SFT row as a prompt (everything before the last assistant turn, with the generation prompt) and the data's
    response to it (for off-policy steps), truncated to --max-seq-len in all."""
    messages = record["messages"]
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    prompt = messages[:last]
    if not prompt:
        raise data.DataError(f"{context}: the last assistant turn has no prompt before it")
    prompt, full_prompt_ids, cut = data.fit_prompt(
        tokenizer, prompt, args.max_prompt_len, context, args.prompt_truncation, "messages"
    )
    response = data.tokenize_response(tokenizer, prompt, full_prompt_ids, messages[last]["content"], context)
    prompt_ids = full_prompt_ids[cut:]
    return {"prompt_ids": prompt_ids, "response_ids": response[: max(1, args.max_seq_len - len(prompt_ids))]}


def evaluate(model, tokenizer, dist, args: Args, per_prompt: bool = False) -> dict:
    """Ground truth on held-out demo prompts (greedy answers graded by the demo task's scorer)."""
    return demo_eval(model, tokenizer, dist, args.demo_eval_prompts, args.response_length, per_prompt=per_prompt)


@torch.no_grad()
def evaluate_kd_loss(model, cache, examples: list[dict], first: int, args: Args, dist, pad_id: int, vocab: int):
    """Offline: the token-averaged KD loss over held-out examples (cache rows first, first + 1, ...), sharded."""
    model.eval()
    n = len(examples) - len(examples) % dist.world_size
    local = dist.shard(list(range(n)))
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for mb in data.micro_batches(local, args.local_micro_batch_size):
        batch = data.collate([examples[i] for i in mb], pad_id)
        ids, lp = topk_batch(
            cache, [first + i for i in mb], {first + i: examples[i] for i in mb}, batch["input_ids"].shape[1] - 1
        )
        with autocast(dist):
            _, kd_sum, _ = offline_loss_sums(model, batch, ids, lp, args, dist.device, vocab)
        total += torch.stack([kd_sum.double(), (ids[..., 0] != data.IGNORE_INDEX).sum().double().to(dist.device)])
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


if __name__ == "__main__":
    args = tyro.cli(Args)
    data.exit_on_data_error()  # a bad row, field or split: one line naming it, no traceback
    dist = init_distributed(args.mixed_precision)
    seed_everything(args.seed)
    stop = StopSignal()
    offline = args.mode == "offline"
    if args.lmbda < 0 or args.lmbda > 1:
        raise ValueError(f"--lmbda must be in [0, 1], got {args.lmbda}")
    if args.jsd_beta is not None and not 0 < args.jsd_beta <= 1:
        raise ValueError(f"--jsd-beta must be in (0, 1], got {args.jsd_beta}")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")

    # 1. tokenizers (checked against each other before any model is loaded) and the student
    model_path = resolve_model_path(args.model_path, dist.is_main, dist.barrier)
    tokenizer = load_tokenizer(model_path, chat_template=args.chat_template)
    teacher_tokenizer = load_tokenizer(args.teacher_path, chat_template=args.chat_template)
    check_same_tokenizer(tokenizer, teacher_tokenizer, model_path, args.teacher_path)
    pad_id, eos_ids, vocab = tokenizer.pad_token_id, end_of_turn_ids(tokenizer, model_path), len(tokenizer)

    def load_teacher():
        teacher = load_causal_lm(args.teacher_path, dist.device, attn_implementation=args.attn_implementation,
                                 vocab_size=vocab)  # fmt: skip
        return wrap_model(teacher, dist, trainable=False)

    student = None
    if not (offline and args.offline_stage == "topk"):
        student = load_causal_lm(
            model_path, dist.device, attn_implementation=args.attn_implementation, vocab_size=vocab
        )
        student = lora.apply_lora(student, args.lora)  # --lora-r > 0: only the student's adapters are trained
        student = wrap_model(student, dist, activation_checkpointing=args.activation_checkpointing)

    # 2. data: SFT rows; errors name file, row and field
    data_path = data.resolve_data_path(args.data, "sft", dist)
    skipped_rows = 0
    if offline:
        parsed, eval_parsed, eval_source = data.load_train_eval(data_path, args.eval_data, args.eval_size, data.parse_sft,
                                                                args.skip_bad_rows, args.split, args.eval_split,
                                                                args.max_rows)  # fmt: skip

        def tok(record, context):
            return data.tokenize_sft(tokenizer, record, args.max_seq_len, context)

        train = data.tokenize_all(
            parsed.records,
            tok,
            parsed.source,
            args.skip_bad_rows,
            args.num_proc,
            args.data_cache_dir,
        )
        evals = data.tokenize_all(
            eval_parsed.records, tok, eval_source, args.skip_bad_rows, args.num_proc, args.data_cache_dir
        )
        records, eval_records = train.records, evals.records
        skipped_rows = parsed.skipped + train.skipped
    else:
        rows = data.load_rows(data_path, args.split)
        parsed = data.parse_first_rows(rows, data.parse_sft, args.skip_bad_rows, args.max_rows)
        train = data.tokenize_rows(parsed.records, lambda r, c: on_policy_record(tokenizer, r, args, c),
                                   parsed.source, args.skip_bad_rows, args.prompt_truncation, args.num_proc, args.data_cache_dir)  # fmt: skip
        records, eval_records = train.records, []
        eval_parsed = evals = None
        skipped_rows = parsed.skipped + train.skipped

    # 3. the teacher's signal: offline, the top-K cache (computed with the teacher only when missing or stale);
    #    on-policy, the teacher itself
    teacher, cache, cache_note = None, None, ""
    if offline:
        cache_path = Path(args.cache_dir or Path(args.output_dir) / "teacher_topk")
        precision = "bfloat16" if dist.bf16 else "float32"
        fingerprint = dist.broadcast_object(weights_fingerprint(args.teacher_path) if dist.is_main else None)
        key = cache_key(fingerprint, records + eval_records, args, precision)
        cache = open_cache(cache_path, key)
        if dist.all_reduce(torch.tensor(float(cache is None), device=dist.device)).item() > 0:
            if args.offline_stage == "train":
                reason = "missing" if not (cache_path / "COMPLETE").exists() else "stale (another teacher or data)"
                raise FileNotFoundError(
                    f"{cache_path}: the teacher's top-K cache is {reason}; run stage 1 first "
                    "(`--offline-stage topk` with the same flags)"
                )
            t0 = time.time()
            teacher = load_teacher()
            write_topk_cache(cache_path, key, teacher, records + eval_records, args, dist, pad_id, vocab)
            teacher = None  # never held during training
            cache = open_cache(cache_path, key)
            cache_note = f"computed in {time.time() - t0:.1f}s"
        else:
            cache_note = "cached"
        cache_note = f"{cache_note} ({cache_path}, key {key[:12]}, {args.teacher_path} weights {fingerprint[:12]})"
        if args.offline_stage == "topk":
            if dist.is_main:
                print(f"teacher top-K cache {cache_note}: {len(records) + len(eval_records)} examples, K={cache.k}")
            cleanup(dist)
            raise SystemExit(0)
    else:
        teacher = load_teacher()

    # 4. batch sizes, optimiser, schedule, resume
    local_batch_size = args.local_micro_batch_size * args.gradient_accumulation_steps
    global_batch_size = local_batch_size * dist.world_size
    data.steps_per_epoch(len(records), global_batch_size)  # raises when the data is smaller than one batch
    total_steps = args.total_steps
    optimizer = make_optimizer(student, args.learning_rate, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.lr_schedule, args.warmup_steps, total_steps)
    state = checkpoint.resume_run(args.output_dir, dist, student, optimizer, scheduler) if args.resume else {}
    start_step, skipped_steps = state.get("step", 0), state.get("skipped_steps", 0)
    initial, initial_scores = state.get("initial", {}), state.get("initial_scores", [])
    tracker = make_tracker(
        dist, args.output_dir, args, args.track, args.wandb_project, start_step if args.resume else -1
    )
    tracker.print(f"resolved args: {args}")
    tracker.print(
        f"world_size={dist.world_size} mode={args.mode} global_batch_size={global_batch_size} total_steps={total_steps} "
        f"examples={len(records)} eval_examples={len(eval_records)} skipped_rows={skipped_rows} vocab={vocab} "
        f"teacher={args.teacher_path} " + (f"top-K cache {cache_note} " if offline else "") + f"start_step={start_step}"
    )
    for line in data.skip_report(parsed, train, eval_parsed, evals):
        tracker.print(line)

    def save(step: int) -> None:
        extra = {"step": step, "skipped_steps": skipped_steps, "initial": initial, "initial_scores": initial_scores}
        checkpoint.save_run(args.output_dir, dist, student, optimizer, scheduler, tokenizer, extra)

    demo_eval_on = args.demo_eval_prompts > 0 and args.data == "demo"
    if demo_eval_on and not args.resume:
        initial = evaluate(student, tokenizer, dist, args, per_prompt=True)
        initial.pop("samples")
        initial_scores = initial.pop("scores")
        tracker.print(f"start: eval/score={initial['eval/score']:.3f} eval/accuracy={initial['eval/accuracy']:.3f}")

    # 5. training loop: step `step` takes the global batch `data.step_indices(step)`; this rank its slice
    student.train()
    bar = tracker.progress(total_steps, start_step, "distill")
    # sums over the steps since the last log: loss, KD, NLL, tokens, on-policy steps, steps, sample tokens, samples
    acc = torch.zeros(8, dtype=torch.float64, device=dist.device)
    t0, t_gen = time.time(), 0.0
    for step in range(start_step, total_steps):
        idx = dist.shard(data.step_indices(len(records), global_batch_size, step, args.seed))
        micro = data.micro_batches(idx, args.local_micro_batch_size)
        loss_sum = torch.zeros((), device=dist.device)
        if offline:
            # 5a. offline: the student's KL to the cached teacher top-K on the data's response tokens
            n_tokens = dist.sum(sum(len(label_positions(records[i])) for i in idx))
            for k, mb in enumerate(micro):
                if dist.enabled:
                    student.set_requires_gradient_sync(k == len(micro) - 1)  # reduce-scatter once per step
                batch = data.collate([records[i] for i in mb], pad_id)
                ids, lp = topk_batch(cache, mb, records, batch["input_ids"].shape[1] - 1)
                with autocast(dist):
                    mb_loss, kd_sum, nll_sum = offline_loss_sums(student, batch, ids, lp, args, dist.device, vocab)
                # average over the global batch's label tokens: FSDP averages gradients over ranks, hence x world size
                (mb_loss * dist.world_size / n_tokens).backward()
                loss_sum += mb_loss.detach().float()
                acc[1:3] += torch.stack([kd_sum, nll_sum]).double()
            on_policy = False
        else:
            # 5b. on-policy: with probability lmbda (one draw per step, keyed: the same on every rank) the student
            # samples; otherwise the data's responses. The teacher grades every token of them.
            on_policy = sample_key(args.seed, step, 0x6C6D) / 4294967296.0 < args.lmbda
            queries_list = [records[i]["prompt_ids"] for i in idx]
            if on_policy:
                t_g = clock(dist)
                keys = [sample_key(args.seed, step, dist.rank * len(idx) + j) for j in range(len(idx))]
                try:
                    responses_list = generate(student, queries_list, pad_id=pad_id, eos_id=eos_ids,
                                              max_new_tokens=args.response_length, dist=dist,
                                              temperature=args.sampling_temperature, sample_keys=keys)  # fmt: skip
                except FloatingPointError as e:  # a NaN student cannot even sample: stop, naming the step
                    raise NonFiniteLoss(f"non-finite logits at step {step} (rollout): {e}") from e
                t_gen += clock(dist) - t_g
            else:
                responses_list = [records[i]["response_ids"] for i in idx]
            queries = data.pad(queries_list, pad_id, side="left").to(dist.device)  # (B, P)
            responses = data.pad(responses_list, pad_id, side="right").to(dist.device)  # (B, T)
            responses, mask = truncate_after_eos(responses, eos_ids, pad_id)
            n_tokens = dist.sum(mask.sum().item())
            for k, mb in enumerate(micro):
                if dist.enabled:
                    student.set_requires_gradient_sync(k == len(micro) - 1)
                rows = slice(k * args.local_micro_batch_size, k * args.local_micro_batch_size + len(mb))
                q, r, mk = queries[rows], responses[rows], mask[rows]
                with torch.no_grad(), autocast(dist):
                    teacher_logits = response_logits(teacher, q, r, pad_id, vocab)  # (b, T, V)
                with autocast(dist):
                    student_logits = response_logits(student, q, r, pad_id, vocab)
                    token_losses = on_policy_token_losses(student_logits, teacher_logits, args) * mk  # (b, T)
                mb_loss = token_losses.sum()
                (mb_loss * dist.world_size / n_tokens).backward()
                loss_sum += mb_loss.detach().float()
                acc[1] += mb_loss.detach().double()
            acc[6:8] += torch.tensor([mask.sum().item(), float(len(idx))], dtype=torch.float64, device=dist.device)
        if nonfinite_step(loss_sum, step, dist, args.skip_nonfinite):
            optimizer.zero_grad(set_to_none=True)
            skipped_steps += 1
            continue
        grad_norm = optimizer_step(student, optimizer, scheduler, args.max_grad_norm)
        acc[0] += loss_sum.double()
        acc[3:6] += torch.tensor([n_tokens / dist.world_size, float(on_policy) / dist.world_size, 1.0 / dist.world_size],
                                 dtype=torch.float64, device=dist.device)  # fmt: skip
        bar.update(1)

        # 6. log (metrics reduced over ranks once per log), evaluate, checkpoint
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            sums = dist.all_reduce(acc.clone())
            tokens, steps = max(sums[3].item(), 1.0), max(sums[5].item(), 1.0)
            elapsed = time.time() - t0
            metrics = {
                "train/loss": sums[0].item() / tokens,
                "train/kd_loss": sums[1].item() / tokens,
                "train/grad_norm": grad_norm,
                "train/lr": scheduler.get_last_lr()[0],
                "train/skipped_steps": skipped_steps,
                "perf/tokens_per_sec": tokens / max(elapsed, 1e-9),
            }
            if offline and args.sft_weight > 0:
                metrics["train/sft_loss"] = sums[2].item() / tokens
            if not offline:
                metrics |= {"distill/on_policy_frac": sums[4].item() / steps,
                            "distill/response_length": sums[6].item() / max(sums[7].item(), 1.0),
                            "perf/time_generate": t_gen}  # fmt: skip
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total_steps:
                if offline:
                    metrics["eval/kd_loss"] = evaluate_kd_loss(student, cache, eval_records, len(records), args, dist,
                                                               pad_id, vocab)  # fmt: skip
                if demo_eval_on:
                    metrics |= {k: v for k, v in evaluate(student, tokenizer, dist, args).items() if k != "samples"}
            tracker.log(metrics, step + 1, echo=False)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            acc.zero_()
            t0, t_gen = time.time(), 0.0
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save(step + 1)
        stop.exit_if_requested(dist, lambda: save(step + 1), f"at step {step + 1}", args.output_dir, tracker)
    tracker.close_progress()

    # 7. final evaluation and export
    save(total_steps)
    final = {"train/skipped_steps": skipped_steps}
    if offline:
        final["eval/kd_loss"] = evaluate_kd_loss(student, cache, eval_records, len(records), args, dist, pad_id, vocab)
    if demo_eval_on:
        result = evaluate(student, tokenizer, dist, args, per_prompt=bool(initial_scores))
        tracker.table("eval samples", ["prompt", "response", "score"], result.pop("samples"), total_steps)
        if initial_scores:  # the gain over the start student on the same prompts, and its standard error
            gain, gain_se = paired_difference(result.pop("scores"), initial_scores)
            result |= {"eval/score_gain": gain, "eval/score_gain_se": gain_se}
        final |= result | {f"initial/{k}": v for k, v in initial.items()}
    tracker.log(final, total_steps)
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
