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


def ensure_demo_student(num_layers: int, base: str | Path = DEMO_BASE_DIR) -> Path:
    """Build (once) the demo base cut to its first `num_layers` decoder layers, beside it as `base_<L>l`.

    A smaller demo Llama for distillation (`--model-path demo:2`): the same tokenizer, width and embeddings as
    the demo base, half the depth; no random numbers are drawn, so it is the same model on every machine.
    """
    base = ensure_demo_base(base)
    path = base.with_name(f"{base.name}_{num_layers}l")
    if (path / "config.json").exists():
        return path
    model = AutoModelForCausalLM.from_pretrained(base)
    total = model.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"demo:{num_layers}: the demo base has {total} layers; keep 1 to {total}")
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model_path(path: str, is_main: bool = True, barrier=None) -> str:
    """`demo` -> the built-in base model directory (built by the main process); `demo:L` -> the demo base cut to
    its first L layers (`ensure_demo_student`, a distillation student); anything else unchanged."""
    if path != DEMO and not re.fullmatch(rf"{DEMO}:\d+", path):
        return path
    layers = int(path.split(":")[1]) if ":" in path else None
    if is_main:
        ensure_demo_base() if layers is None else ensure_demo_student(layers)
    if barrier is not None:
        barrier()
    return str(DEMO_BASE_DIR if layers is None else DEMO_BASE_DIR.with_name(f"{DEMO_BASE_DIR.name}_{layers}l"))


# Chat templates for models that ship none (base models) or whose own one is to be replaced: `--chat-template`.
# Each is prefix-stable (rendering a conversation up to a turn is a prefix of rendering it with the turn, which
# `common.data` needs to find assistant tokens) under the pre-tokenizers of Qwen2 and Llama-3, which keep a run of
# newlines together, and ends every assistant turn with a token generation stops at (`end_of_turn_ids`).
CHAT_TEMPLATES = {
    # Qwen's ChatML, without the default system message: <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Meta's Llama-3 Instruct format, without the date/tools system preamble
    "llama3": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # "User: ...\n\nAssistant: ...<EOS>": no new tokens, for any base model. The separator opens a turn rather
    # than closing one, and the generation prompt ends at "Assistant:" (the reply brings its own leading space),
    # so no whitespace at the end of a rendering can merge differently with what follows it.
    "plain": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% for message in messages %}"
        "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] }}"
        "{% else %}{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' if messages else 'Assistant:' }}{% endif %}"
    ),
}
# The special tokens a built-in template writes; those missing from the vocabulary are added (TRL's
# `setup_chat_format` does the same for ChatML), else a ChatML reply would end in text pieces no stop test sees.
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "plain": (),
}
CHAT_TEMPLATE_CHOICES = "--chat-template chatml|llama3|plain|FILE"
# Tokens that end an assistant turn in the ChatML and Llama-3 formats (ours and the models' own templates)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>")
PAD_TOKEN = "<|pad|>"  # added when the vocabulary has no free special token to pad with
# Multimodal placeholders (Qwen's <|vision_pad|>, <|image_pad|>, <|video_pad|>): inputs of the VL siblings of a
# tokenizer, not free tokens
_MODALITY = re.compile(r"vision|image|video|audio", re.IGNORECASE)


