"""Real-shape stand-ins, built locally without downloads: tokenizers that mimic Qwen2.5 and Llama-3 and
random-initialised models at their real widths and vocabularies, plus tiny datasets in the layouts
`examples/real_model.sh` reads. Used by `bash examples/real_model.sh --dry-run` and by the tests
(tests/test_real_shapes.py, tests/test_real_tokenizers.py).

    python examples/make_dry_run_inputs.py OUT [--shape qwen|llama]
        writes OUT/model (tokenizer + model), OUT/sft.jsonl, OUT/preferences.jsonl, OUT/prompts.jsonl

The tokenizers are byte-level BPEs trained on demo-task text with the real pre-tokenizer regexes, special tokens
and chat-template structure; their few hundred tokens sit below the model's real vocabulary size (as Qwen2.5's
151,665 tokens sit below its 151,936 embedding rows), so every token id fits and the LM head is full-size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import demo_task  # noqa: E402

# The pre-tokenizer regexes of Qwen2 and Llama-3 (tokenizer.json): unlike GPT-2's, a run of newlines is one piece
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Qwen2-Instruct's template: ChatML with a default system message
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Special tokens in the order the real vocabularies have them (Qwen: <|vision_pad|> before <|fim_pad|>)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<|fim_pad|>"]
QWEN_BARE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_2|>", "<|eot_id|>"]  # fmt: skip

# The real models' shapes (config.json of Qwen/Qwen2.5-0.5B and meta-llama/Llama-3.2-1B), except depth and MLP width
QWEN_SHAPE = dict(vocab_size=151_936, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                  tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6)  # fmt: skip
LLAMA_SHAPE = dict(vocab_size=128_256, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                   tie_word_embeddings=True, rope_theta=500_000.0, rms_norm_eps=1e-5)  # fmt: skip


def build_tokenizer(*, split: str, specials: list[str], eos: str, bos=None, pad=None, template=None):
    """A byte-level BPE (400 tokens) with these special tokens (ids 0.., in this order) and this chat template."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    texts = demo_task.all_texts(0, n=300) + ["You are a helpful assistant.", "system user assistant User: Assistant:"]
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    tokenizer.chat_template = template
    return tokenizer


def qwen_tokenizer():
    """Qwen2.5 base as shipped: pad == EOS (<|endoftext|>), a ChatML template with a default system prompt."""
    return build_tokenizer(split=QWEN2_SPLIT, specials=QWEN_SPECIALS, eos="<|endoftext|>", pad="<|endoftext|>",
                           template=QWEN_TEMPLATE)  # fmt: skip


def llama_tokenizer():
    """Llama-3 base as shipped: no pad, no chat template (pass --chat-template llama3)."""
    return build_tokenizer(split=LLAMA3_SPLIT, specials=LLAMA_SPECIALS, bos="<|begin_of_text|>", eos="<|end_of_text|>")


def save_model(path, tokenizer, *, architecture: str = "llama", vocab_size: int | None = None, hidden_size: int = 64,
               num_layers: int = 2, intermediate_size: int = 128, num_attention_heads: int = 4,
               num_key_value_heads: int = 4, tie_word_embeddings: bool = True, generation_eos=None,
               dtype: torch.dtype = torch.float32, seed: int = 0, **config) -> str:  # fmt: skip
    """A random-initialised Llama or Qwen2 causal LM saved with `tokenizer` (vocab_size default: len(tokenizer));
    `generation_eos` (tokens) goes to generation_config.json as a list, as Llama-3-Instruct ships it."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        architecture
    ]
    cfg = config_class(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size,
                       intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                       max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(cfg)
    if generation_eos is not None:
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in generation_eos]
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def real_shape_model(path, shape: str, num_layers: int = 1, intermediate_size: int = 64) -> str:
    """The Qwen2.5-0.5B or Llama-3.2-1B shape (real hidden size, heads, vocabulary, tied embeddings) with few
    layers and a narrow MLP, stored in bf16 as the real checkpoints are (the scripts load fp32 master weights)."""
    if shape == "qwen":
        tok, arch, dims, eos = qwen_tokenizer(), "qwen2", QWEN_SHAPE, None
    elif shape == "llama":
        tok, arch, dims, eos = llama_tokenizer(), "llama", LLAMA_SHAPE, ["<|eot_id|>", "<|end_of_text|>"]
    else:
        raise ValueError(f"--shape {shape!r}: use qwen or llama")
    return save_model(path, tok, architecture=arch, num_layers=num_layers, intermediate_size=intermediate_size,
                      generation_eos=eos, dtype=torch.bfloat16, **dims)  # fmt: skip


def write_data(root) -> dict[str, str]:
    """Tiny datasets in the layouts real_model.sh reads: SFT `messages` rows with a system turn, Anthropic-HH text
    preferences (prompt and answers in one string, split at the last shared "\\n\\nAssistant:"), prompt rows."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sft = [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": r["prompt"]},
                         {"role": "assistant", "content": r["completion"]}]} for r in demo_task.sft_rows(seed=3, n=24)]  # fmt: skip
    hh = []
    for r in demo_task.preference_rows(seed=4, n=24):
        prompt = f"\n\nHuman: {r['prompt']}\n\nAssistant:"
        hh.append({"chosen": f"{prompt} {r['chosen']}", "rejected": f"{prompt} {r['rejected']}"})
    return {
        "sft": str(demo_task.write_jsonl(sft, root / "sft.jsonl")),
        "preferences": str(demo_task.write_jsonl(hh, root / "preferences.jsonl")),
        "prompts": str(demo_task.write_jsonl(demo_task.prompt_rows(seed=5, n=16), root / "prompts.jsonl")),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory for model/ and the data files")
    parser.add_argument("--shape", default="qwen", choices=["qwen", "llama"], help="which real model's shape")
    a = parser.parse_args()
    model = real_shape_model(Path(a.out) / "model", a.shape)
    files = write_data(a.out)
    print(f"wrote {model} ({a.shape} shape), " + ", ".join(files.values()))
