"""SteerLM: label responses with attribute values, train on them, then dial the values at inference.

SteerLM (Dong et al. 2023, "SteerLM: Attribute Conditioned SFT as an (User-Steerable) Alternative to RLHF")
replaces the reward model and RL loop of RLHF with three supervised stages:
    label     every response of an SFT set gets attribute values 0..4 (correctness, verbosity, ...), from an
              attribute-prediction model (`reward_model.py --objective regression`; its predictions are
              clamped to [0, 4] and rounded, as in NeMo-Aligner) or from rules (the "guiding signals");
    train     attribute-conditioned SFT: the values are written into the assistant turn's header as
              `correctness:4,verbosity:1,politeness:3` and the model learns p(response | prompt, attributes);
              the loss is on the response tokens only, never on the attribute string;
    generate  at inference the user writes the values they want into the same place;
and SteerLM 2.0 (Wang et al. 2024, "HelpSteer2", section 5.3) after them:
    steer2    sample n responses per (prompt, request) from the SteerLM model Q', weight them towards
              P(y|a,x) ~ P(a|x,y) P(y|x) with w' = softmax_i(log P(a|x,y_i) + log P(y_i|x) - log Q'(y_i|a,x))
              (P(a|x,y): the attribute model's predictions under a discretised Gaussian over the levels 0..4;
              P(y|x): the SFT model), and minimise the NLL weighted by w' - b', b' = softmax_i(log Q(y_i|a,x) -
              log Q'(y_i|a,x)) a baseline; --iterations times, each sampling from the model the last one trained.
Where this file departs from the paper: no step 4 ("bootstrapping": sampling responses at high-quality
attribute values, labelling them and training on them again); the attribute string goes through the
tokenizer's chat template (an assistant message's `attributes` key, and the template kwarg `attributes` for a
generation prompt) instead of a fixed prompt format, and a template that ignores `attributes` gets them as a
system message `Attributes: ...` (logged). The attributes describe a row's last assistant turn; earlier
assistant turns are trained as in sft.py. A request may leave attributes out (they are left out of the string),
but the demo model only ever saw all three, so it then picks values itself.

Steerability is measured on the demo task at the end of training: for each of verbosity and politeness, each
value 0..4 is requested with the other attributes held fixed (`--steer-fixed`), greedy responses are graded by
`demo_task.grade`, and the Spearman correlation (average ranks for ties) and exact-match rate between requested
and realised values are reported (`steer/<name>/spearman`, `steer/<name>/exact_match`). Ground truth
(`eval/accuracy`, `eval/score`) with `correctness:4` requested (`--eval-attributes`) is set beside that of the
unconditioned starting model (`initial/eval/...`) and of the same request with `correctness:0`
(`contrast/eval/...`): the first comparison includes the extra training, the second isolates the conditioning.

Run (no flags = `all`: label the demo SFT data by rule, train from out/sft (`python sft.py` first; without it,
from scratch), evaluate, write out/steerlm; about 4 minutes on 2 free CPU cores):
    python steerlm.py
    python steerlm.py label --data my_sft.jsonl --label-model out/reward_model --output-file labelled.jsonl
    python steerlm.py label --rules my_rules:score          # my_rules.py: def score(prompt, response) -> dict
    python steerlm.py train --data labelled.jsonl --model-path out/sft
    python steerlm.py generate --attributes verbosity=0,politeness=4 --prompt "What is 47 + 85?"
    python steerlm.py generate --prompts-file prompts.jsonl --output-file responses.jsonl
    torchrun --nproc_per_node 2 steerlm.py train            # FSDP2 (gloo on CPU, nccl on GPU)
    python steerlm.py train --resume                        # continue from out/steerlm/trainer_state
    python steerlm.py all --resume                          # the same, keeping out/steerlm/labelled.jsonl
    python steerlm.py steer2                                # SteerLM 2.0 from out/steerlm and out/sft -> out/steerlm2
    python steerlm.py steer2 --label-model out/attribute_model --attribute-sigma 0.4

Layout: the Args of each subcommand; the attribute string; labelling; the loss and metrics; generation and the
demo evaluation; SteerLM 2.0's weights and loss; then one function per subcommand (label_stage, train_stage,
generate_stage, steer2_stage), each a numbered sequence of steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from common import checkpoint, data, demo_task, lora, rewards
from common.dist import autocast, cleanup, exact_div, init_distributed, sampling_generator, seed_everything, wrap_model
from common.generation import clock, demo_eval, generate, response_logprobs, sample_key, truncate_after_eos
from common.lora import LoraArgs
from common.models import (
    end_of_turn_ids,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model_path,
)
from common.tracking import make_tracker
from common.training import Schedule, StopSignal, make_optimizer, make_scheduler, nonfinite_step, optimizer_step
from kernels import selective_logprob

DEFAULT_START = "out/sft"
DEFAULT_LABELLED = "out/steerlm/labelled.jsonl"
DEMO_ORDER = ",".join(demo_task.ATTRIBUTES)
MIN_VALUE, MAX_VALUE = 0, 4  # the HelpSteer / SteerLM attribute scale


@dataclass
class LabelOptions:
    """How responses get their attribute values (shared by `label` and `all`)."""

    label_model: str | None = None
    """attribute model (`reward_model.py --objective regression`: config has `attribute_names`); default: rules"""
    rules: str = "demo"
    """rules when no --label-model: `demo` (demo_task.grade's correctness, verbosity, politeness), or
    `module.path:function` / `file.py:function`, with function(prompt: str, response: str) -> dict[str, number]"""
    label_batch_size: int = 64
    """rows per forward of the --label-model on each rank"""
    chat_template: str | None = None
    """`chatml`, `llama3`, `plain` (User: / Assistant: turns, EOS after each reply) or a Jinja file; overrides the
    model's own template (base models have none)"""


@dataclass
class LabelArgs(LabelOptions):
    """Annotate SFT rows with attribute values and write them as attribute rows (jsonl)."""

    data: str = "demo"
    """SFT data to label (jsonl/json/parquet/csv or hub name): messages or prompt + completion; `demo` = demo task"""
    output_file: str = DEFAULT_LABELLED
    """where the labelled rows are written (jsonl, atomically): {"messages": [...], "attributes": {name: value}}"""
    max_seq_len: int = 128
    """--label-model: longest conversation it reads (longer: an error, or a skip with --skip-bad-rows)"""
    skip_bad_rows: bool = False
    """skip (and count) malformed rows instead of stopping at the first one"""
    split: str = "train"
    """the split of --data to read (a dataset directory or hub name, e.g. train_prefs; a single file is 'train')"""


@dataclass
class TrainArgs:
    """Attribute-conditioned SFT on attribute-labelled rows, then the steerability evaluation."""

    # --- experiment ---
    exp_name: str = "steerlm"
    """name of the run (wandb run name)"""
    seed: int = 1
    """seed for initialisation, data order and sampling"""
    output_dir: str = "out/steerlm"
    """where the model (save_pretrained), trainer_state/, metrics.jsonl and eval.json are written"""
    resume: bool = False
    """continue from output_dir/trainer_state (model, optimizer, scheduler, RNG, data position)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "plainalign"
    """wandb project name"""

    # --- model and data ---
    model_path: str = DEFAULT_START
    """HF causal LM to start from; `demo` = the built-in tiny Llama from scratch (also used when out/sft is missing)"""
    data: str = DEFAULT_LABELLED
    """attribute rows (the label stage's output): SFT row + {"attributes": {name: 0..4}}, or HelpSteer columns;
    `demo` = the demo task's rule-labelled rows"""
    eval_data: str | None = None
    """held-out attribute rows for eval/loss; default: the last --eval-size rows of --data"""
    eval_size: int = 256
    """rows held out from --data for eval/loss when --eval-data is not given"""
    attributes_order: str = DEMO_ORDER
    """attributes the model is conditioned on, in written order (an unknown one is an error, a missing one left out)"""
    max_seq_len: int = 128
    """tokens per example, attribute string included (longer examples are truncated on the right)"""
    skip_bad_rows: bool = False
    """skip (and count) malformed rows instead of stopping at the first one"""
    split: str = "train"
    """the split of --data to read (a dataset directory or hub name, e.g. train_prefs; a single file is 'train')"""
    eval_split: str | None = None
    """hold out this split of --data (e.g. test_prefs; of --eval-data when given) instead of its last --eval-size rows"""
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
    learning_rate: float = 1e-3
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)"""
    lr_schedule: Schedule = "cosine"
    """decay after warmup"""
    warmup_steps: int = 20
    """linear warmup steps"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 = off)"""

    # --- batch sizes (local_ = per rank; global = local x accumulation x ranks) ---
    local_micro_batch_size: int = 32
    """examples per forward/backward on each rank"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    num_epochs: float = 1.0
    """passes over the training data (fractions allowed); used when --total-steps is 0"""
    total_steps: int = 500
    """optimizer steps (0 = derived from --num-epochs); the default fits the demo's CPU time budget"""

    # --- evaluation and logging ---
    log_every: int = 25
    """steps between metric logs"""
    eval_every: int = 250
    """steps between eval/loss measurements (0 = only at the end)"""
    save_every: int = 500
    """steps between checkpoints (0 = only at the end)"""
    demo_eval_prompts: int = 1024
    """held-out demo prompts for eval/accuracy, eval/score: start model vs --eval-attributes (0 = off; demo data)"""
    steer_prompts: int = 64
    """held-out demo prompts per requested value in the steerability evaluation (0 = off; demo data only)"""
    steer_attributes: str = "verbosity,politeness"
    """attributes whose values 0..4 are each requested in the steerability evaluation"""
    steer_fixed: str = "correctness:4,verbosity:2,politeness:2"
    """values of the other attributes while one is steered"""
    eval_attributes: str = "correctness:4,verbosity:2,politeness:2"
    """values requested for eval/accuracy and eval/score (compared with the start model, which is asked nothing)"""
    max_new_tokens: int = 64
    """generation length in the evaluations"""
    skip_nonfinite: bool = False
    """skip steps whose loss is NaN/Inf (counted as train/skipped_steps) instead of stopping"""
    activation_checkpointing: bool = False
    """recompute activations in backward (less memory, ~30% more compute)"""


@dataclass
class AllArgs(LabelOptions, TrainArgs):
    """label -> train -> evaluate: the SFT data is labelled into output_dir/labelled.jsonl, then trained on."""

    data: str = "demo"
    """SFT data to label, then train on (jsonl/json/parquet/csv or a datasets hub name); `demo` = the built-in task"""


@dataclass
class GenerateArgs:
    """Respond to prompts with requested attribute values."""

    model_path: str = "out/steerlm"
    """a model trained by `steerlm.py train` (HF directory or hub id)"""
    chat_template: str | None = None
    """`chatml`, `llama3`, `plain` or a Jinja file; overrides the model's own template"""
    attributes: str = ""
    """requested values, `name=value,...` or `name:value,...` (an attribute not given is left out of the string)"""
    prompt: str | None = None
    """one user prompt; the response is printed"""
    prompts_file: str | None = None
    """batch mode: rows {"prompt": str|messages}, optionally "attributes" ({...} or "name:v,...") over --attributes"""
    output_file: str | None = None
    """batch mode: where to write {"prompt", "attributes", "response"} rows (jsonl, atomically); default: print them"""
    attributes_order: str | None = None
    """order of the attribute string; default: the one the model was trained with (its config), else the demo's"""
    max_new_tokens: int = 64
    """tokens generated per response"""
    temperature: float = 0.0
    """0 = greedy; > 0 samples"""
    top_p: float = 1.0
    """nucleus sampling threshold (with --temperature > 0)"""
    batch_size: int = 64
    """prompts per generation batch on each rank"""
    seed: int = 1
    """seed for sampling"""


@dataclass
class Steer2Args(LabelOptions):
    """SteerLM 2.0: sample from the SteerLM model Q', weight the samples towards P(y|a,x) ~ P(a|x,y) P(y|x), train Q
    on the weighted NLL; --iterations times. The attribute model is --label-model, or the rules (--rules)."""

    # --- experiment ---
    exp_name: str = "steerlm2"
    """name of the run (wandb run name)"""
    seed: int = 1
    """seed for the prompt order and sampling"""
    output_dir: str = "out/steerlm2"
    """where the model (save_pretrained), trainer_state/, metrics.jsonl and eval.json are written"""
    resume: bool = False
    """continue from output_dir/trainer_state after the last finished iteration"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works)"""
    wandb_project: str = "plainalign"
    """wandb project name"""

    # --- models and data ---
    model_path: str = "out/steerlm"
    """Q': the SteerLM model trained by `steerlm.py train`; Q_theta starts from it"""
    sft_model_path: str = DEFAULT_START
    """P(y|x): the unconditioned SFT model (same tokenizer as --model-path)"""
    attribute_sigma: float = 0.5
    """noise model of the attribute model: P(a_k = v | x, y) ~ exp(-(v - prediction_k)^2 / (2 sigma^2)) over the
    levels 0..4, independent across attributes; sigma in levels (the attribute model's error; a level off costs
    about 1 / (2 sigma^2) nats)"""
    data: str = DEFAULT_LABELLED
    """(prompt, request) pairs: attribute rows (the label stage's output), each prompt asking for its row's values"""
    attributes_order: str | None = None
    """order of the attribute string; default: the one Q' was trained with (its config), else the demo's"""
    max_prompt_len: int = 96
    """longest conditioned prompt accepted (longer: see --prompt-truncation)"""
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

    # --- optimiser ---
    learning_rate: float = 5e-5
    """peak learning rate (AdamW); on the demo 5e-4 (32 steps) raised the samples' entropy and cut the ideal request's
    accuracy from 0.59 to 0.11 (docs/steerlm.md)"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)"""
    lr_schedule: Schedule = "constant"
    """decay over all optimizer steps after warmup"""
    warmup_steps: int = 0
    """linear warmup steps"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 = off)"""

    # --- batch sizes (local_ = per rank; global = x ranks); a group = one (prompt, request) and its n samples ---
    iterations: int = 2
    """rounds of: sample from the current model (the new Q'), weight, train"""
    prompts_per_iteration: int = 128
    """(prompt, request) pairs sampled per iteration, over all ranks"""
    num_samples: int = 8
    """n: responses sampled per (prompt, request); the weights are normalised over them"""
    epochs_per_iteration: int = 1
    """passes over each iteration's samples"""
    num_minibatches: int = 4
    """optimizer steps per epoch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step (each holds whole groups)"""
    forward_batch_size: int = 64
    """sequences per no-grad forward (log Q', log P(y|x), the attribute model) on each rank"""

    # --- generation ---
    max_new_tokens: int = 64
    """response length, in sampling and in the evaluations"""
    temperature: float = 1.0
    """sampling temperature; log Q' is taken at it (the proposal), log P(y|x) and log Q_theta at 1"""

    # --- evaluation and logging ---
    save_every: int = 1
    """iterations between checkpoints (0 = only at the end)"""
    demo_eval_prompts: int = 1024
    """held-out demo prompts for eval/accuracy, eval/score with --eval-attributes, before and after (0 = off)"""
    steer_prompts: int = 64
    """held-out demo prompts per requested value in the steerability evaluation, before and after (0 = off)"""
    steer_attributes: str = "verbosity,politeness"
    """attributes whose values 0..4 are each requested in the steerability evaluation"""
    steer_fixed: str = "correctness:4,verbosity:2,politeness:2"
    """values of the other attributes while one is steered"""
    eval_attributes: str = "correctness:4,verbosity:2,politeness:2"
    """the ideal request, graded before and after"""
    skip_nonfinite: bool = False
    """skip steps whose loss is NaN/Inf (counted as steer2/skipped_steps) instead of stopping"""
    activation_checkpointing: bool = False
    """recompute activations in backward (less memory, ~30% more compute)"""


# `all` first: an AllArgs is also a TrainArgs, and tyro shows the first matching subcommand as the default
Command = (
    Annotated[AllArgs, tyro.conf.subcommand("all", description=AllArgs.__doc__)]
    | Annotated[LabelArgs, tyro.conf.subcommand("label", description=LabelArgs.__doc__)]
    | Annotated[TrainArgs, tyro.conf.subcommand("train", description=TrainArgs.__doc__)]
    | Annotated[GenerateArgs, tyro.conf.subcommand("generate", description=GenerateArgs.__doc__)]
    | Annotated[Steer2Args, tyro.conf.subcommand("steer2", description=Steer2Args.__doc__)]
)


# ---------------------------------------------------------------------------------------------------------------
# The attribute string
# ---------------------------------------------------------------------------------------------------------------


def parse_order(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",")]
    if not spec.strip() or not all(names) or len(set(names)) != len(names):
        raise ValueError(f"--attributes-order {spec!r}: expected distinct comma-separated names")
    return names


