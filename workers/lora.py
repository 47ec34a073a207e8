"""LoRA on the learner (peft), and the views of the policy that weight sync sends.

- `apply_lora(model, lora)`: wrap a Hugging Face causal LM with peft LoRA adapters on the linear
  layers named by learner.lora.target_modules; only the adapters train. Target modules that match
  nothing, or that match the output head (the fused KL reads its weight as it is) or a non-linear
  layer, are a one-line ConfigError naming the key.
- A view is {name: ViewEntry}: the tensors a sync sends, under their names, each made from the
  parameters it needs (gathered together under ZeRO-3):
  `full_view` the parameters as they are (full fine-tuning);
  `merged_view` the base parameter names, every adapted weight as W_base + (s * B) @ A: what the
  rollout workers hold, and what `final/merged` saves;
  `adapter_view` only `<module>.lora_A.weight` (A) and `<module>.lora_B.weight` (s * B, the scaling
  s = alpha / r folded in), which a receiver merges into the base weights it keeps.
- `merge_lora` is the one merge formula, used by the learner and the receivers alike, so the
  rollout weights are bit for bit the same whether merged weights or adapters were sent.

peft is imported only where a model is wrapped: rollout workers import this module without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from system.config import ConfigError

ADAPTER = "default"  # peft's name for the one adapter the learner trains
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"  # suffixes of adapter tensors in a sync


@dataclass(frozen=True)
class ViewEntry:
    params: tuple  # the parameters the tensor is made from; params[0] has its shape
    make: Callable[[], torch.Tensor]  # the tensor, from the (gathered) parameters


def apply_lora(model: nn.Module, lora: dict) -> nn.Module:
    """The model wrapped in a peft LoRA model; only the adapters require gradients."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora["target_modules"]), bias="none")
    head = model.get_output_embeddings()
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model ..."
        raise ConfigError(f"learner.lora.target_modules: {str(err).splitlines()[0]}") from None
    for name, layer in lora_layers(wrapped).items():
        base = layer.get_base_layer()
        if base is head:
            raise ConfigError(f"learner.lora.target_modules: {name} is the output head, which stays "
                              f"frozen (the fused KL reads its weight as it is)")
        if type(base) is not nn.Linear:
            raise ConfigError(f"learner.lora.target_modules: {name} is a {type(base).__name__}; "
                              f"LoRA here adapts linear layers only")
    return wrapped


def lora_layers(peft_model: nn.Module) -> dict:
    """{module name in the Hugging Face model: peft LoRA layer}."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def merge_lora(base: torch.Tensor, a: torch.Tensor, b_scaled: torch.Tensor) -> torch.Tensor:
    """W_base + (s * B) @ A, in W's dtype: [out, in] from [out, in], [r, in], [out, r]."""
    return base + (b_scaled @ a).to(base.dtype)


def _scaled_b(layer) -> torch.Tensor:
    return layer.lora_B[ADAPTER].weight.detach() * layer.scaling[ADAPTER]


def full_view(model: nn.Module) -> dict:
    return {n: ViewEntry((p,), lambda p=p: p.detach()) for n, p in model.named_parameters()}


def merged_view(peft_model: nn.Module) -> dict:
    """The policy under the base model's parameter names, adapters merged in."""
    layers = lora_layers(peft_model)
    view = {}
    for name, p in peft_model.get_base_model().named_parameters():
        if ".lora_" in name:
            continue
        module, _, leaf = name.rpartition(".base_layer.")
        if module in layers and leaf == "weight":
            layer = layers[module]
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            view[f"{module}.weight"] = ViewEntry(
                (p, a, b), lambda p=p, a=a, layer=layer: merge_lora(p.detach(), a.detach(), _scaled_b(layer)))
        else:
            view[f"{module}.{leaf}" if module else name] = ViewEntry((p,), lambda p=p: p.detach())
    return view


def adapter_view(peft_model: nn.Module) -> dict:
    """A and s * B of every adapted layer."""
    view = {}
    for module, layer in lora_layers(peft_model).items():
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        view[module + LORA_A] = ViewEntry((a,), lambda a=a: a.detach())
        view[module + LORA_B] = ViewEntry((b,), lambda layer=layer: _scaled_b(layer))
    return view


class AdapterMerger:
    """The receiving side of adapter-only sync (hf rollout backend): keeps a copy of each adapted
    base weight, and on every sync sets W = W_base + (s * B) @ A."""

    def __init__(self, params: dict):
        self.params = params  # {name: parameter} of the rollout model
        self.base: dict[str, torch.Tensor] = {}
        self._halves: dict[str, dict] = {}  # A or s * B received before its partner

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """One received adapter tensor (copied: it may be a view of a reused buffer)."""
        module, half = (name[:-len(LORA_A)], "a") if name.endswith(LORA_A) else (name[:-len(LORA_B)], "b")
        got = self._halves.setdefault(module, {})
        got[half] = tensor.clone()
        if len(got) == 2:
            weight = self.params[f"{module}.weight"].data
            base = self.base.setdefault(module, weight.clone())
            weight.copy_(merge_lora(base, got["a"], got["b"]))
            del self._halves[module]


def is_adapter(name: str) -> bool:
    return name.endswith(LORA_A) or name.endswith(LORA_B)
