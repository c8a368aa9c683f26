"""Rewards, defined once: the tokens a reward model scores, scoring them, and reward functions.

The tokens a reward model scores. Rendered through a chat template, a reply ends `... <|end|> \\n` (the demo
template, and ChatML templates such as Qwen's, write a newline after the end-of-turn token), but a generated reply
stops at EOS and never contains that newline. A sequence classifier reads its score at the last non-pad token, so
a reward model trained on rendered replies would be read at the newline in training and at EOS in RL: a position
its head was never trained on. Here every path -- reward-model training, its evaluation and stored statistics,
PPO, GRPO and rejection sampling, the SteerLM attribute labeller -- scores `prompt + reply up to and including the
first EOS` (`reward_model_tokens`), the one sequence both a dataset reply and a sampled reply can produce. A reply
that never emits EOS (truncated) is scored at its last token.

Reward functions (`--reward-fn module:function`): `fn(prompts, completions, **columns) -> list[float | None]`,
prompts and completions as text, `columns` the dataset row's other fields as lists (e.g. `answer=[...]`); `None`
means "this function has no reward for this sample". `call_reward_fn` checks what comes back and names the
function, the update and the prompt when it is wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Callable

import torch

from common import data
from common.dist import autocast, wrap_model
from common.generation import clock, eos_set


def reply_through_eos(response_ids: list[int], eos_id: int | Iterable[int]) -> list[int]:
    """The reply up to and including its first EOS, any of `eos_id` (all of it when there is none)."""
    ends = eos_set(eos_id)
    return response_ids[: next((i + 1 for i, t in enumerate(response_ids) if t in ends), len(response_ids))]


def reward_model_tokens(prompt_ids: list[int], response_ids: list[int], eos_id: int | Iterable[int]) -> list[int]:
    """The token ids a reward model scores for a prompt and a reply: prompt + reply through its first EOS (one id,
    or several: `common.models.end_of_turn_ids`, as generation stops)."""
    return list(prompt_ids) + reply_through_eos(response_ids, eos_id)


def conversation_reward_tokens(
    tokenizer, messages: list[dict], context: str = "conversation", eos_ids: list[int] | None = None
) -> list[int]:
    """`reward_model_tokens` of a conversation whose last message is the assistant reply being scored; `eos_ids`
    default to the tokenizer's EOS."""
    if not messages or messages[-1]["role"] != "assistant":
        raise data.DataError(f"{context}: the last message must be the assistant reply to score")
    prompt = messages[:-1]
    prompt_ids = data.render(tokenizer, prompt, add_generation_prompt=True)
    reply = data.tokenize_response(tokenizer, prompt, prompt_ids, messages[-1]["content"], context)
    return reward_model_tokens(prompt_ids, reply, eos_ids or tokenizer.eos_token_id)


def score_sequences(model, sequences: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Scores (B, N) of token sequences (from `reward_model_tokens`), read at each one's last token.

    Right-padded with position ids from the mask; `AutoModelForSequenceClassification` pools at the last non-pad
    token, so the saved model scores the same way when loaded by transformers alone.
    """
    batch = data.collate([{"input_ids": s, "labels": s} for s in sequences], pad_id)
    return model(**data.model_inputs(batch, model, device)).logits.float()


def score_replies(
    model,
    prompts: list[list[int]],
    replies: list[list[int]],
    pad_id: int,
    eos_id: int | Iterable[int],
    device: torch.device,
) -> torch.Tensor:
    """Scores (B, N) of generated replies (token ids) to prompts (token ids): what PPO, GRPO and rejection sampling
    read from a reward model, on exactly the tokens reward_model.py trains, evaluates and normalises on."""
    seqs = [reward_model_tokens(p, r, eos_id) for p, r in zip(prompts, replies)]
    return score_sequences(model, seqs, pad_id, device)


# ---------------------------------------------------------------------------------------------------------------
# Reward functions
# ---------------------------------------------------------------------------------------------------------------


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something that is not one finite number (or None) per sample."""


def load_callable(spec: str, flag: str) -> Callable:
    """`package.module:function` or `path/to/file.py:function` -> the function.

    Module paths are imported with the current directory on sys.path, so `my_rewards:exact` finds ./my_rewards.py.
    """
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise ValueError(f"{flag} {spec!r}: expected 'module.path:function' or 'file.py:function'")
    if module.endswith(".py"):
        if not Path(module).exists():
            raise FileNotFoundError(f"{flag} {spec!r}: no such file {module}")
        mod_spec = importlib.util.spec_from_file_location(Path(module).stem, module)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        mod = importlib.import_module(module)
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise TypeError(f"{flag} {spec!r}: {module} has no function {name!r}")
    return fn


def demo_reward(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """The demo task's verifiable reward: the hidden utility of the answer (0 if wrong, else 1 - 0.1 |verbosity - 2|)."""
    from common import demo_task

    return [demo_task.grade(p, c)["score"] for p, c in zip(prompts, completions)]


def load_reward_fn(spec: str) -> tuple[str, Callable]:
    """(name used in metrics and errors, function) for `--reward-fn`: `demo` is the demo task's grader."""
    if spec == "demo":
        return "demo", demo_reward
    return spec.rpartition(":")[2], load_callable(spec, "--reward-fn")


def call_reward_fn(
    name: str, fn: Callable, prompts: list[str], completions: list[str], columns: dict, update: int
) -> list[float | None]:
    """Call a reward function on a batch and check the result: one finite number or None per completion.

    Errors name the function, the update and (for a bad value) the prompt, because a silently wrong reward is the
    hardest RL bug to find.
    """
    try:
        out = fn(prompts, completions, **columns)
    except Exception as e:
        raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__} at update {update}: {e}") from e
    try:
        out = list(out)
    except TypeError:
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(out).__name__} at update {update}; expected a list"
        ) from None
    if len(out) != len(completions):
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(out)} values for {len(completions)} completions at update {update}"
        )
    checked: list[float | None] = []
    for k, value in enumerate(out):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardFunctionError(
                f"reward function {name!r} returned {value!r} at update {update} for prompt {prompts[k][:80]!r}; "
                "expected a finite number or None"
            )
        checked.append(float(value))
    return checked