def format_attributes(values: dict, order: list[str]) -> str:
    """{"verbosity": 1, "correctness": 4.0} -> "correctness:4,verbosity:1" in `order`; None (missing) is left out.

    Values are rounded to the nearest integer (the label stage writes integers already). A name outside
    `order` is a KeyError: the model would be conditioned on something it is never asked for.
    """
    unknown = [n for n in values if n not in order]
    if unknown:
        raise KeyError(f"attribute {unknown[0]!r} is not in the attribute order ({','.join(order)})")
    return ",".join(f"{n}:{round(values[n])}" for n in order if values.get(n) is not None)


def parse_attributes_string(text: str) -> dict[str, int]:
    """Parse `correctness:4,verbosity:1` (or `verbosity=1`) into {"correctness": 4, "verbosity": 1}; errors
    name the offending item."""
    if not text.strip():
        raise ValueError("attribute string is empty")
    values: dict[str, int] = {}
    for item in text.split(","):
        sep = ":" if ":" in item else "="
        name, found, value = (s.strip() for s in item.partition(sep))
        if not found:
            raise ValueError(f"attribute string {text!r}: item {item.strip()!r} is not name:value")
        if not name:
            raise ValueError(f"attribute string {text!r}: item {item.strip()!r} has no name")
        if not re.fullmatch(r"-?\d+", value):
            raise ValueError(f"attribute string {text!r}: value {value!r} of {name!r} is not an integer")
        if name in values:
            raise ValueError(f"attribute string {text!r}: {name!r} is given twice")
        values[name] = int(value)
    return values


