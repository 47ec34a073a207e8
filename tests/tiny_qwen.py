"""A tiny random-weight model of Qwen2.5's architecture, for running the shipped real-model configs
on CPU: Qwen2 layers with q/k/v biases, an output head tied to the embedding, Qwen2.5's vocabulary
size (151,936 rows), bfloat16 weights, and a chat template. Only the width and depth are small.

The tokenizer is character-level over printable ASCII plus Qwen's special tokens (<|im_start|>,
<|im_end|>, <|endoftext|>), so any ASCII prompt encodes exactly; its ids use the first rows of the
embedding, and the rest of the vocabulary is there for the shapes (as Qwen2.5's own embedding has
rows its tokenizer never produces).

    python -m tests.tiny_qwen /tmp/tiny-qwen2.5     # writes a Hugging Face model directory
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

QWEN25_VOCAB = 151_936
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:],
                                  clean_up_tokenization_spaces=False, model_max_length=4096)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"  # loadable by transformers 4 (vLLM) and 5
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return tok


def build_tiny_qwen(out_dir: str | Path, vocab_size: int = QWEN25_VOCAB, hidden_size: int = 64,
                    layers: int = 2, dtype: str = "bfloat16", seed: int = 0) -> str:
    """Write the model directory (config.json, model.safetensors, tokenizer) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=eos, pad_token_id=pad, bos_token_id=None, dtype=dtype)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    config_path = out / "config.json"  # the names transformers 4 (vLLM) reads, as debug_model does
    written = json.loads(config_path.read_text())
    written.setdefault("torch_dtype", written.get("dtype", dtype))
    written.setdefault("rope_theta", written.get("rope_parameters", {}).get("rope_theta", 10000.0))
    config_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    return str(out)


if __name__ == "__main__":
    print(build_tiny_qwen(sys.argv[1]))