# ---------------------------------------------------------------------------------------------------------------
# Every reward of a run, with its weight (grpo.py and rejection_sampling.py)
# ---------------------------------------------------------------------------------------------------------------


def combine_rewards(per_source: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Weighted sum (B,) of rewards (B, S) from S sources; NaN (a function's None) counts as 0 for that source."""
    w = torch.tensor(weights, dtype=per_source.dtype, device=per_source.device)
    return (torch.nan_to_num(per_source, nan=0.0) * w).sum(-1)


class RewardSources:
    """The rewards of an online run: `--reward-fn` callables and/or a reward model, with `--reward-weights`.

    Built from the flags every online script shares (grpo.py, rejection_sampling.py): the demo task's grader when
    the data are the demo's and nothing else is given; each function named in metrics as `reward/<name>`; the reward
    model scored on prompt + reply through EOS (`score_replies`) and, with `normalize`, standardised by the
    score_mean / score_std that reward_model.py stored in its config.
    """

    def __init__(self, reward_fn, reward_model_path, reward_weights, data_name: str, normalize: bool, dist,
                 pad_id: int, vocab_size: int, attn_implementation: str = "sdpa"):  # fmt: skip
        from transformers import AutoConfig

        from common.models import load_sequence_classifier

        specs = list(reward_fn)
        if not specs and reward_model_path is None:
            if data_name != "demo":
                raise ValueError("no reward: pass --reward-fn module:function and/or --reward-model-path")
            specs = ["demo"]
        self.fns = [load_reward_fn(spec) for spec in specs]
        self.names = [name for name, _ in self.fns] + (["reward_model"] if reward_model_path else [])
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"two rewards share a name {self.names}: metrics reward/<name> would collide")
        self.weights = list(reward_weights) or [1.0] * len(self.names)
        if len(self.weights) != len(self.names):
            raise ValueError(
                f"--reward-weights: {len(self.weights)} weights for {len(self.names)} rewards {self.names}"
            )
        self.model, self.score_mean, self.score_std, self.pad_id = None, None, None, pad_id
        if reward_model_path:
            config = AutoConfig.from_pretrained(reward_model_path)
            if config.num_labels != 1:
                raise ValueError(f"{reward_model_path}: a reward model with {config.num_labels} outputs; need 1")
            model = load_sequence_classifier(reward_model_path, dist.device, 1, attn_implementation=attn_implementation,
                                             pad_token_id=pad_id, vocab_size=vocab_size)  # fmt: skip
            self.model = wrap_model(model, dist, trainable=False)
            if normalize:
                self.score_mean = getattr(config, "score_mean", None)
                self.score_std = getattr(config, "score_std", None)

    def describe(self) -> str:
        norm = f", reward model normalised by ({self.score_mean}, {self.score_std})" if self.score_std else ""
        return f"rewards={dict(zip(self.names, self.weights))}{norm}"

    def score(self, records: list[dict], group_size: int, completions: list[str], queries: list[list[int]],
              responses: list[list[int]], eos_ids, update: int, micro_batch_size: int, dist) -> tuple[torch.Tensor, float]:  # fmt: skip
        """Every source's reward (B, S) of B = prompts x group_size samples (NaN where a function gave None), and the
        seconds it took.

        `records` from `data.parse_prompt_row` (a prompt's samples are consecutive): functions receive the prompt as
        the dataset gave it, the decoded `completions` and the row's other fields; the reward model scores the token
        ids `queries` + `responses` through EOS.
        """
        t0 = clock(dist)
        prompts = [r["given"] for r in records for _ in range(group_size)]
        columns = {k: [r["columns"].get(k) for r in records for _ in range(group_size)] for k in records[0]["columns"]}
        per_source = []
        for name, fn in self.fns:
            values = call_reward_fn(name, fn, prompts, completions, columns, update)
            per_source.append([float("nan") if v is None else v for v in values])
        out = torch.tensor(per_source, dtype=torch.float32, device=dist.device).T.reshape(len(queries), -1)
        if self.model is not None:
            with torch.no_grad(), autocast(dist):
                rm = torch.cat([
                    score_replies(self.model, queries[s : s + micro_batch_size], responses[s : s + micro_batch_size],
                                  self.pad_id, eos_ids, dist.device)[:, 0]
                    for s in range(0, len(queries), micro_batch_size)
                ])  # fmt: skip
            if self.score_mean is not None and self.score_std:
                rm = (rm - self.score_mean) / self.score_std
            out = torch.cat([out, rm[:, None].float()], dim=1)
        return out, clock(dist) - t0

    def combine(self, per_source: torch.Tensor) -> torch.Tensor:
        """The weighted total reward (B,) of `score`'s per-source rewards."""
        return combine_rewards(per_source, self.weights)

    def means(self, per_source: torch.Tensor, dist) -> dict:
        """`reward/<name>`: each source's mean over the samples it rewarded, over all ranks."""
        present = ~torch.isnan(per_source)
        sums = torch.cat([torch.nan_to_num(per_source, nan=0.0).sum(0), present.sum(0)]).double()
        dist.all_reduce(sums)
        S = len(self.names)
        return {f"reward/{name}": sums[s].item() / max(sums[S + s].item(), 1) for s, name in enumerate(self.names)}
