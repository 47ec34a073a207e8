"""ReferenceWorker: the frozen pi_ref, returning what the full-vocabulary KL needs.

At every response position it returns either
- `hidden`: the final hidden states [M, H] (after the last norm), from which the learner rebuilds
  the reference logits exactly with its frozen copy of the reference output head; H values per
  token instead of V, ~40x fewer bytes for Qwen shapes; or
- `logits`: the full reference logits [M, V], exact, for small vocabularies and cross-checks.

Rows are packed in batch order: sequence by sequence, position by position, only where
`loss_mask` is 1 (the position that predicts a response token).
"""

from __future__ import annotations

import os

import torch

from system.data.batch import build_batch
from system.data.micro_batches import in_row_order, plan_micro_batches
from workers.common import hidden_at, load_causal_lm, setup_process


class ReferenceWorker:
    def __init__(self, model_path: str, dtype: str, torch_threads: int, seed: int, *, transport: str,
                 max_tokens: int, packed: bool, attn_implementation: str = "sdpa"):
        self.device = setup_process(torch_threads, seed)
        self.model = load_causal_lm(model_path, dtype, self.device,
                                    attn_implementation=attn_implementation).eval()
        self.model.requires_grad_(False)
        self.configure(transport, max_tokens, packed)

    def configure(self, transport: str, max_tokens: int, packed: bool) -> None:
        """What the rows hold (reference.transport) and how they are cut (reference.
        max_tokens_per_micro_batch, reference.packing): set at start, and by the next run on
        these actors (system/actors.py)."""
        if transport not in ("hidden", "logits"):
            raise ValueError(f"reference.transport: unknown {transport!r} (hidden | logits)")
        self.transport, self.max_tokens, self.packed = transport, max_tokens, packed

    def pid(self) -> int:
        """This process's id: the driver tells a restarted worker by a new one (tests kill it)."""
        return os.getpid()

    def forward_sampled(self, prompts: list[list[int]], pad_id: int, index: list[int],
                        *outputs: dict) -> dict:
        """forward() of rows `index` of the batch that the driver builds from these prompts and the
        rollout workers' outputs (Ray passes them in when sampling ends, so this runs as soon as the
        sample exists, without a round trip through the driver)."""
        responses = [r for out in outputs for r in out["responses"]]
        batch = build_batch(prompts, responses, pad_id)
        return self.forward(**batch.reference_inputs(torch.tensor(index)))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor) -> dict:
        """input_ids, attention_mask: [B, L]; loss_mask: [B, L-1] -> {"rows": [M, H or V], "bytes"}.

        Micro-batches of at most reference.max_tokens_per_micro_batch tokens, rows of similar
        length together, each padded to its own longest row or packed (reference.packing);
        the rows come back in the input's order."""
        lengths = attention_mask.sum(-1).tolist()
        pieces = []
        for rows in plan_micro_batches(lengths, self.max_tokens, self.packed,
                                       "reference.max_tokens_per_micro_batch"):
            idx = torch.tensor(rows)
            width = max(max(lengths[i] for i in rows), 2)
            h = hidden_at(self.model.base_model, input_ids[idx, :width].to(self.device),
                          attention_mask[idx, :width].to(self.device),
                          loss_mask[idx, :width - 1].to(self.device), self.packed)  # [m, H]
            if self.transport == "logits":
                h = self.model.get_output_embeddings()(h)  # [m, V]
            pieces.append((rows, h.cpu()))
        out = in_row_order(pieces, loss_mask.sum(-1).long().tolist())
        return {"rows": out, "bytes": out.numel() * out.element_size()}
