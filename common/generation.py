"""Batched generation with a KV cache: greedy or sampled (temperature, top-k, top-p), per-rank generators; and the
log-probs of sampled responses under the distribution they were sampled from (PPO, GRPO).

A small loop over the model's forward rather than `model.generate`: it takes a torch.Generator (so sampling is
reproducible and different per rank), keeps ranks in lock-step under FSDP, and has less per-token overhead,
which dominates for small models.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable

import torch

from common.data import IGNORE_INDEX, pad, position_ids_from_mask
from common.dist import Dist, autocast, gathered_for_generation
from kernels import selective_logprob


def _cache_keyword(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept both so older installs work."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft (LoRA) passes kwargs on
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x < 2^32 held in int64, without overflowing int64 (two 16-bit halves of c)."""
    return (x * (c & 0xFFFF) + ((x * (c >> 16)) & 0xFFFF) * 65536) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" finaliser): every input bit flips about half the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_key(*parts: int) -> int:
    """One 32-bit sampling key from integers (e.g. seed, update, prompt index)."""
    h = torch.tensor(0, dtype=torch.int64)
    for p in parts:
        h = _mix32((h + _mix32(torch.tensor(p & _M32, dtype=torch.int64))) & _M32)
    return int(h)


def group_sample_keys(
    seed: int, update: int, round_: int, first_position: int, num_prompts: int, group_size: int
) -> list[int]:
    """Sampling keys of `num_prompts` prompts x `group_size` samples (a prompt's samples consecutive), keyed by
    (seed, update, round, the prompt's position in the global batch, sample index): the same samples on any number
    of ranks (a rank's first prompt sits at `first_position`). grpo.py and rejection_sampling.py sample this way."""
    return [
        sample_key(seed, update, round_, first_position + k, g) for k in range(num_prompts) for g in range(group_size)
    ]


