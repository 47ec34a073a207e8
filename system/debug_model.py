"""The local debug mode's tiny model: built, warm-started and cached by the project itself.

No model hub is needed. `ensure_debug_model(cache_root, settings, task)` returns a real Hugging
Face model directory (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json) holding a starting policy for the synthetic arithmetic task
(system/data/synthetic.py; `task` is its make_task arguments, the config's data.synthetic, so that
the warm start and the RL run share their train/held-out split). Its steps:

1. build_tokenizer: a character-level tokenizer over the task's characters, with "<pad>" and
   "<|endoftext|>" (EOS) tokens, saved as a fast tokenizer that AutoTokenizer loads.
2. build_model: a tiny Qwen2ForCausalLM with random weights (head_dim 64, untied output head,
   float32), shaped so that vLLM can load it on a GPU too.
3. warm_start: a short supervised run on the task's train split (loss on solution + EOS tokens),
   stopped early on purpose so the policy is only partly right and GRPO has room to improve it.
4. The finished directory is cached under cache_root/<hash of settings, task and this code>; a second call
   with the same settings returns it at once. Builds go to a temporary directory that is renamed
   into place, so an interrupted build is never reused.

Run it by hand:  python -m system.debug_model /tmp/debug_models
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

from system.data import synthetic

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
# Token ids: specials first, then one id per task character. Fixed, so the model needs no tokenizer.
TOKENS = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *synthetic.VOCAB_CHARS]
PAD_ID, EOS_ID = 0, 1
# The embedding is padded past len(TOKENS), as real checkpoints pad theirs.
VOCAB_SIZE = 8 * math.ceil(len(TOKENS) / 8)

DEFAULT_SETTINGS = {
    "seed": 0,  # the model's random weights and the warm start's batch order
    "model": {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    },
    # Stops once greedy accuracy on 256 train prompts reaches 35% (about 260-320 steps, 10-20 s on
    # one CPU thread): held-out accuracy is then 34-40%, and GRPO has room to lift it.
    "warm_start": {"steps": 600, "lr": 1e-3, "batch_size": 64, "stop_at_accuracy": 0.35},
}


def build_tokenizer(out_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Write a character-level fast tokenizer to out_dir and return it.

    Every character is its own token and decoding concatenates tokens, so decode(encode(s)) == s
    for any string over the task's characters (unknown characters become "<unk>").
    """
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(TOKENS)}, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # the default decoder would join tokens with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # prompts are left-padded for batched generation
        model_max_length=DEFAULT_SETTINGS["model"]["max_position_embeddings"],
    )
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes its own class name; this one loads under transformers 4 (vLLM) and 5.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer


def build_model(
    out_dir: str | os.PathLike,
    hidden_size: int = 128,
    intermediate_size: int = 512,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """Write a randomly initialised tiny Qwen2 (float32) to out_dir and return it."""
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
    )
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    _save(model, out_dir)
    return model


