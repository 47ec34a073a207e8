"""The output head the fused KL op assumes (logits = final hidden state @ W.T): models whose logits are
anything else are refused at start with one line naming the reason."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from workers.common import output_head_problem  # noqa: E402

V = 61


def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, **kw)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_plain_heads_are_accepted(tied):
    assert output_head_problem(_tiny(Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=tied)) is None


def test_soft_capped_and_scaled_logits_are_refused():
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    problem = output_head_problem(_tiny(Gemma2Config, Gemma2ForCausalLM))
    assert "final_logit_softcapping=30" in problem and "\n" not in problem
    problem = output_head_problem(_tiny(CohereConfig, CohereForCausalLM))
    assert "logit_scale=0.0625" in problem and "\n" not in problem


def test_head_bias_and_unlisted_logit_transforms_are_refused():
    model = _tiny(Qwen2Config, Qwen2ForCausalLM)
    model.lm_head = torch.nn.Linear(16, V, bias=True)
    assert "bias-free" in output_head_problem(model)

    class Scaled(Qwen2ForCausalLM):  # a logit scale no config field announces
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    problem = output_head_problem(Scaled(model.config).eval())
    assert "not its final hidden state @ output head weight" in problem and "\n" not in problem
