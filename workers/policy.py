"""PolicyWithHead: the policy plus the frozen reference output head, as the learner's DeepSpeed engine
wraps them. Its forward gives, at the positions that predict response tokens, the sampled tokens'
log-probs, the full-vocabulary KL to the reference and the entropy, all of the tempered
distributions, through the fused chunked op (system/algo/fused_kl.py). Used by workers/learner.py.
"""

from __future__ import annotations

import torch
from torch import nn

from system.algo.fused_kl import fused_logprob_kl, logprobs_from_hidden
from system.algo.kl import logprobs_from_logits
from workers.common import hidden_at


class PolicyWithHead(nn.Module):
    """The policy plus the frozen reference head: per-token log-probs and KL of the tempered policy.

    Every distribution here is softmax(logits / T), T = rollout.temperature, for all four uses:
    pi_theta and pi_old (the importance ratio), pi_ref, and the KL. The rollout samples from
    pi_old^T, so the ratio must be pi_theta^T / pi_old^T to correct for the policy that actually
    sampled, and pi_theta^T is the policy being improved (the next samples come from it). The KL
    regularises that same sampling policy against the reference tempered alike,
    KL(pi_theta^T || pi_ref^T): it is 0 at the start (theta = ref), where KL(pi_theta^T || pi_ref)
    would not be, and would pull the policy towards undoing the temperature. (verl and OpenRLHF
    divide the learner's logits by the rollout temperature too.)
    """

    def __init__(self, policy: nn.Module, ref_head: torch.Tensor | None, temperature: float = 1.0,
                 packed: bool = False):
        super().__init__()
        self.policy = policy
        self.temperature = float(temperature)
        self.packed = packed  # forward packed rows (learner.packing=on)
        # a buffer, not a parameter: frozen, never partitioned, never in the optimizer; None for the
        # logits transport (the reference worker sends the logits themselves)
        self.register_buffer("ref_head", ref_head, persistent=False)

    def head_weight(self) -> torch.Tensor:
        return self.policy.get_output_embeddings().weight

    def backbone(self) -> nn.Module:
        """The transformer under the output head (of the adapted model, with LoRA)."""
        lora = hasattr(self.policy, "disable_adapter")  # a peft model
        return (self.policy.get_base_model() if lora else self.policy).base_model

    def hidden_at(self, input_ids, attention_mask, loss_mask) -> torch.Tensor:
        """Final hidden states at the positions that predict response tokens: [M, H] (packed rows
        with learner.packing=on, workers/common.hidden_at)."""
        return hidden_at(self.backbone(), input_ids, attention_mask, loss_mask, self.packed)

    @torch.no_grad()
    def base_hidden_at(self, input_ids, attention_mask, loss_mask) -> torch.Tensor:
        """With LoRA, pi_ref's hidden states: the same forward with the adapters disabled: [M, H]."""
        with self.policy.disable_adapter():
            return self.hidden_at(input_ids, attention_mask, loss_mask)

    def forward(self, input_ids, attention_mask, loss_mask, ref_rows, chunk_size: int):
        """pi_theta^T's log-prob of each sampled token, KL(pi_theta^T || pi_ref^T) and entropy: [M] each."""
        h = self.hidden_at(input_ids, attention_mask, loss_mask)  # [M, H]
        tokens = input_ids[:, 1:][loss_mask.bool()]  # [M]
        return fused_logprob_kl(h, self.head_weight(), ref_rows, self.ref_head, tokens,
                                chunk_size=chunk_size, temperature=self.temperature,
                                return_entropy=True)

    @torch.no_grad()
    def logprobs(self, hidden: torch.Tensor, tokens: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """The current policy's log-probs at T of the sampled tokens [M] from its final hidden
        states [M, H] (`hidden_at`), no gradient (pi_old): [M]. The caller gathers the head."""
        return logprobs_from_hidden(hidden, self.head_weight(), tokens, chunk_size,
                                    temperature=self.temperature)

    @torch.no_grad()
    def ref_logprobs(self, ref_rows: torch.Tensor, tokens: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """pi_ref's log-probs at T from the reference rows (hidden states [M, H] or logits [M, V]): [M]."""
        if self.ref_head is None:
            return logprobs_from_logits(ref_rows, tokens, temperature=self.temperature)
        return logprobs_from_hidden(ref_rows, self.ref_head, tokens, chunk_size,
                                    temperature=self.temperature)
