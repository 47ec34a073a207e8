"""The training batch: padded token tensors built from prompts and sampled responses, and its split
across learner ranks, minibatches and token-budget micro-batches (system/data/micro_batches.py).

Layout: row i is prompt + response, right-padded to L. `loss_mask[i, t]` is 1 where position t
predicts a response token (token t+1), so logits/hidden states at [:, :-1] line up with it.
Rows are grouped by prompt: rows g*G .. g*G+G-1 share one prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from system.algo.losses import loss_normalizer
from system.data.micro_batches import balance_ranks, equal_counts, plan_micro_batches


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


@dataclass
class LearnerSplit:
    """What each learner rank gets of a batch (split_for_learners)."""
    rows: list[torch.Tensor]  # per rank: indices into the batch, minibatch by minibatch
    normalizers: list[float]  # per minibatch: its whole normalizer (system/algo/losses.py)
    # per rank, per minibatch: its micro-batches, as positions in the rank's rows; every rank has
    # as many micro-batches in a minibatch (an empty one: the learner runs a stand-in, loss x 0)
    plans: list[list[list[list[int]]]]


def split_for_learners(batch: Batch, num_ranks: int, minibatches: int, aggregation: str,
                       max_tokens: int | None = None, packed: bool = False) -> LearnerSplit:
    """Rows for each rank, each minibatch's whole normalizer, and the ranks' micro-batches.

    Minibatch m is the same set of rows whatever the number of ranks (contiguous slice m of the
    batch); its rows go to the ranks balanced by tokens (system/data/micro_batches.balance_ranks),
    and each rank's part is cut into micro-batches of at most `max_tokens` tokens (padded to their
    own longest row, or packed; None: one micro-batch per part). With the whole minibatch's
    normalizer, one rank or several, one micro-batch or many, give the same update.
    """
    n = batch.size
    per_mb = n // minibatches
    lengths = batch.attention_mask.sum(-1).tolist()
    rank_rows: list[list[int]] = [[] for _ in range(num_ranks)]
    plans: list[list[list[list[int]]]] = [[] for _ in range(num_ranks)]
    normalizers = []
    for m in range(minibatches):
        lo = m * per_mb
        normalizers.append(float(loss_normalizer(batch.loss_mask[lo:lo + per_mb], aggregation)))
        parts = balance_ranks(lengths[lo:lo + per_mb], num_ranks)
        mb_plans = []
        for r, part in enumerate(parts):
            offset = len(rank_rows[r])
            rank_rows[r].extend(lo + i for i in part)
            part_lengths = [lengths[lo + i] for i in part]
            local = (plan_micro_batches(part_lengths, max_tokens, packed, "learner.max_tokens_per_micro_batch")
                     if max_tokens else [list(range(len(part)))])
            mb_plans.append([[offset + k for k in mb] for mb in local])
        for r, plan in enumerate(equal_counts(mb_plans)):
            plans[r].append(plan)
    return LearnerSplit([torch.tensor(rows, dtype=torch.long) for rows in rank_rows], normalizers, plans)


def split_packed(rows: torch.Tensor, loss_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select, from rows packed over the whole batch ([M, D] in row-major mask order), those of
    the sequences in `index` (in that order)."""
    counts = loss_mask.sum(-1).long()
    starts = torch.cumsum(counts, 0) - counts
    return torch.cat([rows[starts[i]:starts[i] + counts[i]] for i in index.tolist()])


def shard_rows(shard: dict, rows: list[int]) -> dict:
    """Rows `rows` of a learner's shard as one micro-batch: its per-row tensors [n, ...] selected,
    those over positions ([n, L] and [n, L-1]) cut at these rows' longest (right padding: nothing
    real lies beyond), the reference rows [m, H or V] of these rows (`ref_rows`, packed over the
    shard) and the sampled tokens [m]."""
    n, width_all = shard["input_ids"].shape
    idx = torch.tensor(rows)
    width = max(int(shard["attention_mask"][idx].sum(-1).max()), 2)
    mb = {}
    for key, v in shard.items():
        if torch.is_tensor(v) and key != "ref_rows" and v.shape[0] == n:
            v = v[idx]
            if v.dim() == 2:
                v = v[:, :width if v.shape[1] == width_all else width - 1]
            mb[key] = v
    mb["tokens"] = mb["input_ids"][:, 1:][mb["loss_mask"].bool()]
    if "ref_rows" in shard:
        mb["ref_rows"] = split_packed(shard["ref_rows"], shard["loss_mask"], idx)
    return mb
