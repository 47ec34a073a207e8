"""The training batch: padded token tensors built from prompts and sampled responses, and its split
across learner ranks and minibatches.

Layout: row i is prompt + response, right-padded to L. `loss_mask[i, t]` is 1 where position t
predicts a response token (token t+1), so logits/hidden states at [:, :-1] line up with it.
Rows are grouped by prompt: rows g*G .. g*G+G-1 share one prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from system.algo.losses import loss_normalizer


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N, L] prompt + response, right-padded
    attention_mask: torch.Tensor  # [N, L] 1 on real tokens
    loss_mask: torch.Tensor  # [N, L-1] 1 where the position predicts a response token
    behavior_logp: torch.Tensor | None = None  # [N, L-1] the sampler's log-probs, if used as pi_old

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, index: torch.Tensor | slice) -> dict:
        out = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
               "loss_mask": self.loss_mask[index]}
        if self.behavior_logp is not None:
            out["behavior_logp"] = self.behavior_logp[index]
        return out

    def reference_inputs(self, index: torch.Tensor | slice) -> dict:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "loss_mask": self.loss_mask[index]}


def build_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                logprobs: list[list[float]] | None = None) -> Batch:
    """prompts[i] and responses[i] are the token ids of row i; logprobs[i] the sampler's
    log-probs of responses[i] (optional)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(max(lengths), 2)
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention[i, :len(p) + len(r)] = 1
        loss_mask[i, len(p) - 1:len(p) + len(r) - 1] = 1
    behavior = None
    if logprobs is not None:
        behavior = torch.zeros((n, width - 1), dtype=torch.float32)
        for i, (p, lp) in enumerate(zip(prompts, logprobs)):
            behavior[i, len(p) - 1:len(p) - 1 + len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return Batch(input_ids, attention, loss_mask, behavior)


def split_for_learners(batch: Batch, num_ranks: int, minibatches: int,
                       aggregation: str) -> tuple[list[torch.Tensor], list[float]]:
    """Row indices for each rank, and each minibatch's whole normalizer.

    Minibatch m is the same set of rows whatever the number of ranks (contiguous slice m of the
    batch), and rank r takes the r-th part of every minibatch, in minibatch order. So one rank and
    two ranks see the same minibatches and, with the whole-minibatch normalizer, the same update.
    """
    n = batch.size
    per_mb = n // minibatches
    per_rank = per_mb // num_ranks
    rank_rows: list[list[int]] = [[] for _ in range(num_ranks)]
    normalizers = []
    for m in range(minibatches):
        mb_rows = range(m * per_mb, (m + 1) * per_mb)
        normalizers.append(float(loss_normalizer(batch.loss_mask[m * per_mb:(m + 1) * per_mb],
                                                 aggregation)))
        for r in range(num_ranks):
            rank_rows[r].extend(mb_rows[r * per_rank:(r + 1) * per_rank])
    return [torch.tensor(rows, dtype=torch.long) for rows in rank_rows], normalizers


def split_packed(rows: torch.Tensor, loss_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select, from rows packed over the whole batch ([M, D] in row-major mask order), those of
    the sequences in `index` (in that order)."""
    counts = loss_mask.sum(-1).long()
    starts = torch.cumsum(counts, 0) - counts
    return torch.cat([rows[starts[i]:starts[i] + counts[i]] for i in index.tolist()])
