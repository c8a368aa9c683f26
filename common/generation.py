"""Batched generation with a KV cache: greedy or sampled (temperature, top-k, top-p), per-rank generators; and the
log-probs of sampled responses under the distribution they were sampled from (PPO, GRPO).

A small loop over the model's forward rather than `model.generate`: it takes a torch.Generator (so sampling is
reproducible and different per rank), keeps ranks in lock-step under FSDP, and has less per-token overhead,
which dominates for small models.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Iterable

import torch
from transformers.cache_utils import DynamicLayer

from common.data import IGNORE_INDEX, pad, position_ids_from_mask
from common.dist import Dist, autocast, gathered_for_generation
from kernels import selective_logprob


def _cache_keyword(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept both so older installs work."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft (LoRA) passes kwargs on
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class ReservedLayer(DynamicLayer):
    """A transformers DynamicLayer whose keys and values are views of a preallocated buffer (see `reserve`)."""

    def reserve(self, capacity: int) -> None:
        self._buffers = []
        for name in ("keys", "values"):
            t = getattr(self, name)  # (B, H, L, D)
            buf = t.new_empty(t.shape[0], t.shape[1], max(capacity, t.shape[2]), t.shape[3])
            buf[:, :, : t.shape[2]] = t
            self._buffers.append(buf)
            setattr(self, name, buf[:, :, : t.shape[2]])

    def update(self, key_states, value_states, *args, **kwargs):
        L, n = self.keys.shape[-2], key_states.shape[-2]
        kbuf, vbuf = self._buffers
        if L + n > kbuf.shape[-2] or key_states.shape[0] != kbuf.shape[0]:
            return super().update(key_states, value_states, *args, **kwargs)  # past the buffer: grow as before
        kbuf[:, :, L : L + n] = key_states
        vbuf[:, :, L : L + n] = value_states
        self.keys, self.values = kbuf[:, :, : L + n], vbuf[:, :, : L + n]
        return self.keys, self.values

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.reserve(self._buffers[0].shape[-2])  # the selected rows get a buffer of their own


def reserve(cache, capacity: int) -> None:
    """Give every full-attention layer of a transformers DynamicCache a buffer of `capacity` positions, so that each
    generated token is written into it instead of the whole cache being copied by `torch.cat` (a quarter of a small
    model's decoding time on a CPU). Other layer kinds (sliding windows, other cache classes) are left as they are."""
    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer and getattr(layer, "is_initialized", False) and layer.keys.dim() == 4:
            layer.__class__ = ReservedLayer
            layer.reserve(capacity)


_M32 = 0xFFFFFFFF


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """x <- (x * c) mod 2^32, in place, for x < 2^32 held in int64, without overflowing int64 (two 16-bit halves of c)."""
    high = torch.mul(x, c >> 16).bitwise_and_(0xFFFF).mul_(65536)
    return x.mul_(c & 0xFFFF).add_(high).bitwise_and_(_M32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" finaliser), in place: every input bit flips about half the output bits.
    In place because generation hashes a (B, V) tensor per token: fresh tensors for each of its ~20 steps cost as
    much as the hashing itself."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    return _mix32_(x.clone())


def mix32_int(x: int) -> int:
    """`_mix32` on one Python int (the same bits): keys are made per sample, where a tensor op per hash step cost
    tens of milliseconds per rollout."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sample_key(*parts: int) -> int:
    """One 32-bit sampling key from integers (e.g. seed, update, prompt index)."""
    h = 0
    for p in parts:
        h = mix32_int((h + mix32_int(p & _M32)) & _M32)
    return h


def group_sample_keys(
    seed: int, update: int, round_: int, first_position: int, num_prompts: int, group_size: int
) -> list[int]:
    """Sampling keys of `num_prompts` prompts x `group_size` samples (a prompt's samples consecutive), keyed by
    (seed, update, round, the prompt's position in the global batch, sample index): the same samples on any number
    of ranks (a rank's first prompt sits at `first_position`). grpo.py and rejection_sampling.py sample this way."""
    return [
        sample_key(seed, update, round_, first_position + k, g) for k in range(num_prompts) for g in range(group_size)
    ]


def _i32(c: int) -> int:
    """A 32-bit constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _mix32_int32_(x: torch.Tensor) -> torch.Tensor:
    """`_mix32_` on int32 tensors holding the 32 bits, in place: products wrap mod 2^32 by themselves and a shift is
    an arithmetic shift masked to a logical one. A quarter of the int64 version's time (half the bytes, one multiply
    instead of four operations); `_int32_hash_exact` checks that the device's int32 products do wrap."""
    x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))
    x.mul_(_i32(0x7FEB352D))
    x.bitwise_xor_((x >> 15).bitwise_and_(0x1FFFF))
    x.mul_(_i32(0x846CA68B))
    return x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))