def conditioning_mode(tokenizer) -> Literal["template", "system"]:
    """`template` when the chat template writes an assistant message's `attributes` and the `attributes` kwarg
    of a generation prompt (the demo template does); else `system` (an `Attributes: ...` system message)."""
    probe, prompt = "probe_attribute:3", [{"role": "user", "content": "hi"}]
    gen = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, attributes=probe)
    turn = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": "ok", "attributes": probe}], tokenize=False
    )
    return "template" if probe in gen and probe in turn else "system"


def with_attributes(messages: list[dict], attributes: str, mode: str) -> list[dict]:
    """The conversation conditioned on `attributes`: in the last assistant turn's header (template mode) or a
    system message. An empty string leaves the conversation as it is (plain SFT)."""
    messages = [{k: v for k, v in m.items() if k != "attributes"} for m in messages]
    if not attributes:
        return messages
    if mode == "system":
        return with_system(messages, attributes)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages[last]["attributes"] = attributes
    return messages


def with_system(messages: list[dict], attributes: str) -> list[dict]:
    line = f"Attributes: {attributes}"
    if messages and messages[0]["role"] == "system":  # one system message: some templates reject a second
        return [{"role": "system", "content": messages[0]["content"] + "\n" + line}] + messages[1:]
    return [{"role": "system", "content": line}] + messages


def request_ids(tokenizer, prompt: list[dict], attributes: str, mode: str) -> list[int]:
    """Token ids of a generation prompt that requests `attributes`."""
    if not attributes:
        return data.render(tokenizer, prompt, add_generation_prompt=True)
    if mode == "system":
        return data.render(tokenizer, with_system(prompt, attributes), add_generation_prompt=True)
    return data.render(tokenizer, prompt, add_generation_prompt=True, attributes=attributes)


def tokenize_example(tokenizer, record: dict, order: list[str], mode: str, max_len: int, context: str) -> dict:
    """An attribute row as an SFT example: labels on the response tokens only (the attribute string is part of
    the prompt side, so it carries no loss)."""
    try:
        attributes = format_attributes(record["attributes"], order)
    except KeyError as e:
        name = next(n for n in record["attributes"] if n not in order)
        raise data.DataError(f"{context}, field 'attributes.{name}': {e.args[0]}; pass --attributes-order") from None
    return data.tokenize_sft(
        tokenizer, {"messages": with_attributes(record["messages"], attributes, mode)}, max_len, context
    )


def parse_request_row(row: dict, source: str, i: int, default: dict, order: list[str]) -> tuple:
    """A `generate --prompts-file` row -> (prompt as given, messages, attribute string); its "attributes" ({...} or
    "name:v,...") override `default`. Errors name file, row and field."""
    prompt = data.parse_prompt(row, source, i)["prompt"]
    where = data.where(source, i, "attributes")
    values = row.get("attributes") or {}
    try:
        values = parse_attributes_string(values) if isinstance(values, str) else values
    except ValueError as e:
        raise data.DataError(f"{where}: {e}") from None
    if not isinstance(values, dict):
        raise data.DataError(f"{where}: expected an object or a 'name:value,...' string, got {type(values).__name__}")
    values = {k: v for k, v in values.items() if v is not None}  # datasets fills absent keys with None
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise data.DataError(f"{where}: {name!r} is not a number ({type(value).__name__})")
    try:
        attributes = format_attributes(default | values, order)
    except KeyError as e:
        raise data.DataError(f"{where}: {e.args[0]}") from None
    return row.get("prompt") or row.get("messages"), prompt, attributes


# ---------------------------------------------------------------------------------------------------------------
# Labelling: guiding signals from a model or from rules
# ---------------------------------------------------------------------------------------------------------------


def clamp_round(pred: torch.Tensor, low: int = MIN_VALUE, high: int = MAX_VALUE) -> torch.Tensor:
    """Attribute-model predictions -> integer labels: rounded (half to even), then clamped to [low, high]."""
    return pred.float().round().clamp(low, high).long()


def demo_rules(prompt: str, response: str) -> dict[str, int]:
    """The demo task's guiding signals: correctness (0 or 4), verbosity and politeness (0..4), read by rule."""
    graded = demo_task.grade(prompt, response)
    return {name: graded[name] for name in demo_task.ATTRIBUTES}


def load_rules(spec: str) -> Callable[[str, str], dict]:
    """`demo`, `package.module:function`, or `path/to/file.py:function` -> the function (common.rewards.load_callable:
    module paths are imported with the current directory on sys.path, so `--rules my_rules:score` finds ./my_rules.py).
    """
    return demo_rules if spec == "demo" else rewards.load_callable(spec, "--rules")


def rule_labels(fn: Callable, prompt: str, response: str, context: str) -> dict[str, int]:
    """Call a rule function and check what it returns: a dict of finite numbers, rounded to integers."""
    try:
        out = fn(prompt, response)
    except Exception as e:  # a user's function failing on one row: say which row
        raise data.DataError(f"{context}: the rule function raised {type(e).__name__}: {e}") from e
    if not isinstance(out, dict) or not out:
        raise data.DataError(
            f"{context}: the rule function returned {type(out).__name__}, expected a non-empty dict of name: number"
        )
    values = {}
    for name, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise data.DataError(f"{context}: the rule function returned {name!r}: {value!r}, expected a finite number")
        values[str(name)] = round(value)
    return values


def split_turn(messages: list[dict]) -> tuple[str, str]:
    """(the user message before the last assistant turn, that assistant turn): what a rule function reads."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    return (users[-1] if users else ""), messages[last]["content"]


def pad_to_multiple(items: list, k: int) -> list:
    """Repeat the last item until len(items) is a multiple of k (every rank must run the same batches)."""
    return items + items[-1:] * (-len(items) % k)


@torch.no_grad()
def predict_attributes(model, sequences: list[list[int]], pad_id: int, batch_size: int, dist) -> torch.Tensor:
    """Raw predictions (B, K) of an attribute model on token sequences (`common.rewards.reward_model_tokens`: prompt
    + reply through its end-of-turn), `batch_size` sequences per forward. Every rank must pass as many sequences."""
    preds = []
    for s in range(0, len(sequences), batch_size):
        with autocast(dist):
            preds.append(rewards.score_sequences(model, sequences[s : s + batch_size], pad_id, dist.device).float())
    return torch.cat(preds) if preds else torch.zeros(0, 0)


# ---------------------------------------------------------------------------------------------------------------
# The loss and the metrics
# ---------------------------------------------------------------------------------------------------------------


def count_label_tokens(example: dict) -> int:
    """Tokens that carry a loss: labels shifted by one (position t predicts token t+1)."""
    return sum(label != data.IGNORE_INDEX for label in example["labels"][1:])


def sft_loss_sum(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Summed NLL of the labelled tokens of a batch (normalisation is the caller's, over the global batch)."""
    logits = model(**data.model_inputs(batch, model, device)).logits  # (B, T, V)
    labels = batch["labels"][:, 1:].to(device)  # (B, T-1): position t predicts token t+1
    logprobs = selective_logprob(logits[:, :-1], labels)  # (B, T-1), 0 where label == -100
    return -logprobs.sum()


@torch.no_grad()
def evaluate_loss(model, examples: list, args: TrainArgs, dist, pad_id: int) -> float:
    """Token-averaged NLL of held-out responses given their attributes (sharded across ranks)."""
    model.eval()
    n = len(examples) - len(examples) % dist.world_size
    local = dist.shard(examples[:n])
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for mb in data.micro_batches(local, args.local_micro_batch_size):
        with autocast(dist):
            total[0] += sft_loss_sum(model, data.collate(mb, pad_id), dist.device).double()
        total[1] += sum(count_label_tokens(e) for e in mb)
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span ([5, 7, 7] -> [1, 2.5, 2.5])."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of average ranks; NaN when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Generation and the demo-task evaluation (steerability, ground truth)
# ---------------------------------------------------------------------------------------------------------------