def keyed_uniform(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(B, V) uniforms in (0, 1) that depend only on (key, step, token id): counter-based randomness.

    Sampling with these makes a prompt's response independent of which rank, batch or position it was
    generated in, so runs on 1 or N processes, or with other generation batch sizes, sample the same tokens.
    """
    row = _mix32((_mix32(keys.to(torch.int64) & _M32) + step) & _M32)  # (B,)
    col = _mix32(torch.arange(vocab, device=keys.device, dtype=torch.int64))  # (V,)
    bits = _mix32((row[:, None] ^ col[None, :]) & _M32)  # (B, V)
    return (bits.double() + 0.5) / 4294967296.0


def eos_set(eos_id: int | Iterable[int]) -> set[int]:
    """The ids that end a reply: one (a tokenizer's EOS) or several (`common.models.end_of_turn_ids`)."""
    return {int(eos_id)} if isinstance(eos_id, int) else {int(i) for i in eos_id}


def is_eos(tokens: torch.Tensor, eos_id: int | Iterable[int]) -> torch.Tensor:
    """Boolean mask, shaped like `tokens`, of the tokens that end a reply (any of `eos_id`)."""
    return torch.isin(tokens, torch.tensor(sorted(eos_set(eos_id)), dtype=tokens.dtype, device=tokens.device))


def never_sampled(logits: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The logits (..., V) of the distribution generation samples from: the pad token's logit at -inf.

    Padding is never a token of an answer, so `generate` removes it before sampling; the log-probs of sampled
    tokens (PPO/GRPO ratios, the KL to the reference) must be taken under the same distribution, so they pass their
    logits through this too. Out of place: the model's logits may be needed for backward. Top-k/top-p truncation is
    not corrected for in those log-probs (as in TRL): they are taken under the full softmax at the temperature.
    """
    return logits.index_fill(-1, torch.tensor([pad_id], device=logits.device), float("-inf"))


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row from (B, V) logits; temperature 0 is greedy.

    With `uniforms` (B, V) the draw is the Gumbel-max trick, argmax(logits / T - log(-log u)), an exact sample
    of softmax(logits / T) that is a deterministic function of the uniforms; else torch.multinomial.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if uniforms is not None:
        return (logits.double() - torch.log(-torch.log(uniforms))).argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_id: int | Iterable[int],
    max_new_tokens: int,
    dist: Dist,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    sample_keys: list[int] | None = None,
    batch_size: int = 256,
) -> list[list[int]]:
    """Responses to token-id prompts, each cut after its first EOS (the EOS is kept); `eos_id` is one id or several
    (any of them ends a reply, `common.models.end_of_turn_ids`).

    Sampling draws from `generator`, or, given one `sample_keys` entry per prompt, from counter-based
    randomness keyed by (key, token position): then a prompt's response does not depend on the rank or the
    batch it is generated in.

    Every rank must pass the same number of prompts: the loop runs until all ranks are done, so that FSDP
    and the stopping all-reduce stay in step.
    """
    was_training = model.training
    model.eval()
    ends = eos_set(eos_id)
    stop_ids = torch.tensor(sorted(ends), device=dist.device)  # (E,)
    out: list[list[int]] = []
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    with gathered_for_generation(model), autocast(dist):
        for b in range(n_batches):
            chunk = prompts[b * batch_size : (b + 1) * batch_size]
            input_ids = pad(chunk, pad_id, side="left").to(dist.device)  # (B, P)
            attention_mask = pad([[1] * len(p) for p in chunk], 0, side="left").to(dist.device)
            position_ids = position_ids_from_mask(attention_mask)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=dist.device)
            tokens = []
            past = None
            cache_kw = _cache_keyword(model)
            step_ids, step_pos = input_ids, position_ids
            for _ in range(max_new_tokens):
                o = model(
                    input_ids=step_ids,
                    attention_mask=attention_mask,
                    position_ids=step_pos,
                    use_cache=True,
                    logits_to_keep=1,
                    **{cache_kw: past},
                )
                past = getattr(o, cache_kw)
                logits = o.logits[:, -1].float()  # (B, V)
                nan = torch.isnan(logits).any(-1)  # (B,) checked with the stopping all-reduce below, on every rank
                logits = never_sampled(torch.where(nan[:, None], torch.zeros_like(logits), logits), pad_id)
                uniforms = None
                if sample_keys is not None and temperature > 0:
                    keys = torch.tensor(sample_keys[b * batch_size : (b + 1) * batch_size], device=dist.device)
                    uniforms = keyed_uniform(keys, len(tokens), logits.shape[-1])
                nxt = sample_next(logits, temperature, top_k, top_p, generator, uniforms)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                tokens.append(nxt)
                done |= torch.isin(nxt, stop_ids)
                # one all-reduce per token: are any rows still going, and did any rank see NaN logits?
                flags = dist.all_reduce(torch.stack([(~done).sum(), nan.sum()]).double())
                if flags[1] > 0:  # raised on every rank together, so none waits forever for the others
                    raise FloatingPointError(
                        f"NaN logits at generated token {len(tokens) - 1}: the model is non-finite"
                    )
                if flags[0] == 0:
                    break
                step_ids = nxt[:, None]
                step_pos = step_pos[:, -1:] + 1
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            gen = torch.stack(tokens, dim=1).tolist()  # (B, T)
            for row in gen:
                cut = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
                out.append(row[:cut])
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Scoring sampled responses (PPO, GRPO): the same inputs and log-probs as the tokens were sampled with
# ---------------------------------------------------------------------------------------------------------------


def truncate_after_eos(
    responses: torch.Tensor, eos_id: int | Iterable[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad everything after the first EOS, any of `eos_id` (the EOS stays); returns (responses, mask of kept
    tokens) (B, T)."""
    ends = is_eos(responses, eos_id).long()
    after = (ends.cumsum(-1) - ends) > 0  # strictly after the first EOS
    mask = ~after & (responses != pad_id)
    return torch.where(mask, responses, torch.full_like(responses, pad_id)), mask


def sequence_inputs(queries: torch.Tensor, responses: torch.Tensor, pad_id: int) -> dict:
    """Model inputs for left-padded queries (B, P) followed by right-padded responses (B, T)."""
    input_ids = torch.cat([queries, responses], dim=1)  # (B, P+T)
    attention_mask = (input_ids != pad_id).long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
    }


def response_logprobs(model, queries, responses, pad_id: int, temperature: float, with_entropy: bool = False):
    """log pi(response token | prefix) at the sampling temperature (B, T), and the entropy (B, T) if asked.

    Position P-1+t of the sequence predicts response token t; padding gets log-prob 0. The LM head runs on
    the T positions that predict response tokens only (`logits_to_keep` as positions): prompt-position logits
    would be computed to be thrown away, and slicing the logits afterwards would cost a (B, T+1, V) zero-filled
    gradient in backward.
    """
    P, T = queries.shape[1], responses.shape[1]
    positions = torch.arange(P - 1, P - 1 + T, device=queries.device)  # (T,)
    logits = model(**sequence_inputs(queries, responses, pad_id), logits_to_keep=positions).logits  # (B, T, V)
    logits = never_sampled(logits, pad_id)  # the distribution generation sampled from (the pad token excluded)
    labels = responses.masked_fill(responses == pad_id, IGNORE_INDEX)
    return selective_logprob(logits, labels, temperature=temperature, return_entropy=with_entropy)


def clock(dist) -> float:
    """Wall time after the device's queued work is done, so each phase is charged with its own kernels."""
    if dist.device.type == "cuda":
        torch.cuda.synchronize(dist.device)
    return time.time()


def demo_eval(
    model, tokenizer, dist: Dist, num_prompts: int, max_new_tokens: int, template_kwargs=None, per_prompt=False
) -> dict:
    """Ground truth on held-out demo-task prompts: greedy answers graded by `demo_task.grade`.

    Returns eval/score (hidden utility), eval/accuracy, eval/verbosity, eval/politeness, eval/response_length
    (tokens), and `samples` (a few prompt/response/score rows from rank 0). With `per_prompt`, also `scores`:
    every prompt's score, gathered from all ranks in an order that depends only on num_prompts and the world
    size (so two models' lists pair up prompt by prompt).
    """
    from common import demo_task
    from common.data import render

    prompts = dist.shard(demo_task.eval_prompts(num_prompts))
    ids = [render(tokenizer, [{"role": "user", "content": p}], True, **(template_kwargs or {})) for p in prompts]
    responses = generate(
        model,
        ids,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
        dist=dist,
    )
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    grades = [demo_task.grade(p, t) for p, t in zip(prompts, texts)]
    keys = ("score", "correct", "verbosity", "politeness")
    sums = torch.tensor(
        [sum(g[k] for g in grades) for k in keys] + [sum(len(r) for r in responses), len(grades)],
        dtype=torch.float64,
        device=dist.device,
    )
    dist.all_reduce(sums)
    n = sums[-1].item()
    out = {f"eval/{'accuracy' if k == 'correct' else k}": sums[i].item() / n for i, k in enumerate(keys)}
    out["eval/response_length"] = sums[len(keys)].item() / n
    out["samples"] = [[p, t, g["score"]] for p, t, g in list(zip(prompts, texts, grades))[:6]]
    if per_prompt:
        out["scores"] = [s for shard in dist.all_gather_object([g["score"] for g in grades]) for s in shard]
    return out


def paired_difference(scores: list[float], baseline: list[float]) -> tuple[float, float]:
    """Mean per-prompt score difference to a baseline graded on the same prompts, and its standard error.

    Both models answer the same prompts, so the paired difference cancels the prompts' own difficulty: its
    standard error is what tells a real gain from evaluation noise (twice it is a ~95% interval).
    """
    if len(scores) != len(baseline) or len(scores) < 2:
        raise ValueError(f"need two equally long score lists of 2+ prompts, got {len(scores)} and {len(baseline)}")
    d = torch.tensor(scores, dtype=torch.float64) - torch.tensor(baseline, dtype=torch.float64)
    return d.mean().item(), (d.std(unbiased=True) / len(d) ** 0.5).item()
