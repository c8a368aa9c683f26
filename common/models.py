"""Model and tokenizer loading, and the demo task's locally built tokenizer and tiny Llama.

Everything here produces or reads ordinary Hugging Face directories, so a model trained by PlainAlign loads
with `transformers.AutoModel*.from_pretrained` and nothing else.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

DEMO = "demo"  # the value of --model-path that means "the built-in tiny model"
DEMO_BASE_DIR = Path("out/demo/base")

# Role tokens are special tokens so that rendering a conversation never merges text across a turn boundary;
# that is what lets `common.data` find assistant tokens by rendering prefixes. The optional `attributes` of
# an assistant message (SteerLM) sit in the turn's header, before the newline, so loss masking can exclude them.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>"
    "{% if message['role'] == 'assistant' and message.get('attributes') %}[{{ message['attributes'] }}]{% endif %}"
    "{{ '\\n' + message['content'] + '<|end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if attributes %}[{{ attributes }}]{% endif %}{{ '\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_demo_tokenizer(texts: list[str], vocab_size: int = 640) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the demo task's text; digits are split one per token (exact arithmetic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",  # never EOS: padding must not be confused with "the answer ended here"
        bos_token="<|bos|>",
        eos_token="<|end|>",  # end of an assistant turn = end of generation
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        padding_side="right",
    )
    hf.chat_template = DEMO_CHAT_TEMPLATE
    return hf


def build_demo_model(tokenizer, seed: int = 0, hidden_size: int = 128, num_layers: int = 4) -> LlamaForCausalLM:
    """A ~0.9M-parameter Llama (tied embeddings), the size that trains ~10 steps/s at batch 32 on 2 CPU cores."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def ensure_demo_base(path: str | Path = DEMO_BASE_DIR, seed: int = 0) -> Path:
    """Build (once) the demo tokenizer and randomly initialised tiny model as an HF directory."""
    from common import demo_task

    path = Path(path)
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_demo_tokenizer(demo_task.all_texts(seed))
    model = build_demo_model(tokenizer, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(path)  # atomic: a concurrent builder either wins or finds the finished directory
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model_path(path: str, is_main: bool = True, barrier=None) -> str:
    """`demo` -> the built-in base model directory (built by the main process); anything else unchanged."""
    if path != DEMO:
        return path
    if is_main:
        ensure_demo_base()
    if barrier is not None:
        barrier()
    return str(DEMO_BASE_DIR)


def load_tokenizer(path: str, padding_side: str = "right"):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A pad token equal to EOS makes "mask the padding" also mask the real end of every answer.
        raise ValueError(
            f"{path}: the tokenizer's pad token is missing or equal to EOS ({tokenizer.eos_token!r}); "
            "add a dedicated pad token (tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the "
            "embeddings) before training"
        )
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; PlainAlign renders every example with it")
    tokenizer.padding_side = padding_side
    return tokenizer


def _dtype(device: torch.device, dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32  # master weights in fp32; bf16 compute comes from FSDP's mixed precision / autocast
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# Float attributes that HF modules read as a probability in train mode instead of going through an nn.Dropout:
# `attention_dropout` (Llama/Qwen/Mistral attention: passed to sdpa as dropout_p), `dropout` and
# `activation_dropout` (OPT: F.dropout), `layerdrop` (OPT: skips whole layers at random), `attn_pdrop`, ...
# Every name containing "drop" whose value is a number (bools such as ESM's `token_dropout` are flags, left alone).
_DROP_ATTRIBUTE = re.compile(r"drop")


def disable_dropout(model: torch.nn.Module) -> int:
    """Make the forward deterministic in train mode; returns how many dropout settings were non-zero.

    The RL ratio pi/pi_old (PPO), the DPO/KTO margin and SPIN's log-ratios compare forwards of the same weights,
    one of them in train mode: with dropout on, the PPO ratio is not 1 on the first minibatch and the DPO margin
    is not 0 at step 0, so the losses start from noise. TRL (`disable_dropout_in_model`) and OpenRLHF do the
    same. Llama/Qwen have dropout 0; GPT-2, OPT and others do not.

    Sets `p = 0` on every `nn.Dropout`-family module (GPT-2's sdpa path also reads `attn_dropout.p` as its
    attention dropout) and 0 on every numeric module attribute named like a dropout probability (see
    `_DROP_ATTRIBUTE`). The config is left alone, so an exported model keeps its dropout settings; a model
    that reads `self.config.<x>_dropout` at forward time (some speech and seq2seq models) is not covered.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p != 0
            module.p = 0.0
        for name, value in vars(module).items():
            if _DROP_ATTRIBUTE.search(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
                changed += value != 0
                setattr(module, name, 0.0)
    return int(changed)


def load_causal_lm(path: str, device: torch.device, dtype: str = "auto", attn_implementation: str = "sdpa"):
    """An `AutoModelForCausalLM` with dropout disabled (`disable_dropout`: every script needs a deterministic
    forward in train mode)."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_dtype(device, dtype), attn_implementation=attn_implementation
    )
    disable_dropout(model)
    return model.to(device)


def load_sequence_classifier(
    path: str,
    device: torch.device,
    num_labels: int = 1,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    pad_token_id: int | None = None,
    init_head: bool = False,
):
    """An `AutoModelForSequenceClassification` (reward/value model), dropout disabled (`disable_dropout`); from a
    causal LM the head is new.

    `init_head` re-initialises the score head as N(0, 1/sqrt(H+1)) (the lm-human-preferences choice: the
    initial rewards have unit-ish variance whatever H is).
    """
    config = AutoConfig.from_pretrained(path)
    kwargs = {}
    if getattr(config, "num_labels", None) != num_labels:
        kwargs["num_labels"] = num_labels
    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=_dtype(device, dtype), attn_implementation=attn_implementation, **kwargs
    )
    disable_dropout(model)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if init_head:
        head = model.score
        torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(model.config.hidden_size + 1))
        if getattr(head, "bias", None) is not None:
            torch.nn.init.zeros_(head.bias)
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


WEIGHT_FILES = ("*.safetensors", "*.bin")  # what from_pretrained loads weights from


def weights_fingerprint(path: str | Path) -> str:
    """sha256 over a model directory's config.json and weight files (name, size and full content of each).

    For caches of a model's outputs (DPO's precomputed reference log-probs, distillation's teacher log-probs):
    the key must change when the weights do. A path string, or file sizes and mtimes, do not: a retrain into
    the same directory keeps the path and the sizes, and copies keep or lose mtimes arbitrarily. Only the top
    level of the directory is read (not `trainer_state/`). A hub id is looked up in the local HF cache.

    Cost: every byte is read once. Measured on the 2-core development machine (CPU with SHA extensions), a
    500 MB weight file takes 0.32 s from the page cache (~1.5 GB/s) and 0.91 s after dropping the cache (the
    disk read), so a 16 GB (8B-parameter, bf16) model costs ~11-30 s: small next to computing its log-probs
    over a data set, and paid only by the runs that use such a cache.
    """
    root = Path(path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(str(path), local_files_only=True))
    files = sorted({f for pattern in WEIGHT_FILES for f in root.glob(pattern)} | set(root.glob("config.json")))
    if not any(f.name != "config.json" for f in files):
        raise FileNotFoundError(f"{path}: no weight files ({', '.join(WEIGHT_FILES)}) to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()