def respond(model, tokenizer, dist, prompts: list[list[dict]], attributes: list[str], mode: str, max_new_tokens: int,
            temperature: float = 0.0, top_p: float = 1.0, generator=None, batch_size: int = 256,
            eos_ids: list[int] | None = None):  # fmt: skip
    """(texts, token counts) of the responses to prompts, each requesting its attribute string; generation stops at
    any of `eos_ids` (default: the tokenizer's EOS)."""
    ids = [request_ids(tokenizer, p, a, mode) for p, a in zip(prompts, attributes)]
    out = generate(
        model, ids, pad_id=tokenizer.pad_token_id, eos_id=eos_ids or tokenizer.eos_token_id, max_new_tokens=max_new_tokens,
        dist=dist, temperature=temperature, top_p=top_p, generator=generator, batch_size=batch_size,
    )  # fmt: skip
    return tokenizer.batch_decode(out, skip_special_tokens=True), [len(o) for o in out]


def is_demo_data(records: list[dict], n: int = 64) -> bool:
    """The demo-task evaluations only mean something when the prompts are demo-task prompts."""
    return all(demo_task.solve(split_turn(r["messages"])[0]) is not None for r in records[:n])


def check_demo_requests(args, order: list[str]) -> None:
    """Fail before training, not after it, on an evaluation request the model cannot be asked: --steer-fixed and
    --eval-attributes must parse and name attributes of the order, --steer-attributes must be graded by the demo."""
    for flag, spec in (("--steer-fixed", args.steer_fixed), ("--eval-attributes", args.eval_attributes)):
        try:
            format_attributes(parse_attributes_string(spec), order)
        except KeyError as e:
            raise ValueError(f"{flag} {spec!r}: {e.args[0]}") from None
    for name in parse_order(args.steer_attributes):
        if name not in order or name not in demo_task.ATTRIBUTES:
            raise ValueError(f"--steer-attributes: {name!r} is not both in the attribute order and graded by the demo")


def grade_means(graded: list[tuple[dict, int]], prefix: str = "") -> dict:
    """Means over (demo_task.grade result, response tokens) pairs, under demo_eval's keys: eval/score,
    eval/accuracy, eval/verbosity, eval/politeness, eval/response_length (each after `prefix`)."""
    n = len(graded)
    means = {f"{prefix}eval/{'accuracy' if k == 'correct' else k}": sum(g[k] for g, _ in graded) / n
             for k in ("score", "correct", "verbosity", "politeness")}  # fmt: skip
    return means | {f"{prefix}eval/response_length": sum(tokens for _, tokens in graded) / n}


def steer_lines(metrics: dict, names: list[str]) -> list[str]:
    """One line per steered attribute: Spearman, exact match, and the mean realised value per requested value."""
    return [
        f"steer {name}: spearman {metrics[f'steer/{name}/spearman']:.3f}, exact match "
        f"{metrics[f'steer/{name}/exact_match']:.3f}, realised mean per requested 0..4: "
        + " ".join(f"{metrics[f'steer/{name}/realised_at_{v}']:.2f}" for v in range(MIN_VALUE, MAX_VALUE + 1))
        for name in names
    ]


@torch.no_grad()
def evaluate(model, tokenizer, dist, args: TrainArgs, order: list[str], mode: str) -> tuple[dict, list]:
    """Steerability and ground truth on held-out demo prompts, greedy.

    Steerability: for each attribute of --steer-attributes, every value 0..4 is requested (the others as in
    --steer-fixed) on --steer-prompts prompts; `demo_task.grade` reads the realised value from each response.
    Reports steer/<name>/spearman (requested vs realised, over all prompts and values), steer/<name>/exact_match,
    and per requested value v: steer/<name>/realised_at_<v> (mean realised value), steer/<name>/accuracy_at_<v>.
    Ground truth with --eval-attributes requested: eval/score, eval/accuracy, eval/verbosity, eval/politeness,
    eval/response_length (the keys of demo_eval); when that request has `correctness`, the same request with
    correctness 0 gives contrast/eval/* (does the model act on the correctness it is asked for?).
    """
    fixed = parse_attributes_string(args.steer_fixed)
    steer_names = parse_order(args.steer_attributes) if args.steer_prompts >= dist.world_size else []
    steer_prompts = dist.shard(demo_task.eval_prompts(args.steer_prompts - args.steer_prompts % dist.world_size))
    jobs = []  # (group, requested value, prompt, attribute string); group = steered attribute, "eval" or "contrast"
    for name in steer_names:
        for value in range(MIN_VALUE, MAX_VALUE + 1):
            request = format_attributes(fixed | {name: value}, order)
            jobs += [(name, value, p, request) for p in steer_prompts]
    eval_request = parse_attributes_string(args.eval_attributes)
    eval_prompts = dist.shard(demo_task.eval_prompts(args.demo_eval_prompts - args.demo_eval_prompts % dist.world_size))
    jobs += [("eval", None, p, format_attributes(eval_request, order)) for p in eval_prompts]
    if "correctness" in eval_request:
        jobs += [
            ("contrast", None, p, format_attributes(eval_request | {"correctness": 0}, order)) for p in eval_prompts
        ]
    texts, lengths = respond(model, tokenizer, dist, [[{"role": "user", "content": j[2]}] for j in jobs],
                             [j[3] for j in jobs], mode, args.max_new_tokens)  # fmt: skip
    local = [(group, v, demo_task.grade(p, t), n) for (group, v, p, _), t, n in zip(jobs, texts, lengths)]
    results = [x for part in dist.all_gather_object(local) for x in part]
    metrics = {}
    for name in steer_names:
        pairs = [(v, g[name], g["correct"]) for group, v, g, _ in results if group == name]
        metrics[f"steer/{name}/spearman"] = spearman([v for v, _, _ in pairs], [r for _, r, _ in pairs])
        metrics[f"steer/{name}/exact_match"] = sum(v == r for v, r, _ in pairs) / len(pairs)
        for value in range(MIN_VALUE, MAX_VALUE + 1):
            at = [(r, c) for v, r, c in pairs if v == value]
            metrics[f"steer/{name}/realised_at_{value}"] = sum(r for r, _ in at) / len(at)
            metrics[f"steer/{name}/accuracy_at_{value}"] = sum(c for _, c in at) / len(at)
    for group, prefix in (("eval", ""), ("contrast", "contrast/")):
        graded = [(g, n) for gr, _, g, n in results if gr == group]
        if graded:
            metrics |= grade_means(graded, prefix)
    # one sample per steering request (its first prompt on this rank), then the first two ground-truth ones
    samples = [[p, s, t] for (_, _, p, s), t in zip(jobs, texts)]
    n_steer = len(steer_prompts) * len(steer_names) * (MAX_VALUE - MIN_VALUE + 1)  # the steering jobs come first
    firsts = samples[: n_steer : len(steer_prompts)] if steer_prompts else []
    return metrics, firsts + samples[n_steer:][:2]


# ---------------------------------------------------------------------------------------------------------------
# SteerLM 2.0: importance weights, baseline, loss (HelpSteer2 paper, Wang et al. 2024, section 5.3)
# ---------------------------------------------------------------------------------------------------------------


def attribute_logprob(pred: torch.Tensor, requested: torch.Tensor, sigma: float) -> torch.Tensor:
    """log P(a | x, y) (B,) of requests (B, K) given attribute predictions (B, K), under a discretised Gaussian.

    Each attribute k is independent: P(a_k = v) = exp(-(v - pred_k)^2 / (2 sigma^2)) / Z(pred_k), normalised over the
    levels v = 0..4 the request can take (a regression model predicts a real number; the request is a level). An
    attribute not requested (NaN) contributes 0: the request says nothing about it.
    """
    levels = torch.arange(MIN_VALUE, MAX_VALUE + 1, dtype=torch.float64, device=pred.device)  # (L,)
    logits = -((levels - pred.double()[..., None]) ** 2) / (2 * sigma**2)  # (B, K, L)
    logp = torch.log_softmax(logits, dim=-1)
    asked = ~torch.isnan(requested)
    index = (torch.nan_to_num(requested, nan=MIN_VALUE).round().long() - MIN_VALUE).clamp(0, MAX_VALUE - MIN_VALUE)
    picked = logp.gather(-1, index[..., None]).squeeze(-1)  # (B, K)
    return torch.where(asked, picked, torch.zeros_like(picked)).sum(-1)


def importance_weights(log_attr: torch.Tensor, log_p: torch.Tensor, log_q_prime: torch.Tensor) -> torch.Tensor:
    """w' (G, n): self-normalised importance weights of the n samples of each group (drawn from Q'(y|a,x)) towards
    P(y|a,x) ~ P(a|x,y) P(y|x): softmax_i(log P(a|x,y_i) + log P(y_i|x) - log Q'(y_i|a,x)). Inputs (G, n)."""
    return torch.softmax((log_attr + log_p - log_q_prime).double(), dim=-1)


def baseline_weights(log_q_theta: torch.Tensor, log_q_prime: torch.Tensor) -> torch.Tensor:
    """b' (G, n): the same self-normalised weights towards the current model Q_theta, softmax_i(log Q_theta(y_i|a,x) -
    log Q'(y_i|a,x)). sum_i b'_i grad log Q_theta(y_i) estimates E_Q_theta[grad log Q_theta] = 0: a baseline."""
    return torch.softmax((log_q_theta - log_q_prime).double(), dim=-1)