_INT32_EXACT: dict[str, bool] = {}


def _int32_hash_exact(device: torch.device) -> bool:
    """Whether `_mix32_int32_` gives `_mix32_`'s bits on this device type (checked once, on values that overflow and
    a length that leaves a tail after the vector lanes); if not, generation hashes in int64."""
    if device.type not in _INT32_EXACT:
        x = _mix32(torch.arange(0, 1 << 32, 9_999_991, dtype=torch.int64, device=device))  # 430 spread values
        got = _mix32_int32_(x.to(torch.int32)).to(torch.int64) & _M32
        _INT32_EXACT[device.type] = bool(torch.equal(got, _mix32_(x.clone())))
    return _INT32_EXACT[device.type]


@functools.lru_cache(maxsize=8)
def _column_hash(vocab: int, device: torch.device) -> torch.Tensor:
    """The token ids' hashes (V,), the same at every step: made once per vocabulary size and device."""
    return _mix32(torch.arange(vocab, device=device, dtype=torch.int64))


def keyed_uniform(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(B, V) uniforms in (0, 1) that depend only on (key, step, token id): counter-based randomness.

    Sampling with these makes a prompt's response independent of which rank, batch or position it was
    generated in, so runs on 1 or N processes, or with other generation batch sizes, sample the same tokens.
    """
    row = _mix32((_mix32(keys.to(torch.int64) & _M32) + step) & _M32)  # (B,)
    col = _column_hash(vocab, keys.device)  # (V,)
    if not _int32_hash_exact(keys.device):
        bits = _mix32_(row[:, None] ^ col[None, :])  # (B, V), a fresh tensor hashed in place
        return bits.double().add_(0.5).div_(4294967296.0)
    bits = _mix32_int32_((row[:, None] ^ col[None, :]).to(torch.int32))  # (B, V): the same bits, as int32
    # back to 0 .. 2^32-1: a negative int32 plus 2^32 (exact in float64: remainder by a power of two)
    return bits.double().remainder_(4294967296.0).add_(0.5).div_(4294967296.0)


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
        return logits.double().sub_(torch.log(uniforms).neg_().log_()).argmax(-1)  # log(-log u), fewer temporaries
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
    and the stopping all-reduce stay in step. A prompt repeated in a batch (a group of samples) is prefilled once.
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
            # the prompt's keys and values once per distinct prompt (a GRPO group repeats it G times), then one row
            # of the cache per sample: the same numbers as prefilling every row, 1/G of the prefill's work
            distinct: dict[tuple, int] = {}
            row_prompt = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in chunk], device=dist.device)
            unique = [list(p) for p in distinct]
            input_ids = pad(unique, pad_id, side="left").to(dist.device)  # (U, P)
            attention_mask = pad([[1] * len(p) for p in unique], 0, side="left").to(dist.device)
            position_ids = position_ids_from_mask(attention_mask)
            cache_kw = _cache_keyword(model)
            o = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                      logits_to_keep=1)  # fmt: skip
            past = getattr(o, cache_kw)
            next_logits = o.logits[:, -1]
            if len(unique) < len(chunk):
                past.batch_select_indices(row_prompt)
                next_logits, attention_mask = next_logits[row_prompt], attention_mask[row_prompt]
            reserve(past, input_ids.shape[1] + max_new_tokens)
            step_pos = position_ids[row_prompt, -1:]  # (B, 1)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=dist.device)
            keys = None
            if sample_keys is not None and temperature > 0:
                keys = torch.tensor(sample_keys[b * batch_size : (b + 1) * batch_size], device=dist.device)
            tokens = []
            for _ in range(max_new_tokens):
                logits = next_logits.float()  # (B, V)
                nan = torch.isnan(logits).any(-1)  # (B,) checked with the stopping all-reduce below, on every rank
                if nan.any():  # sample something from those rows; the error is raised after the all-reduce
                    logits = torch.where(nan[:, None], torch.zeros_like(logits), logits)
                logits = never_sampled(logits, pad_id)
                uniforms = None
                if keys is not None:
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
                if flags[0] == 0 or len(tokens) == max_new_tokens:
                    break
                step_pos = step_pos + 1
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
                o = model(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=step_pos, use_cache=True,
                          logits_to_keep=1, **{cache_kw: past})  # fmt: skip
                past = getattr(o, cache_kw)
                next_logits = o.logits[:, -1]
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

    Rows that repeat a prompt (GRPO's and rejection sampling's groups of samples) share its forward pass: the
    distinct prompts run once, their keys and values are indexed out to every row of the group, and the responses
    run on top of them (`shared_prompt_logits`). The same function of the weights, so the same log-probs and
    gradients up to float rounding (the prompt's gradient is the group's sum, as in the full forward), for 1/G of
    the prompt tokens' work and activations.
    """
    P, T = queries.shape[1], responses.shape[1]
    inputs = sequence_inputs(queries, responses, pad_id)
    distinct, row_prompt = torch.unique(queries, dim=0, return_inverse=True)
    if len(distinct) < len(queries) and T > 1 and can_share_prompts(model):
        logits = shared_prompt_logits(model, inputs, distinct, row_prompt, P)  # (B, T, V)
    else:
        positions = torch.arange(P - 1, P - 1 + T, device=queries.device)  # (T,)
        logits = model(**inputs, logits_to_keep=positions).logits  # (B, T, V)
    logits = never_sampled(logits, pad_id)  # the distribution generation sampled from (the pad token excluded)
    labels = responses.masked_fill(responses == pad_id, IGNORE_INDEX)
    return selective_logprob(logits, labels, temperature=temperature, return_entropy=with_entropy)


def can_share_prompts(model) -> bool:
    """Whether a forward may run the prompt and the responses as two calls through the KV cache: not when HF
    gradient checkpointing is on and a graph is being built (transformers then turns the cache off, and recomputing a
    layer would append to the cache a second time)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x; before: the old name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return not (torch.is_grad_enabled() and model.training and checkpointing)


def shared_prompt_logits(model, inputs: dict, distinct: torch.Tensor, row_prompt: torch.Tensor, P: int) -> torch.Tensor:
    """Logits (B, T, V) predicting the T response tokens of `inputs` (`sequence_inputs`: P prompt columns, then
    responses), where row b's prompt is `distinct[row_prompt[b]]`: each distinct prompt runs once (its last position
    predicts response token 0), the cache is indexed out to the rows, and response tokens 0..T-2 run on top of it."""
    kw = _cache_keyword(model)
    mask, positions = inputs["attention_mask"], inputs["position_ids"]
    prompt_mask = mask[:, :P][_first_rows(row_prompt, len(distinct))]
    first = model(input_ids=distinct, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                  use_cache=True, logits_to_keep=1)  # fmt: skip
    cache = getattr(first, kw)
    cache.batch_select_indices(row_prompt)  # (U, ...) -> (B, ...): every row attends to its prompt's keys and values
    rest = model(input_ids=inputs["input_ids"][:, P:-1], attention_mask=mask[:, :-1], position_ids=positions[:, P:-1],
                 use_cache=True, **{kw: cache})  # fmt: skip
    return torch.cat([first.logits[row_prompt], rest.logits], dim=1)


def _first_rows(row_prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The first row of each of the n groups of `row_prompt` (B,) (values 0..n-1)."""
    rows = torch.arange(len(row_prompt), device=row_prompt.device)
    return torch.full((n,), len(row_prompt), device=row_prompt.device).scatter_reduce(0, row_prompt, rows, "amin")


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
