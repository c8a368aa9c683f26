"""Prompt sharing in `common.generation`: a prompt that several rows repeat (a GRPO / rejection-sampling group) runs
once, in generation (the prefill) and in training (`response_logprobs`), with a preallocated KV cache for decoding.
Each is checked against the unshared computation it replaces: the same tokens, log-probs, entropies and gradients."""

from __future__ import annotations

import pytest
import torch

from common import generation
from common.data import IGNORE_INDEX, pad
from common.dist import Dist
from common.generation import (
    ReservedLayer,
    generate,
    group_sample_keys,
    never_sampled,
    response_logprobs,
    sequence_inputs,
)
from kernels import selective_logprob

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def model(demo_base):
    from common.models import load_causal_lm

    return load_causal_lm(str(demo_base), torch.device("cpu"))


def plain_logprobs(model, queries, responses, pad_id, temperature, with_entropy=False):
    """The unshared computation: one forward over every row's prompt + response."""
    P, T = queries.shape[1], responses.shape[1]
    positions = torch.arange(P - 1, P - 1 + T)
    logits = model(**sequence_inputs(queries, responses, pad_id), logits_to_keep=positions).logits
    labels = responses.masked_fill(responses == pad_id, IGNORE_INDEX)
    return selective_logprob(
        never_sampled(logits, pad_id), labels, temperature=temperature, return_entropy=with_entropy
    )


def group_batch(tokenizer, G: int = 3):
    """Three prompts of different lengths (left-padded), G rows each, and one prompt that appears once; responses of
    different lengths (right padding after an early end)."""
    pad_id = tokenizer.pad_token_id
    prompts = [[1, 4, 40, 41, 5], [1, 4, 42, 5], [1, 4, 43, 44, 45, 46, 5]]
    rows = [p for p in prompts for _ in range(G)] + [[1, 4, 47, 5]]
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(50, 200, (len(rows), 6), generator=g)
    for b, n in enumerate([6, 2, 4, 6, 1, 5, 3, 6, 6, 4]):
        responses[b, n:] = pad_id
    return pad(rows, pad_id, side="left"), responses