def weights_kl(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(w' || b') (G,) per group (0 log 0 = 0): how far the current model still is from the target on the samples."""
    return torch.xlogy(w, w).sum(-1) - (w * torch.log(b.clamp(min=1e-300))).sum(-1)


def steer2_loss(logprobs: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """sum_i coef_i * NLL_i / norm_i: the NLL of each sample (B,) from token log-probs (B, T) under `mask`, weighted
    by coef = w' - b' (detached) and divided by its group's mean response length `norm` (B,), as NeMo-Aligner does.
    Its gradient is -sum_i (w'_i - b'_i) grad log Q_theta(y_i) / norm_i, the estimate of grad KL(P(y|a,x) || Q_theta);
    0 when w' = b'."""
    nll = -(logprobs * mask).sum(-1)  # (B,)
    return (coef.to(nll.dtype) * nll / norm.to(nll.dtype)).sum()


@torch.no_grad()
def sequence_logprobs(
    model,
    queries: torch.Tensor,
    responses: torch.Tensor,
    mask: torch.Tensor,
    pad_id: int,
    temperature: float,
    batch_size: int,
    dist,
) -> torch.Tensor:
    """log model(response | query) (B,) summed over the response tokens under `mask`, `batch_size` rows a forward."""
    out = []
    for s in range(0, len(queries), batch_size):
        with autocast(dist):
            lp = response_logprobs(
                model, queries[s : s + batch_size], responses[s : s + batch_size], pad_id, temperature
            )
        out.append((lp.float() * mask[s : s + batch_size]).sum(-1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# The stages: label -> train (+ evaluate) -> generate; steer2
# ---------------------------------------------------------------------------------------------------------------


def label_stage(args, dist, output_file: str) -> Path:
    """Annotate every SFT row of args.data and write attribute rows to `output_file` (rank 0, atomically)."""
    say = print if dist.is_main else (lambda *a, **k: None)
    t0 = time.time()

    # 1. read and check every row (errors name file, row and field)
    data_path = data.resolve_data_path(args.data, "sft", dist)
    rows = data.load_rows(data_path, args.split)
    parsed = data.parse_rows(rows, data.parse_sft, rows.source, args.skip_bad_rows)
    records = [{"messages": with_attributes(r["messages"], "", "template"), "row": r["row"]} for r in parsed.records]
    n = len(records)
    local = dist.shard(pad_to_multiple(records, dist.world_size))  # contiguous slices: gathering keeps row order

    # 2. guiding signals: an attribute-prediction model (clamped, rounded) or rules. A row that cannot be
    # labelled gets its error message instead of labels, so every rank decides the same way after gathering.
    labels: list[dict | str] = []
    if args.label_model:
        from transformers import AutoConfig

        names = getattr(AutoConfig.from_pretrained(args.label_model), "attribute_names", None)
        if not names:
            raise ValueError(
                f"--label-model {args.label_model}: its config has no `attribute_names` "
                "(train one with `reward_model.py --objective regression`)"
            )
        tokenizer = load_tokenizer(args.label_model, chat_template=args.chat_template)
        eos_ids = end_of_turn_ids(tokenizer, args.label_model)
        model = load_sequence_classifier(args.label_model, dist.device, len(names), pad_token_id=tokenizer.pad_token_id,
                                         vocab_size=len(tokenizer))  # fmt: skip
        model = wrap_model(model, dist, trainable=False)
        say(f"labelling {n} rows with {args.label_model} (attributes {names}) on {dist.world_size} rank(s)")
        # the tokens the attribute model was trained on (common.rewards: prompt + reply through its end-of-turn)
        seqs = [
            rewards.conversation_reward_tokens(tokenizer, r["messages"], data.where(parsed.source, r["row"]), eos_ids)
            for r in local
        ]
        fits = [len(s) <= args.max_seq_len for s in seqs]
        # a row too long for the model is not scored from a truncated view: it is reported, and a stand-in keeps
        # the number of forwards equal on every rank (FSDP)
        stand_in = next((s for s, ok in zip(seqs, fits) if ok), [tokenizer.pad_token_id])
        pred = predict_attributes(model, [s if ok else stand_in for s, ok in zip(seqs, fits)], tokenizer.pad_token_id,
                                  args.label_batch_size, dist)  # fmt: skip
        for i, values in enumerate(clamp_round(pred).tolist()):
            context = data.where(parsed.source, local[i]["row"])
            too_long = f"{context}: {len(seqs[i])} tokens, over --max-seq-len {args.max_seq_len} of the label model"
            labels.append(dict(zip(names, values)) if fits[i] else too_long)
    else:
        fn = load_rules(args.rules)
        say(f"labelling {n} rows with rules {args.rules!r} on {dist.world_size} rank(s)")
        for r in local:
            try:
                labels.append(rule_labels(fn, *split_turn(r["messages"]), data.where(parsed.source, r["row"])))
            except data.DataError as e:
                labels.append(str(e))

    # 3. gather in row order (the padding repeats sit at the end), write atomically
    gathered = [x for part in dist.all_gather_object(list(zip(local, labels))) for x in part][:n]
    bad = [lab for _, lab in gathered if isinstance(lab, str)]
    if bad and not args.skip_bad_rows:
        raise data.DataError(bad[0])
    rows = [{"messages": r["messages"], "attributes": lab} for r, lab in gathered if isinstance(lab, dict)]
    if not rows:
        raise data.DataError(f"{parsed.source}: no row could be labelled ({len(bad)} skipped)")
    if dist.is_main:
        demo_task.write_jsonl(rows, output_file)
        for name in rows[0]["attributes"]:
            counts = Counter(r["attributes"].get(name) for r in rows)
            say(f"  {name}: " + " ".join(f"{v}:{counts[v]}" for v in sorted(counts)))
        for err in (parsed.errors + bad)[:5]:
            say(f"skipped: {err}")
        say(
            f"labelled {len(rows)} rows ({parsed.skipped + len(bad)} skipped) -> {output_file} "
            f"in {time.time() - t0:.1f}s"
        )
    dist.barrier()
    return Path(output_file)


def train_stage(args: TrainArgs, dist) -> dict:
    """Attribute-conditioned SFT, then the evaluation; the body mirrors sft.py step for step."""
    seed_everything(args.seed)
    stop = StopSignal()
    order = parse_order(args.attributes_order)
    notes = []

    # 1. model and tokenizer (the default start, out/sft, falls back to the demo base model when missing)
    start = args.model_path
    if start == DEFAULT_START and not (Path(start) / "config.json").exists():
        notes.append(
            f"{DEFAULT_START} not found (build it with `python sft.py`): training the demo base model from scratch"
        )
        start = "demo"
    model_path = resolve_model_path(start, dist.is_main, dist.barrier)
    tokenizer = load_tokenizer(model_path, chat_template=args.chat_template)
    mode = conditioning_mode(tokenizer)
    if mode == "system":
        notes.append("the chat template ignores `attributes`: they are given as a system message 'Attributes: ...'")
    model = load_causal_lm(model_path, dist.device, attn_implementation=args.attn_implementation,
                           vocab_size=len(tokenizer))  # fmt: skip
    model = lora.apply_lora(model, args.lora)  # --lora-r > 0: only adapters are trained
    model = wrap_model(model, dist, activation_checkpointing=args.activation_checkpointing)

    # 2. data: parse every row (errors name file, row and field), write the attributes into the header, tokenize
    data_path = data.resolve_data_path(args.data, "attributes", dist)
    if args.data == DEFAULT_LABELLED and not Path(data_path).exists():
        raise FileNotFoundError(f"{data_path}: no labelled data; run `python steerlm.py label` first, or pass --data")
    parsed, eval_parsed, eval_source = data.load_train_eval(
        data_path,
        args.eval_data,
        args.eval_size,
        data.parse_attributes,
        args.skip_bad_rows,
        args.split,
        args.eval_split,
    )

    def tok(record, context):
        return tokenize_example(tokenizer, record, order, mode, args.max_seq_len, context)

    train, evals = data.tokenize_train_eval(parsed, eval_parsed, eval_source, tok, args)
    skipped = parsed.skipped + train.skipped
    demo_eval_on = (args.demo_eval_prompts > 0 or args.steer_prompts > 0) and is_demo_data(parsed.records)
    if demo_eval_on:
        check_demo_requests(args, order)

    # 3. batch sizes, optimiser, schedule
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
    for note in notes:
        tracker.print(note)
    tracker.print(
        f"world_size={dist.world_size} global_batch_size={global_batch_size} total_steps={total_steps} "
        f"train={len(train.records)} ({sum(e['truncated'] for e in train.records)} truncated, {skipped} bad rows "
        f"skipped) eval={len(evals.records)} start={model_path} conditioning={mode} start_step={start_step}"
    )
    tracker.print(f"example: {tokenizer.decode(train.records[0]['input_ids'])!r}")
    for line in data.skip_report(parsed, train, eval_parsed, evals):
        tracker.print(line)

    def save(step: int) -> None:
        extra = {"step": step, "skipped_steps": skipped_steps, "initial": initial}
        config = {"steerlm_attributes": order, "steerlm_conditioning": mode}  # read back by `generate`
        checkpoint.save_run(args.output_dir, dist, model, optimizer, scheduler, tokenizer, extra, config)

    if demo_eval_on and args.demo_eval_prompts > 0 and not args.resume:
        initial = demo_eval(model, tokenizer, dist, args.demo_eval_prompts, args.max_new_tokens)  # no attributes
        initial.pop("samples")
        tracker.print(f"start: eval/score={initial['eval/score']:.3f} eval/accuracy={initial['eval/accuracy']:.3f}")

    # 4. training loop: each step takes the global batch `data.step_indices(step)`; this rank its slice
    model.train()
    bar = tracker.progress(total_steps, start_step, "steerlm")
    tokens_seen, t0, step = 0, time.time(), start_step
    for step in range(start_step, total_steps):
        idx = dist.shard(data.step_indices(len(train.records), global_batch_size, step, args.seed))
        local = [train.records[i] for i in idx]
        # average over the global batch's response tokens: FSDP averages gradients over ranks, hence x world_size
        n_tokens = dist.sum(sum(count_label_tokens(e) for e in local))
        loss_sum = torch.zeros((), device=dist.device)
        micro = data.micro_batches(local, args.local_micro_batch_size)
        for k, mb in enumerate(micro):
            if dist.enabled:
                model.set_requires_gradient_sync(k == len(micro) - 1)  # reduce-scatter once per step
            with autocast(dist):
                mb_loss = sft_loss_sum(model, data.collate(mb, tokenizer.pad_token_id), dist.device)
            (mb_loss * dist.world_size / n_tokens).backward()
            loss_sum += mb_loss.detach().float()
        if nonfinite_step(loss_sum, step, dist, args.skip_nonfinite):
            optimizer.zero_grad(set_to_none=True)
            skipped_steps += 1
            continue
        grad_norm = optimizer_step(model, optimizer, scheduler, args.max_grad_norm)
        tokens_seen += dist.sum(sum(len(e["input_ids"]) for e in local))
        bar.update(1)

        # 5. log, evaluate, checkpoint
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            loss = dist.sum(loss_sum.item()) / n_tokens
            elapsed = time.time() - t0
            metrics = {
                "train/loss": loss,
                "train/grad_norm": grad_norm,
                "train/lr": scheduler.get_last_lr()[0],
                "train/skipped_steps": skipped_steps,
                "perf/tokens_per_sec": tokens_seen / max(elapsed, 1e-9),
            }
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
                metrics["eval/loss"] = evaluate_loss(model, evals.records, args, dist, tokenizer.pad_token_id)
            tracker.log(metrics, step + 1, echo=False)
            bar.set_postfix(loss=f"{loss:.3f}")
            tokens_seen, t0 = 0, time.time()
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save(step + 1)
        stop.exit_if_requested(dist, lambda: save(step + 1), f"at step {step + 1}", args.output_dir, tracker)
    tracker.close_progress()

    # 6. final evaluation (steerability, ground truth) and export
    save(total_steps)
    final = {
        "eval/loss": evaluate_loss(model, evals.records, args, dist, tokenizer.pad_token_id),
        "train/skipped_steps": skipped_steps,
    }
    if demo_eval_on:
        result, samples = evaluate(model, tokenizer, dist, args, order, mode)
        tracker.table("samples", ["prompt", "attributes", "response"], samples, total_steps)
        final |= result | {f"initial/{k}": v for k, v in initial.items()}
        for line in steer_lines(final, parse_order(args.steer_attributes) if args.steer_prompts else []):
            tracker.print(line)
        if initial and "eval/accuracy" in result:
            tracker.print(
                f"ground truth ({args.demo_eval_prompts} held-out demo prompts), start model without attributes -> "
                f"{args.eval_attributes}: accuracy {initial['eval/accuracy']:.3f} -> {final['eval/accuracy']:.3f}, "
                f"score {initial['eval/score']:.3f} -> {final['eval/score']:.3f}"
                + (
                    f" (correctness:0 requested instead: accuracy {final['contrast/eval/accuracy']:.3f})"
                    if "contrast/eval/accuracy" in final
                    else ""
                )
            )
    elif args.demo_eval_prompts or args.steer_prompts:
        tracker.print("demo-task evaluations skipped: the data's prompts are not demo-task prompts")
    tracker.log(final, total_steps, echo=False)
    tracker.write_eval(final)
    tracker.print(f"saved {args.output_dir} (final metrics in eval.json)")
    tracker.finish()
    return final


def generate_stage(args: GenerateArgs, dist) -> list[dict]:
    """Responses to --prompt or --prompts-file, each requesting its attribute values."""
    from transformers import AutoConfig

    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("generate: pass exactly one of --prompt and --prompts-file")

    # 1. model, tokenizer, and the attribute order the model was trained with
    tokenizer = load_tokenizer(args.model_path, chat_template=args.chat_template)
    trained_order = getattr(AutoConfig.from_pretrained(args.model_path), "steerlm_attributes", None)
    order = parse_order(args.attributes_order) if args.attributes_order else trained_order or list(demo_task.ATTRIBUTES)
    mode = conditioning_mode(tokenizer)
    model = wrap_model(load_causal_lm(args.model_path, dist.device, vocab_size=len(tokenizer)), dist, trainable=False)

    # 2. requests: (prompt as given, messages, attribute string); unknown attributes are errors
    default = parse_attributes_string(args.attributes) if args.attributes.strip() else {}
    if args.prompt is not None:
        try:
            requests = [(args.prompt, [{"role": "user", "content": args.prompt}], format_attributes(default, order))]
        except KeyError as e:
            raise ValueError(f"--attributes {args.attributes!r}: {e.args[0]}") from None
    else:
        prompt_rows = data.load_rows(args.prompts_file)
        # i: the file's line (blank lines are not rows)
        requests = [parse_request_row(row, args.prompts_file, i, default, order)
                    for i, row in zip(prompt_rows.line_numbers, prompt_rows)]  # fmt: skip

    # 3. generate on every rank (contiguous shards, gathered back in order)
    n = len(requests)
    local = dist.shard(pad_to_multiple(requests, dist.world_size))
    generator = sampling_generator(args.seed, dist) if args.temperature > 0 else None
    texts, _ = respond(model, tokenizer, dist, [r[1] for r in local], [r[2] for r in local], mode, args.max_new_tokens,
                       args.temperature, args.top_p, generator, args.batch_size,
                       eos_ids=end_of_turn_ids(tokenizer, args.model_path))  # fmt: skip
    rows = [{"prompt": r[0], "attributes": r[2], "response": t} for r, t in zip(local, texts)]
    rows = [x for part in dist.all_gather_object(rows) for x in part][:n]

    # 4. output
    if dist.is_main:
        if args.prompt is not None:
            print(rows[0]["response"])
        elif args.output_file:
            demo_task.write_jsonl(rows, args.output_file)
            print(f"wrote {len(rows)} responses to {args.output_file}", file=sys.stderr)
        else:
            for row in rows:
                print(json.dumps(row))
    return rows


def steer2_request(
    tokenizer, record: dict, order: list[str], mode: str, max_prompt_len: int, truncation: str, context: str
) -> dict:
    """A SteerLM 2.0 request from an attribute row: the prompt (the turns before the last assistant turn) asking
    for the row's own attribute values. `ids` request them, `plain_ids` are the same prompt without a request (what
    the SFT reference of the weights reads); both at most `max_prompt_len` tokens. A prompt over the limit is a
    DataError naming 'messages' unless `truncation` is "left": then whole leading turns are dropped (the same turns
    from both) and, when the last turn alone is too long, tokens from the left (the assistant header stays).
    """
    try:
        request = format_attributes(record["attributes"], order)
    except KeyError as e:
        name = next(n for n in record["attributes"] if n not in order)
        raise data.DataError(f"{context}, field 'attributes.{name}': {e.args[0]}; pass --attributes-order") from None
    messages = with_attributes(record["messages"], "", mode)
    prompt = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant")]
    ids = request_ids(tokenizer, prompt, request, mode)
    if len(ids) > max_prompt_len and truncation != "left":
        raise data.DataError(
            f"{context}, field 'messages': prompt is {len(ids)} tokens, {data.TOO_LONG} {max_prompt_len} "
            "(pass --prompt-truncation left to keep its last turns, or skip to drop such rows; or raise the limit)"
        )
    for shorter in data.shorter_prompts(prompt) if len(ids) > max_prompt_len else ():  # left: the last turns
        prompt, ids = shorter, request_ids(tokenizer, shorter, request, mode)
        if len(ids) <= max_prompt_len:
            break
    plain_ids = data.render(tokenizer, prompt, add_generation_prompt=True)
    values = [record["attributes"].get(name) for name in order]
    for name, v in zip(order, values):
        if v is not None and not MIN_VALUE <= round(v) <= MAX_VALUE:
            raise data.DataError(f"{context}, field 'attributes.{name}': {v} is outside {MIN_VALUE}..{MAX_VALUE}")
    return {
        "prompt": prompt,
        "text": split_turn(messages)[0],
        "request": request,
        "ids": ids[-max_prompt_len:],  # left: then cut from the left, the assistant header stays
        "plain_ids": plain_ids[-max_prompt_len:],
        "row": record["row"],
        "values": [float("nan") if v is None else float(round(v)) for v in values],
    }


def steer2_stage(args: Steer2Args, dist) -> dict:
    """SteerLM 2.0: --iterations rounds of sampling from the current model Q', weighting, and weighted-NLL training."""
    from transformers import AutoConfig

    seed_everything(args.seed)
    stop = StopSignal()
    n = args.num_samples
    if n < 2:
        raise ValueError("--num-samples must be at least 2: the weights are normalised over a prompt's samples")
    if args.attribute_sigma <= 0:
        raise ValueError(f"--attribute-sigma must be > 0, got {args.attribute_sigma}")
    # batch sizes, in groups (one (prompt, request) and its n samples); a group never straddles micro-batches
    local_groups = exact_div(args.prompts_per_iteration, dist.world_size, "--prompts-per-iteration / ranks")
    local_mini = exact_div(local_groups, args.num_minibatches, "groups per rank / --num-minibatches")
    local_micro = exact_div(local_mini, args.gradient_accumulation_steps, "minibatch / --gradient-accumulation-steps")
    mini_groups = local_mini * dist.world_size  # groups per optimizer step, over all ranks
    steps_per_iteration = args.epochs_per_iteration * args.num_minibatches

    # 1. models: Q_theta (trained; starts as Q'), P(y|x) (frozen), the attribute model (frozen) or rules
    tokenizer = load_tokenizer(args.model_path, chat_template=args.chat_template)
    pad_id, eos_ids = tokenizer.pad_token_id, end_of_turn_ids(tokenizer, args.model_path)
    trained_order = getattr(AutoConfig.from_pretrained(args.model_path), "steerlm_attributes", None)
    order = parse_order(args.attributes_order) if args.attributes_order else trained_order or list(demo_task.ATTRIBUTES)
    mode = conditioning_mode(tokenizer)
    policy = wrap_model(
        load_causal_lm(
            args.model_path, dist.device, attn_implementation=args.attn_implementation, vocab_size=len(tokenizer)
        ),
        dist,
        activation_checkpointing=args.activation_checkpointing,
    )
    if load_tokenizer(args.sft_model_path, chat_template=args.chat_template).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"--sft-model-path {args.sft_model_path}: its tokenizer is not --model-path's; P(y|x) must "
            "score the same tokens"
        )
    sft = wrap_model(
        load_causal_lm(
            args.sft_model_path, dist.device, attn_implementation=args.attn_implementation, vocab_size=len(tokenizer)
        ),
        dist,
        trainable=False,
    )
    if args.label_model:
        names = getattr(AutoConfig.from_pretrained(args.label_model), "attribute_names", None)
        if not names:
            raise ValueError(
                f"--label-model {args.label_model}: its config has no `attribute_names` "
                "(train one with `reward_model.py --objective regression`)"
            )
        if any(name not in names for name in order):
            raise ValueError(f"--label-model {args.label_model} predicts {names}, not every attribute of {order}")
        attr_tokenizer = load_tokenizer(args.label_model, chat_template=args.chat_template)
        attr_eos = end_of_turn_ids(attr_tokenizer, args.label_model)
        attr_model = wrap_model(
            load_sequence_classifier(
                args.label_model,
                dist.device,
                len(names),
                pad_token_id=attr_tokenizer.pad_token_id,
                vocab_size=len(attr_tokenizer),
            ),
            dist,
            trainable=False,
        )
    else:
        rules = load_rules(args.rules)

    def predictions(records: list[dict], completions: list[str]) -> torch.Tensor:
        """Attribute predictions (B, K) in `order` for each record's sample: the model's, or the rules' (NaN = none)."""
        if args.label_model:
            seqs = [
                rewards.conversation_reward_tokens(
                    attr_tokenizer,
                    r["prompt"] + [{"role": "assistant", "content": c}],
                    data.where(parsed.source, r["row"]),
                    attr_eos,
                )
                for r, c in zip(records, completions)
            ]
            pred = predict_attributes(attr_model, seqs, attr_tokenizer.pad_token_id, args.forward_batch_size, dist)
            return pred[:, [names.index(name) for name in order]].cpu()
        values = [
            rule_labels(
                rules, r["text"], c, f"--rules {args.rules} on a sample for {data.where(parsed.source, r['row'])}"
            )
            for r, c in zip(records, completions)
        ]
        return torch.tensor([[v.get(name, float("nan")) for name in order] for v in values], dtype=torch.float64)

    # 2. (prompt, request) pairs: each attribute row's prompt, asking for the row's own values
    data_path = data.resolve_data_path(args.data, "attributes", dist)
    if args.data == DEFAULT_LABELLED and not Path(data_path).exists():
        raise FileNotFoundError(f"{data_path}: no labelled data; run `python steerlm.py` first, or pass --data")
    rows = data.load_rows(data_path, args.split)
    parsed = data.parse_rows(rows, data.parse_attributes, rows.source, args.skip_bad_rows)

    def to_request(record: dict, context: str) -> dict:
        return steer2_request(tokenizer, record, order, mode, args.max_prompt_len, args.prompt_truncation, context)

    requests = data.tokenize_rows(
        parsed.records,
        to_request,
        parsed.source,
        args.skip_bad_rows,
        args.prompt_truncation,
        args.num_proc,
        args.data_cache_dir,
    )
    demo_eval_on = (args.demo_eval_prompts > 0 or args.steer_prompts > 0) and is_demo_data(parsed.records)
    if demo_eval_on:
        check_demo_requests(args, order)

    # 3. optimiser, schedule, resume (checkpoints hold whole iterations)
    optimizer = make_optimizer(policy, args.learning_rate, args.weight_decay)
    scheduler = make_scheduler(optimizer, args.lr_schedule, args.warmup_steps, args.iterations * steps_per_iteration)
    state = checkpoint.resume_run(args.output_dir, dist, policy, optimizer, scheduler) if args.resume else {}
    start, skipped_steps, initial = state.get("step", 0), state.get("skipped_steps", 0), state.get("initial", {})
    tracker = make_tracker(
        dist, args.output_dir, args, args.track, args.wandb_project, start * steps_per_iteration if args.resume else -1
    )
    tracker.print(f"resolved args: {args}")
    tracker.print(
        f"world_size={dist.world_size} iterations={args.iterations} x {args.prompts_per_iteration} (prompt, request) "
        f"x {n} samples, {steps_per_iteration} steps of {mini_groups} groups each; requests={len(requests.records)} "
        f"({parsed.skipped + requests.skipped} bad rows skipped) Q'={args.model_path} P(y|x)={args.sft_model_path} "
        f"P(a|x,y)={args.label_model or 'rules ' + args.rules} (sigma {args.attribute_sigma}) conditioning={mode} "
        f"start_iteration={start}"
    )
    for line in data.skip_report(parsed, requests):
        tracker.print(line)

    def save(iteration: int) -> None:
        extra = {"step": iteration, "skipped_steps": skipped_steps, "initial": initial}
        config = {"steerlm_attributes": order, "steerlm_conditioning": mode}  # read back by `generate`
        checkpoint.save_run(args.output_dir, dist, policy, optimizer, scheduler, tokenizer, extra, config)

    if demo_eval_on and not args.resume:  # Q' itself: steerability and the ideal request's ground truth
        initial, _ = evaluate(policy, tokenizer, dist, args, order, mode)
        for line in steer_lines(initial, parse_order(args.steer_attributes) if args.steer_prompts else []):
            tracker.print(f"start: {line}")

    bar = tracker.progress(args.iterations, start, "steerlm2")
    for iteration in range(start, args.iterations):
        # 1. sample n responses per (prompt, request) from the current model, this iteration's Q'. Each rank takes
        # its share of every minibatch (minibatch m = positions m * mini_groups ... of the iteration's prompts), and
        # randomness is keyed by (seed, iteration, position, sample): the same steps on any number of ranks
        t_sample = clock(dist)
        chosen = data.step_indices(len(requests.records), args.prompts_per_iteration, iteration, args.seed)
        positions = [m * mini_groups + dist.rank * local_mini + k
                     for m in range(args.num_minibatches) for k in range(local_mini)]  # fmt: skip
        samples = [requests.records[chosen[p]] for p in positions for _ in range(n)]  # a group: n consecutive rows
        keys = [sample_key(args.seed, iteration, p, j) for p in positions for j in range(n)]
        response_list = generate(
            policy,
            [r["ids"] for r in samples],
            pad_id=pad_id,
            eos_id=eos_ids,
            max_new_tokens=args.max_new_tokens,
            dist=dist,
            temperature=args.temperature,
            sample_keys=keys,
        )
        queries = data.pad([r["ids"] for r in samples], pad_id, side="left").to(dist.device)  # (B, P)
        plain = data.pad([r["plain_ids"] for r in samples], pad_id, side="left").to(dist.device)  # (B, P')
        responses = data.pad(response_list, pad_id, side="right").to(dist.device)  # (B, T)
        responses, mask = truncate_after_eos(responses, eos_ids, pad_id)
        mask = mask.float()
        completions = tokenizer.batch_decode(response_list, skip_special_tokens=True)
        t_sample = clock(dist) - t_sample

        # 2. importance weights w' (G, n): log Q' at the sampling temperature (the proposal), log P(y|x) of the
        # unconditioned prompt, log P(a|x,y) from the attribute predictions under the noise model
        t_score = clock(dist)
        fb = args.forward_batch_size
        log_q_prime = sequence_logprobs(policy, queries, responses, mask, pad_id, args.temperature, fb, dist)
        log_p = sequence_logprobs(sft, plain, responses, mask, pad_id, 1.0, fb, dist)
        pred = predictions(samples, completions)  # (B, K)
        requested = torch.tensor([r["values"] for r in samples], dtype=torch.float64)  # (B, K), NaN = not asked
        unknown = (torch.isnan(pred) & ~torch.isnan(requested)).any(0)
        if unknown.any():
            raise ValueError(f"--rules {args.rules} gives no value for the requested attribute "
                             f"{order[unknown.nonzero()[0].item()]!r}")  # fmt: skip
        log_attr = attribute_logprob(pred, requested, args.attribute_sigma).to(dist.device)
        w = importance_weights(log_attr.view(-1, n), log_p.view(-1, n), log_q_prime.view(-1, n))  # (G, n)
        lengths = mask.sum(-1)
        norm = lengths.view(-1, n).mean(-1, keepdim=True).clamp(min=1).expand(-1, n)  # (G, n)
        asked = ~torch.isnan(requested)
        met = ((pred.round() == requested) | ~asked).all(-1).double().to(dist.device)  # (B,) every request met
        stats = torch.stack([met.sum(), (w.view(-1) * met).sum() * n, log_attr.sum(), (1 / (w**2).sum(-1)).sum(),
                            lengths.sum(), log_p.sum(), log_q_prime.sum()]).double()  # fmt: skip
        stats = dist.all_reduce(stats) / (args.prompts_per_iteration * n)
        stat_names = "request_met request_met_weighted log_p_attributes ess response_length log_p_sft log_q_prime"
        sample_metrics = {f"steer2/{k}": v.item() for k, v in zip(stat_names.split(), stats)}
        t_score = clock(dist) - t_score

        # 3. train: epochs over minibatches of whole groups. b' needs log Q_theta of each sample at the current
        # parameters with no gradient: the training forward's own log-probs, detached (the parameters do not change
        # between a step's micro-batches, so a separate forward-only pass would give the same numbers)
        t_train = clock(dist)
        for epoch in range(args.epochs_per_iteration):
            # the minibatches in an order drawn per epoch (the same on every rank); local groups of minibatch mb
            # are mb * local_mini ... (mb + 1) * local_mini - 1
            generator = torch.Generator().manual_seed(sample_key(args.seed, iteration, epoch))
            for m, mb in enumerate(torch.randperm(args.num_minibatches, generator=generator).tolist()):
                step = iteration * steps_per_iteration + epoch * args.num_minibatches + m
                micro = data.micro_batches(list(range(mb * local_mini, (mb + 1) * local_mini)), local_micro)
                sums = torch.zeros(2, dtype=torch.float64, device=dist.device)  # loss, KL(w' || b') summed over groups
                for k, groups in enumerate(micro):
                    if dist.enabled:
                        policy.set_requires_gradient_sync(k == len(micro) - 1)  # reduce-scatter once per step
                    rows = torch.tensor([g * n + j for g in groups for j in range(n)], device=dist.device)
                    with autocast(dist):
                        logprobs = response_logprobs(policy, queries[rows], responses[rows], pad_id, 1.0).float()
                    log_q = (logprobs.detach() * mask[rows]).sum(-1).view(-1, n)  # (g, n)
                    b = baseline_weights(log_q, log_q_prime[rows].view(-1, n))
                    coef = (w[groups] - b).view(-1)
                    # the mean over the step's groups of all ranks; FSDP averages gradients over ranks, hence x world
                    loss = steer2_loss(logprobs, mask[rows], coef, norm[groups].reshape(-1)) / mini_groups
                    (loss * dist.world_size).backward()
                    sums += torch.stack([loss.detach().double(), weights_kl(w[groups], b).sum()])
                dist.all_reduce(sums)
                if nonfinite_step(sums[:1], step, dist, args.skip_nonfinite):
                    optimizer.zero_grad(set_to_none=True)
                    skipped_steps += 1
                    continue
                grad_norm = optimizer_step(policy, optimizer, scheduler, args.max_grad_norm)
                metrics = {
                    "steer2/loss": sums[0].item(),
                    "steer2/kl": sums[1].item() / mini_groups,
                    "steer2/grad_norm": grad_norm,
                    "steer2/lr": scheduler.get_last_lr()[0],
                    "steer2/skipped_steps": skipped_steps,
                    "iteration": iteration + 1,
                }
                if epoch == 0 and m == 0:  # the iteration's samples, logged once
                    metrics |= sample_metrics | {"perf/time_sample": t_sample, "perf/time_score": t_score}
                tracker.log(metrics, step + 1, echo=False)
                bar.set_postfix(kl=f"{metrics['steer2/kl']:.3f}")
        t_train = clock(dist) - t_train
        tracker.log({"perf/time_train": t_train}, (iteration + 1) * steps_per_iteration, echo=False)
        bar.update(1)

        # 4. checkpoint (whole iterations: a stop request is honoured when the running iteration ends)
        if args.save_every and (iteration + 1) % args.save_every == 0 and iteration + 1 < args.iterations:
            save(iteration + 1)
        stop.exit_if_requested(
            dist, lambda: save(iteration + 1), f"after iteration {iteration + 1}", args.output_dir, tracker
        )
    tracker.close_progress()

    # 5. final evaluation (steerability, the ideal request's ground truth) beside Q''s, and export
    save(args.iterations)
    final = {"steer2/skipped_steps": skipped_steps}
    if demo_eval_on:
        result, samples = evaluate(policy, tokenizer, dist, args, order, mode)
        tracker.table("samples", ["prompt", "attributes", "response"], samples, args.iterations * steps_per_iteration)
        final |= result | {f"initial/{k}": v for k, v in initial.items()}
        for name in parse_order(args.steer_attributes) if args.steer_prompts else []:
            tracker.print(
                f"steer {name}: spearman {initial.get(f'steer/{name}/spearman', float('nan')):.3f} -> "
                f"{final[f'steer/{name}/spearman']:.3f}, exact match "
                f"{initial.get(f'steer/{name}/exact_match', float('nan')):.3f} -> {final[f'steer/{name}/exact_match']:.3f}"
            )
        if "eval/score" in result:
            tracker.print(
                f"ground truth ({args.demo_eval_prompts} held-out demo prompts, {args.eval_attributes} requested), "
                f"Q' -> SteerLM 2.0: score {initial.get('eval/score', float('nan')):.3f} -> {final['eval/score']:.3f}, "
                f"accuracy {initial.get('eval/accuracy', float('nan')):.3f} -> {final['eval/accuracy']:.3f}"
            )
    elif args.demo_eval_prompts or args.steer_prompts:
        tracker.print("demo-task evaluations skipped: the data's prompts are not demo-task prompts")
    tracker.log(final, args.iterations * steps_per_iteration, echo=False)
    tracker.write_eval(final)
    tracker.print(f"saved {args.output_dir} (final metrics in eval.json)")
    tracker.finish()
    return final


if __name__ == "__main__":
    args = tyro.cli(Command, default=AllArgs(), description=__doc__.split("\n\n")[0])
    data.exit_on_data_error()  # a bad row, field or split: one line naming it, no traceback
    dist = init_distributed(getattr(args, "mixed_precision", "auto"))  # label and generate: auto
    if isinstance(args, LabelArgs):
        label_stage(args, dist, args.output_file)
    elif isinstance(args, GenerateArgs):
        generate_stage(args, dist)
    elif isinstance(args, Steer2Args):
        steer2_stage(args, dist)
    else:
        if isinstance(args, AllArgs):  # label into the output directory, then train on that file
            labelled = str(Path(args.output_dir) / "labelled.jsonl")
            if not (args.resume and Path(labelled).exists()):
                label_stage(args, dist, labelled)
            elif dist.is_main:
                print(f"--resume: keeping the labels in {labelled}")
            args = dataclasses.replace(args, data=labelled, split="train")  # --split was the SFT data's
        train_stage(args, dist)
    cleanup(dist)