def _save(model, out_dir: str | os.PathLike) -> None:
    """save_pretrained, plus the config names that readers on transformers 4 (the vLLM image) use.

    transformers 5 writes "dtype" and "rope_parameters"; version 4 reads "torch_dtype" and
    "rope_theta". Both spell the same values.
    """
    model.save_pretrained(out_dir)
    config_path = Path(out_dir) / "config.json"
    written = json.loads(config_path.read_text())
    written.setdefault("torch_dtype", written.get("dtype", "float32"))
    written.setdefault("rope_theta", written.get("rope_parameters", {}).get("rope_theta", 10000.0))
    config_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def encode_examples(data: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of prompt + solution + EOS, and labels that are -100 except on solution + EOS.

    Returns input_ids [N, T] and labels [N, T].
    """
    index = {t: i for i, t in enumerate(TOKENS)}
    rows = [([index[c] for c in ex["prompt"]], [index[c] for c in ex["solution"]] + [EOS_ID]) for ex in data]
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        input_ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
    return input_ids, labels


def warm_start(model_dir: str | os.PathLike, train_data: list[dict], steps: int, lr: float,
               batch_size: int, seed: int = 0, stop_at_accuracy: float | None = None,
               check_every: int = 10) -> dict:
    """Supervised training of the model in model_dir on train_data; saves the result in place.

    With stop_at_accuracy, training stops as soon as greedy accuracy on a fixed sample of 256
    train prompts (checked every check_every steps) reaches it: the policy then starts GRPO
    partly right whatever the seed, instead of wherever a fixed step count happens to land.

    AdamW with a short linear warm-up then cosine decay to lr/10 (the decay makes the accuracy
    reached after a given number of steps far less noisy), gradient clipping at 1.0, batches drawn
    epoch by epoch from a seeded permutation. Returns {"steps", "train_probe_accuracy", "loss_first",
    "loss_last", "seconds"}.
    """
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    input_ids, labels = encode_examples(train_data)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(20, steps // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order, cursor, losses = torch.randperm(len(train_data), generator=generator), 0, []
    probe = train_data[:256]
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if stop_at_accuracy is not None else None
    accuracy = None
    for step in range(1, steps + 1):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(train_data), generator=generator), 0
        rows = order[cursor : cursor + batch_size]
        cursor += batch_size
        # Right padding needs no attention mask: padded positions only follow the labelled ones.
        loss = model(input_ids=input_ids[rows], labels=labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if tokenizer is not None and step % check_every == 0:
            accuracy = greedy_accuracy(model, tokenizer, probe)
            if accuracy >= stop_at_accuracy:
                break
    _save(model, model_dir)
    return {
        "steps": len(losses),
        "train_probe_accuracy": accuracy,
        "loss_first": losses[0] if losses else float("nan"),
        "loss_last": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def greedy_accuracy(model, tokenizer, data: list[dict], max_new_tokens: int | None = None,
                    batch_size: int = 256) -> float:
    """Fraction of data whose greedy completion earns exact_reward 1.0 (batched, left-padded).

    max_new_tokens defaults to the longest solution in data plus one for EOS.
    """
    if max_new_tokens is None:
        max_new_tokens = 1 + max(len(ex["solution"]) for ex in data)
    was_training = model.training
    model.eval()
    correct = 0.0
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        batch = tokenizer([ex["prompt"] for ex in chunk], return_tensors="pt", padding=True,
                          padding_side="left")
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        # Keep special tokens: the reward cuts at the first EOS, so text after it is never read.
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=False)
        correct += sum(synthetic.exact_reward(t, ex["answer"]) for t, ex in zip(texts, chunk))
    model.train(was_training)
    return correct / max(1, len(data))


def resolve_settings(settings: dict | None) -> dict:
    """DEFAULT_SETTINGS with the given sections overlaid; unknown keys are an error."""
    merged = copy.deepcopy(DEFAULT_SETTINGS)
    for key, value in (settings or {}).items():
        if key == "task":
            raise KeyError("debug model settings: the synthetic task's settings are data.synthetic")
        if key not in merged:
            raise KeyError(f"debug model settings: unknown key {key!r}")
        if isinstance(merged[key], dict):
            unknown = set(value) - set(merged[key])
            if unknown:
                raise KeyError(f"debug model settings: unknown key(s) {sorted(unknown)} in {key!r}")
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def _cache_key(settings: dict) -> str:
    """Hash of the settings and of the code that builds the model and the task."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for module in (sys.modules[__name__], synthetic):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def resolve_task(task: dict | None) -> dict:
    """make_task's arguments: its defaults with `task` overlaid (unknown keys are an error)."""
    defaults = {k: p.default for k, p in inspect.signature(synthetic.make_task).parameters.items()}
    unknown = set(task or {}) - set(defaults)
    if unknown:
        raise KeyError(f"synthetic task: unknown key(s) {sorted(unknown)}")
    return {**defaults, **(task or {})}


def ensure_debug_model(cache_root: str | os.PathLike, settings: dict | None = None,
                       task: dict | None = None) -> str:
    """Path of the warm-started debug model for these settings and this task (make_task's
    arguments, the config's data.synthetic), building it if it is not cached."""
    settings = {**resolve_settings(settings), "task": resolve_task(task)}
    final = Path(cache_root) / f"debug-model-{_cache_key(settings)}"
    if (final / "debug_model.json").exists():
        print(f"[debug_model] cached: {final}")
        return str(final)
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_root))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' bars for each save and load: the lines say enough
    try:
        t0 = time.perf_counter()
        train, heldout = synthetic.make_task(**settings["task"])
        tokenizer = build_tokenizer(tmp)
        build_model(tmp, seed=settings["seed"], **settings["model"])
        print(f"[debug_model] built tokenizer + tiny Qwen2 in {time.perf_counter() - t0:.1f}s")
        metrics = warm_start(tmp, train, seed=settings["seed"], **settings["warm_start"])
        print(f"[debug_model] warm start: {metrics['steps']} steps, loss {metrics['loss_first']:.3f}"
              f" -> {metrics['loss_last']:.3f} in {metrics['seconds']:.1f}s")
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        metrics["heldout_greedy_accuracy"] = greedy_accuracy(model, tokenizer, heldout)
        print(f"[debug_model] held-out greedy accuracy {metrics['heldout_greedy_accuracy']:.3f}"
              f" ({len(heldout)} problems) in {time.perf_counter() - t0:.1f}s")
        (tmp / "debug_model.json").write_text(json.dumps({"settings": settings, "warm_start": metrics}, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; workers of other users may read the cache
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "debug_model.json").exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same build first; theirs is identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    print(f"[debug_model] ready: {final}")
    return str(final)


if __name__ == "__main__":
    print(ensure_debug_model(sys.argv[1] if len(sys.argv) > 1 else "/tmp/debug_models"))