def _note(message: str) -> None:
    """One line on rank 0 (RANK is set by torchrun); used before any tracker exists."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def _token_id(tokenizer, token: str) -> int | None:
    """The id of `token` when the vocabulary has it as one token, else None (not the unknown token's id)."""
    i = tokenizer.convert_tokens_to_ids(token)
    return i if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == token else None


def resolve_chat_template(spec: str) -> str:
    """`--chat-template`: a built-in name (CHAT_TEMPLATES) or the path of a Jinja file -> the template text."""
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    if Path(spec).is_file():
        return Path(spec).read_text()
    raise ValueError(f"--chat-template {spec!r}: not a built-in template nor a file; use {CHAT_TEMPLATE_CHOICES}")


def _generation_eos_ids(model_path: str) -> list[int]:
    """generation_config.json's eos_token_id (an int or a list), [] when the model has no generation config."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        return []
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def end_of_turn_ids(tokenizer, model_path: str | None = None) -> list[int]:
    """Every token id that ends a reply: generation stops at the first one, truncation cuts after it, reward
    models score through it (`common.rewards.reward_model_tokens`).

    The tokenizer's EOS; generation_config.json's eos_token_id of `model_path` (Llama-3 Instruct lists <|eot_id|>
    and <|end_of_text|>); and <|im_end|> / <|eot_id|> when the chat template writes it and the vocabulary has it
    (a Qwen base model's EOS is <|endoftext|>, but a ChatML turn ends with <|im_end|>). The pad id is left out: it
    is never sampled (`common.generation.never_sampled`). The demo tokenizer gets its one EOS.
    """
    ids = [tokenizer.eos_token_id] + (_generation_eos_ids(model_path) if model_path is not None else [])
    template = str(tokenizer.chat_template or "")
    ids += [_token_id(tokenizer, t) for t in END_OF_TURN_TOKENS if t in template]
    out: list[int] = []
    for i in ids:
        if i is not None and i != tokenizer.pad_token_id and i not in out:
            out.append(i)
    return out


def choose_pad_token(tokenizer, taken: list[int]) -> str | None:
    """A special token of the vocabulary that is free to pad with, or None.

    Free: a special added token that is not EOS, BOS, UNK or in `taken` (the end-of-turn ids), that the chat
    template does not write, and whose name says it is spare: it contains "pad" (Qwen's <|fim_pad|>, Llama-3.1's
    <|finetune_right_pad_id|>; multimodal placeholders excluded) or, second choice, "reserved"/"unused" (Llama-3's
    <|reserved_special_token_N|>). Lowest id first. Any other special token may carry meaning the model learnt
    (a document separator, a FIM marker), and padding must never look like content.
    """
    template = str(tokenizer.chat_template or "")
    excluded = set(taken) | {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    ranked = []
    for i, token in tokenizer.added_tokens_decoder.items():
        name = token.content
        if not token.special or i in excluded or name in template:
            continue
        lower = name.lower()
        if "pad" in lower and not _MODALITY.search(name):
            ranked.append((0, i, name))
        elif "reserved" in lower or "unused" in lower:
            ranked.append((1, i, name))
    return min(ranked)[2] if ranked else None


def load_tokenizer(path: str, padding_side: str = "right", chat_template: str | None = None):
    """The tokenizer of `path` with a chat template and a pad token that is not EOS.

    Template: `chat_template` (`--chat-template`, a CHAT_TEMPLATES name or a Jinja file) overrides the tokenizer's
    own; a built-in's special tokens missing from the vocabulary are added. No template at all: an error naming
    the flag. Pad: kept when set and not EOS; else `choose_pad_token`, else a new <|pad|>. A pad equal to EOS
    would make "mask the padding" also mask the real end of every answer, and generation, which never samples
    the pad, could not stop. What was chosen is printed (one line); the scripts export the tokenizer with
    `save_pretrained`, so the next stage reads the same template and pad. Added tokens make len(tokenizer) exceed
    the checkpoint's embeddings: the scripts pass `vocab_size=len(tokenizer)` to the model loaders, which grow them.
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    notes = []
    if chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(chat_template)
        missing = [t for t in TEMPLATE_TOKENS.get(chat_template, ()) if _token_id(tokenizer, t) is None]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
            notes.append(f"added {', '.join(missing)} for --chat-template {chat_template}")
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; pass {CHAT_TEMPLATE_CHOICES}")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        was = "none" if tokenizer.pad_token is None else f"EOS {tokenizer.eos_token!r}"
        pad = choose_pad_token(tokenizer, end_of_turn_ids(tokenizer, path))
        if pad is not None:
            tokenizer.pad_token = pad
            notes.append(f"pad token {pad!r} (id {tokenizer.pad_token_id}, an unused special token; was {was})")
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
            notes.append(f"pad token {PAD_TOKEN!r} added (id {tokenizer.pad_token_id}; was {was})")
    if notes:
        _note(f"tokenizer {path}: " + "; ".join(notes) + f"; {len(tokenizer)} tokens")
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


def grow_embeddings(model, vocab_size: int | None) -> None:
    """Give the embeddings (and an untied LM head) `vocab_size` rows when `load_tokenizer` added tokens.

    New rows start at the mean of the old ones: a new token's logit starts at an average value, not a random one,
    and no random numbers are drawn (the run's random stream stays what it was). Never shrinks: checkpoints often
    have more rows than the tokenizer has tokens (Qwen2.5: 151936 rows for 151665 tokens), and ids are unchanged.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size is None or vocab_size <= rows:
        return
    with torch.random.fork_rng(devices=[]):  # resize initialises the new rows randomly before we overwrite them
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None and layer.weight.shape[0] == vocab_size:
                layer.weight[rows:] = layer.weight[:rows].mean(0)


def load_causal_lm(
    path: str,
    device: torch.device,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    vocab_size: int | None = None,
):
    """An `AutoModelForCausalLM` with dropout disabled (`disable_dropout`: every script needs a deterministic
    forward in train mode), its embeddings grown to `vocab_size` (= len(tokenizer), see `grow_embeddings`)."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_dtype(device, dtype), attn_implementation=attn_implementation
    )
    disable_dropout(model)
    grow_embeddings(model, vocab_size)
    return model.to(device)


def load_sequence_classifier(
    path: str,
    device: torch.device,
    num_labels: int = 1,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    pad_token_id: int | None = None,
    init_head: bool = False,
    vocab_size: int | None = None,
):
    """An `AutoModelForSequenceClassification` (reward/value model), dropout disabled (`disable_dropout`), its
    embeddings grown to `vocab_size` (`grow_embeddings`); from a causal LM the head is new.

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
    grow_embeddings(model, vocab_size)
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
