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
from common.generation import eos_set


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