def test_shared_prompt_logprobs_entropy_and_gradients_equal_the_full_forward(model, tokenizer):
    pad_id = tokenizer.pad_token_id
    queries, responses = group_batch(tokenizer)
    assert len(torch.unique(queries, dim=0)) == 4 < len(queries)  # the shared path is taken
    out = {}
    for name, fn in (("plain", plain_logprobs), ("shared", response_logprobs)):
        model.zero_grad()
        lp, ent = fn(model, queries, responses, pad_id, 0.7, True)
        weights = torch.linspace(-1, 2, lp.numel()).view_as(lp)  # a different weight per token
        ((lp * weights).sum() + ent.sum()).backward()
        out[name] = (lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp_a, ent_a, grad_a), (lp_b, ent_b, grad_b) = out["plain"], out["shared"]
    assert (lp_b[responses == pad_id] == 0).all()
    torch.testing.assert_close(lp_b, lp_a, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent_b, ent_a, rtol=0, atol=2e-5)
    for n, g in grad_a.items():
        assert g.abs().max() > 0, n  # every weight gets a gradient (the prompt's too)
        torch.testing.assert_close(grad_b[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_shared_prompts_take_two_calls_and_distinct_prompts_one(model, tokenizer, monkeypatch):
    """The shared path really runs (the prompt once per distinct prompt), and rows without repeats take one call."""
    pad_id = tokenizer.pad_token_id
    queries, responses = group_batch(tokenizer)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        with torch.no_grad():
            response_logprobs(model, queries, responses, pad_id, 1.0)
            shared_calls = list(calls)
            calls.clear()
            response_logprobs(model, queries[[0, 3, 6, 9]], responses[[0, 3, 6, 9]], pad_id, 1.0)
    finally:
        hook.remove()
    assert shared_calls == [torch.Size([4, queries.shape[1]]), torch.Size([len(queries), responses.shape[1] - 1])]
    assert calls == [torch.Size([4, queries.shape[1] + responses.shape[1]])]


def test_gradient_checkpointing_takes_the_plain_path(model, tokenizer):
    """With HF gradient checkpointing on (transformers then disables the cache), the shared path is not taken and
    the result is still the full forward's."""
    pad_id = tokenizer.pad_token_id
    queries, responses = group_batch(tokenizer)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # the API dist.py uses
    model.train()
    try:
        assert not generation.can_share_prompts(model)
        lp = response_logprobs(model, queries, responses, pad_id, 1.0)
        lp.sum().backward()
    finally:
        model.gradient_checkpointing_disable()
        model.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(
            lp.detach(), plain_logprobs(model, queries, responses, pad_id, 1.0), atol=2e-5, rtol=0
        )


def test_generation_with_repeated_prompts_equals_each_prompt_alone(model, tokenizer, monkeypatch):
    """Groups of samples (the prefill shared, the cache indexed out and preallocated) draw exactly the tokens each row
    draws when generated alone with its sampling key, through transformers' own growing cache (no sharing, no
    preallocation, nothing else in the batch)."""
    pad_id, G = tokenizer.pad_token_id, 4
    prompts = [[1, 4, 40, 41, 5], [1, 4, 42, 5], [1, 4, 43, 44, 45, 46, 5]]
    rows = [p for p in prompts for _ in range(G)]
    keys = group_sample_keys(3, 1, 0, 0, len(prompts), G)
    kwargs = dict(pad_id=pad_id, eos_id=tokenizer.eos_token_id, max_new_tokens=12, dist=CPU, temperature=1.0)
    together = generate(model, rows, sample_keys=keys, **kwargs)
    monkeypatch.setattr(generation, "reserve", lambda cache, capacity: None)
    alone = [generate(model, [r], sample_keys=[k], **kwargs)[0] for r, k in zip(rows, keys)]
    assert together == alone
    assert len({tuple(r) for r in together}) > len(prompts)  # the samples of a group differ


def test_reserved_cache_layer_writes_in_place_and_grows_past_its_buffer():
    """`reserve`: appended keys land in the buffer (no copy of the past), a selection of rows gets its own buffer, and
    an update beyond the capacity falls back to growing by concatenation with the same contents."""
    from transformers import DynamicCache

    cache = DynamicCache()
    k0, v0 = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    cache.update(k0, v0, 0)
    generation.reserve(cache, capacity=6)
    layer = cache.layers[0]
    assert isinstance(layer, ReservedLayer)
    buffer_ptr = layer._buffers[0].data_ptr()
    cache.batch_select_indices(torch.tensor([1, 1, 0]))
    assert layer._buffers[0].data_ptr() != buffer_ptr and layer._buffers[0].shape[-2] == 6
    expected_k = k0[[1, 1, 0]]
    for step in range(4):  # 4 + 2 fit in the buffer, the next two tokens go past it
        k, v = torch.randn(3, 3, 1, 5), torch.randn(3, 3, 1, 5)
        keys, values = cache.update(k, v, 0)
        expected_k = torch.cat([expected_k, k], dim=-2)
        assert torch.equal(keys, expected_k) and values.shape == expected_k.shape
        if step < 2:
            assert keys.data_ptr() == layer._buffers[0].data_ptr()  # a view of the buffer: nothing copied
    assert cache.get_seq_length() == 8


def test_sample_key_hashes_in_python_ints_as_the_tensor_hash_does():
    """`sample_key` folds its parts with `mix32_int` on Python ints; the same fold with the tensor hash `_mix32` (how
    keys were made before, and what `keyed_uniform` uses) gives the same keys, negative and >32-bit parts included."""

    def tensor_key(*parts):
        h = torch.tensor(0, dtype=torch.int64)
        for p in parts:
            h = generation._mix32((h + generation._mix32(torch.tensor(p & 0xFFFFFFFF))) & 0xFFFFFFFF)
        return int(h)

    for parts in [(1, 0, 0, 0, 0), (1, 2, 3, 4, 5), (123456789, -3, 2**40 + 7), (0xFFFFFFFF, 0xFFFFFFFF), (7,)]:
        assert generation.sample_key(*parts) == tensor_key(*parts)
    keys = group_sample_keys(1, 0, 0, 0, 16, 8)
    assert len(set(keys)) == len(keys) and all(0 <= k < 2**32 for k in keys)


def test_int32_hash_gives_the_int64_bits(monkeypatch):
    """The (B, V) hash of `keyed_uniform` runs in int32 (wrapping products); on every 32-bit pattern class (high bit
    set, overflowing products) and on lengths that leave a tail after the vector lanes it equals the int64 version,
    and `keyed_uniform` returns the same uniforms either way."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 437, 4099):
        x = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
        got = generation._mix32_int32_(x.to(torch.int32)).to(torch.int64) & 0xFFFFFFFF
        assert torch.equal(got, generation._mix32(x))
    assert generation._int32_hash_exact(torch.device("cpu"))
    keys = torch.randint(0, 2**32, (5,), generator=g, dtype=torch.int64)
    fast = generation.keyed_uniform(keys, 3, 437)
    monkeypatch.setitem(generation._INT32_EXACT, "cpu", False)  # the int64 fallback
    slow = generation.keyed_uniform(keys, 3, 437)
    assert torch.equal(fast, slow) and fast.dtype == torch.float64
    assert 0 < fast.min() and fast.max() < 1


def test_keyed_sampling_is_a_draw_from_the_softmax_that_depends_only_on_key_and_step():
    """Gumbel-max over `keyed_uniform`: token frequencies over many keys match softmax(logits / T) (within 4.5
    standard errors per token), and a row's token does not depend on the other rows of the batch."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -3.0])
    temperature, n = 0.7, 20000
    keys = torch.arange(n, dtype=torch.int64) * 7919 + 11
    uniforms = generation.keyed_uniform(keys, 4, len(logits))
    tokens = generation.sample_next(logits.expand(n, -1), temperature, 0, 1.0, None, uniforms)
    p = (logits / temperature).softmax(-1).double()
    freq = torch.bincount(tokens, minlength=len(logits)).double() / n
    assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)
    sub = torch.tensor([5, 17, 3])  # the same keys in a smaller, reordered batch draw the same tokens
    again = generation.sample_next(logits.expand(3, -1), temperature, 0, 1.0, None,
                                   generation.keyed_uniform(keys[sub], 4, len(logits)))  # fmt: skip
    assert torch.equal(again, tokens[sub])
    other_step = generation.sample_next(logits.expand(n, -1), temperature, 0, 1.0, None,
                                        generation.keyed_uniform(keys, 5, len(logits)))  # fmt: skip
    assert (other_step != tokens).float().mean() > 0.3  # another step, other draws
