"""The vLLM engine (CPU build, in this process) receiving a broadcast from a sender thread over
gloo: after the sync it generates what the sent weights generate, its log-probs are those of the
sent weights' tempered distribution, and its checksum equals the sender's; with an untied and
with a tied output head (Qwen2.5-0.5B ties it)."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from workers.weight_sync import SyncGroup, TensorMeta, checksum, plan_buckets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_qwen(out_dir, tied: bool, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from system.debug_model import EOS_ID, PAD_ID, VOCAB_SIZE, build_tokenizer

    config = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, max_position_embeddings=64, tie_word_embeddings=tied,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID, dtype="float32",
                         initializer_range=0.3)  # large enough that greedy answers vary
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    build_tokenizer(out_dir)
    return model


def _broadcast(backend, sender: torch.nn.Module, corrupt: bool = False) -> tuple[list, list]:
    """Sender thread = rank 0 (as learner rank 0), the engine = rank 1: (sent, loaded) checksums."""
    named = list(sender.named_parameters())  # tied parameters appear once, as on the learner
    buckets = plan_buckets([TensorMeta(n, tuple(p.shape), p.dtype) for n, p in named], 1 << 16)
    params, port, errors = dict(named), _free_port(), []

    def send():
        try:
            group = SyncGroup("127.0.0.1", port, 0, 2, "gloo", timeout_s=60)
            group.send(buckets, lambda b: [params[m.name] for m in b.tensors])
        except Exception as err:  # surfaced below
            errors.append(err)

    thread = threading.Thread(target=send)
    thread.start()
    backend.init_weight_sync("127.0.0.1", port, 1, 2, "gloo", 60)
    loaded = backend.receive_weights(buckets, corrupt)
    thread.join(60)
    assert not errors, errors
    return checksum(named), loaded


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_engine_loads_a_broadcast_and_checksums_what_it_holds(tmp_path, tied):
    from workers.rollout import HFBackend
    from workers.vllm_engine import VLLMBackend

    _tiny_qwen(tmp_path, tied, seed=0)
    new = _tiny_qwen(tmp_path / "new", tied, seed=1)  # other weights, same shapes
    engine = VLLMBackend(str(tmp_path), "float32", 0, on_gpu=False, kv_cache_gb=0.01, enforce_eager=True)
    prompts = [[3, 4, 5], [6, 7, 8, 9], [10, 11]]
    before = engine.generate(prompts, 1, 1.0, 1.0, 8, True, False)[0]

    sent, loaded = _broadcast(engine, new)
    assert loaded == pytest.approx(sent, rel=1e-9, abs=1e-6)
    hf = HFBackend(str(tmp_path / "new"), "float32", torch.device("cpu"))
    expected = hf.generate(prompts, 1, 1.0, 1.0, 8, True, False)[0]
    assert expected != before, "the two random models answer alike: nothing was tested"
    assert engine.generate(prompts, 1, 1.0, 1.0, 8, True, False)[0] == expected

    # the sampler's log-probs are of the distribution it sampled from: log softmax(logits / T)
    responses, logprobs = engine.generate(prompts, 4, 0.7, 1.0, 8, False, True)
    assert max(abs(a - b) for a, b in zip(_flat(logprobs), _flat(_logprobs(new, prompts, responses, 4, 0.7)))) < 1e-4

    sent, loaded = _broadcast(engine, new, corrupt=True)  # one value loads off by +1
    assert loaded[0] == pytest.approx(sent[0] + 1.0, abs=1e-4)


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


@torch.no_grad()
def _logprobs(model, prompts, responses, n: int, temperature: float) -> list[list[float]]:
    """log softmax(logits / T) of each response token under `model`, one sequence at a time."""
    out = []
    for i, response in enumerate(responses):
        ids = torch.tensor([prompts[i // n] + response])
        logits = model(ids).logits[0, len(prompts[i // n]) - 1:-1]  # [R, V]: predicts the response
        lp = torch.log_softmax(logits.double() / temperature, dim=-1)
        out.append(lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1).tolist())
    return out
