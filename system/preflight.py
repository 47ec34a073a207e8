"""Checks of the model directory and the reward functions, in the driver, before any actor starts.

    tokenizer = check_model_dir("/models/qwen")      # ConfigError naming model.path, else the tokenizer
    check_rewards(cfg, sample_answer="42")           # ConfigError naming reward.functions[i]

A bad input must stop the run with one line and exit code 2 before Ray and the actors start (30 s
and more), not inside an actor's traceback. The checks are cheap: config.json is parsed and built
into a model on the meta device (no memory), the safetensors files' headers are read (not their
tensors) and compared with that model's parameter shapes, and the file sizes with the headers'
offsets (a truncated download); the tokenizer is loaded, as the driver needs it anyway. Each reward
is built and called once on (answer, answer) from the train set: a reward that raises, or returns
something other than a finite number, on the reference answer itself is broken for every sample.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import warnings
from contextlib import contextmanager

from system.config import ConfigError

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def check_model_dir(path: str, trust_remote_code: bool = False):
    """The tokenizer of the model directory at `path`, after checking its config.json, weights and
    tokenizer; ConfigError("model.path: ...") on the first problem."""
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"model.path: {path!r} is not a model directory (no config.json)")
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"model.path: {path}/config.json is not valid JSON ({_first_line(err)})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ConfigError(f"model.path: {path}/config.json has no model_type (not a Hugging Face model config)")
    shapes = _model_shapes(path, trust_remote_code)
    _check_weights(path, shapes)
    return _load_tokenizer(path, trust_remote_code)


def _model_shapes(path: str, trust_remote_code: bool) -> dict:
    """{parameter name: shape} of the model config.json describes, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad config
        raise ConfigError(f"model.path: {path}/config.json does not describe a causal LM that "
                          f"transformers can build ({_first_line(err)})") from None
    problem = head_config_problem(model)
    if problem:
        raise ConfigError(f"model.path: {problem}")
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


# Model config fields that change the logits after the output head's matmul (Gemma 2/3 soft-capping,
# Cohere's logit scale, Granite's logit divisor); the value that leaves the logits unchanged.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def head_config_problem(model) -> str | None:
    """Why the logits of `model` (built on any device, the meta device included) are not
    `hidden @ W.T` by its config or its head's shape, or None: what the fused KL op computes.
    The learner then checks the loaded model's numbers too (workers/common.output_head_problem)."""
    cfg, head, name = model.config, model.get_output_embeddings(), type(model).__name__
    for key, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(cfg, key, None)
        if value is not None and value != neutral:
            return (f"{name} transforms its logits after the output head ({key}={value}); the "
                    f"learner computes logits as hidden @ W.T only")
    if head is None or getattr(head, "bias", None) is not None:
        return f"{name}'s output head is not a bias-free linear layer; the learner needs hidden @ W.T"
    return None


def _safetensors_header(file: str) -> dict:
    """The header of a .safetensors file {name: {"shape", "data_offsets"}}; ValueError if the file
    is not one, or shorter than its header says (a truncated download)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise ValueError("not a safetensors file (bad header length)")
        header = json.loads(f.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: {size} bytes, its header needs {8 + n + end}")
    return header


def _check_weights(path: str, shapes: dict) -> None:
    present = [f for f in _WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
    if not present:
        raise ConfigError(f"model.path: {path} has no weights ({', '.join(_WEIGHT_FILES[::2])})")
    files = ["model.safetensors"] if "model.safetensors" in present else []
    if not files and "model.safetensors.index.json" in present:
        try:
            with open(os.path.join(path, "model.safetensors.index.json")) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"model.path: {path}/model.safetensors.index.json is not a weight "
                              f"index ({_first_line(err)})") from None
    found = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ConfigError(f"model.path: {file} is missing (named by the weight index)")
        try:
            header = _safetensors_header(file)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise ConfigError(f"model.path: {file} is damaged ({err})") from None
        found.update({k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)})
    if files and not set(found) & set(shapes):
        raise ConfigError(f"model.path: {path}: no tensor in the weights is a parameter of the model "
                          f"config.json describes")
    missing = sorted(set(shapes) - set(found) - {"lm_head.weight"})  # a tied head has no tensor
    if files and missing and len(set(found) & set(shapes)) >= len(shapes) / 2:  # same naming, gaps
        raise ConfigError(f"model.path: {path}: the weights lack {len(missing)} parameter(s) of the "
                          f"model config.json describes, e.g. {missing[0]}")
    for name, shape in found.items():
        if name in shapes and shapes[name] != shape:
            raise ConfigError(f"model.path: {path}: weight {name} has shape {list(shape)}, config.json "
                              f"makes it {list(shapes[name])}")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _load_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ConfigError(f"model.path: {path} has no tokenizer ({', '.join(_TOKENIZER_FILES)})")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - tokenizers raise many types for a bad file
        raise ConfigError(f"model.path: the tokenizer in {path} does not load ({_first_line(err)})") from None
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise ConfigError(f"model.path: {path} has no usable tokenizer")
    if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None:
        raise ConfigError(f"model.path: the tokenizer in {path} has neither an EOS nor a pad token")
    return tokenizer


@contextmanager
def _time_limit(seconds: float):
    """TimeoutError after `seconds` (SIGALRM: the main thread only; elsewhere no limit)."""
    def expire(signum, frame):
        raise TimeoutError

    try:
        old = signal.signal(signal.SIGALRM, expire)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check_rewards(cfg, sample_answer: str) -> None:
    """Build each reward in cfg.reward.functions and call it once on (answer, answer); ConfigError
    naming the entry when it cannot be built, raises, or returns no finite number. A call that runs
    past min(reward.timeout_s, 5 s) is left alone: time limits are the reward pool's job."""
    from system.rewards.registry import make_reward, normalize_spec

    for i, spec in enumerate(cfg.reward.functions):
        key = f"reward.functions[{i}]"
        try:
            s = normalize_spec(spec)
            fn = make_reward(s["name"], **s["kwargs"])
        except (Exception, SystemExit) as err:  # noqa: BLE001 - an import of user code can raise anything
            raise ConfigError(f"{key}: {str(err).splitlines()[0] if str(err) else _first_line(err)}") from None
        try:
            with _time_limit(min(cfg.reward.timeout_s, 5.0)):
                value = fn(sample_answer, sample_answer)
        except TimeoutError:
            continue
        except (Exception, SystemExit) as err:  # noqa: BLE001 - user code: anything, even exit()
            raise ConfigError(f"{key}: {s['name']}(response, answer) raised {_first_line(err)} on the "
                              f"answer {sample_answer[:40]!r} itself") from None
        try:
            number = None if isinstance(value, (str, bytes)) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: {s['name']}(response, answer) returned {str(value)[:40]!r} "
                              f"({type(value).__name__}) on the answer {sample_answer[:40]!r} itself; "
                              f"a reward must return a finite number")
