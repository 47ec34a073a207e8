"""Micro-batches by a token budget, rows balanced over ranks by tokens, and packed rows.

Responses in one batch span two orders of magnitude in length, so the learner and the reference
worker form their forward passes by tokens, not by rows (docs/design.md, section 2):

- `plan_micro_batches`: rows sorted by length, longest first, and cut greedily so that each
  micro-batch costs at most `max_tokens`: rows x its longest row when padded (each micro-batch is
  padded only to its own longest row), the sum of the lengths when packed.
- `balance_ranks`: the rows of a minibatch over the data-parallel ranks, longest first to the rank
  with the fewest tokens so far (each rank gets at least one row while there are enough).
- `equal_counts`: every rank the same number of micro-batches (DeepSpeed's ZeRO-2/3 reduce and
  gather in every forward/backward, so the ranks must run as many): a rank with fewer splits its
  largest ones, and where it has too few rows it gets empty ones (the learner runs a row of its
  own there with its loss times 0).
- `packed_inputs` / `packed_positions`: right-padded rows [n, L] as one packed row [1, S] of the
  real tokens with `position_ids` restarting at every sequence, and where the positions that
  predict response tokens lie in it. Hugging Face models read packed rows from the position ids
  (with no attention mask): FlashAttention 2 runs them varlen (no compute on padding); SDPA, eager
  and flex attention get a block-diagonal mask (correct, but SDPA and eager still compute the
  whole [S, S] attention). `<role>.packing=auto` turns packing on only where it pays.
"""

from __future__ import annotations

from typing import Sequence

import torch


def micro_batch_cost(lengths: Sequence[int], packed: bool) -> int:
    """Tokens one forward over these rows computes: the sum when packed, rows x longest when padded."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, packed: bool,
                       key: str = "max_tokens_per_micro_batch") -> list[list[int]]:
    """Indices into `lengths` grouped into micro-batches of cost <= max_tokens (micro_batch_cost).

    Longest first (ties by index), greedy: a micro-batch takes the next row while it fits, so rows
    of similar length share a micro-batch and a padded one wastes little. A row longer than the
    budget is a ValueError naming `key` (the config key of the budget)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if order and lengths[order[0]] > max_tokens:
        raise ValueError(f"{key}: a row of {lengths[order[0]]} tokens (prompt + response) is longer "
                         f"than the budget {key}={max_tokens}; raise it to at least {lengths[order[0]]}")
    plans: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and micro_batch_cost([lengths[j] for j in current + [i]], packed) > max_tokens:
            plans.append(current)
            current = []
        current.append(i)
    if current:
        plans.append(current)
    return plans


def balance_ranks(lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Indices into `lengths` for each rank (ascending), longest first to the rank with the fewest
    tokens so far (ties: fewer rows, then the lower rank). The first num_ranks rows go one to each
    rank, so every rank has a row when there are at least num_ranks."""
    tokens, ranks = [0] * num_ranks, [[] for _ in range(num_ranks)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(num_ranks), key=lambda r: (tokens[r], len(ranks[r]), r))
        ranks[r].append(i)
        tokens[r] += lengths[i]
    return [sorted(rows) for rows in ranks]


def equal_counts(plans: list[list[list[int]]]) -> list[list[list[int]]]:
    """The ranks' micro-batch plans with the same number of micro-batches each: a rank with fewer
    splits its micro-batch with the most rows in two (the halves cost no more than the whole)
    until it has as many, and is given empty ones where every micro-batch is one row."""
    count = max((len(p) for p in plans), default=0)
    out = []
    for plan in plans:
        plan = [list(mb) for mb in plan]
        while len(plan) < count:
            i = max(range(len(plan)), key=lambda j: len(plan[j]), default=None)
            if i is None or len(plan[i]) < 2:
                plan += [[] for _ in range(count - len(plan))]
                break
            mb = plan[i]
            plan[i:i + 1] = [mb[:len(mb) // 2], mb[len(mb) // 2:]]
        out.append(plan)
    return out


def packed_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows [n, L] (attention_mask a prefix of ones per row) as one packed row:
    (input_ids [1, S], position_ids [1, S]), S = the number of real tokens, positions 0..len-1
    per sequence."""
    real = attention_mask.bool()  # [n, L]
    positions = torch.cumsum(real.long(), dim=-1) - 1  # [n, L]
    return input_ids[real][None], positions[real][None]


def packed_positions(attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Where the positions loss_mask marks ([n, L-1], of the padded rows) lie in the packed row of
    packed_inputs: [M], in the order of loss_mask's row-major nonzeros (the padded rows' order)."""
    lengths = attention_mask.long().sum(-1)  # [n]
    offsets = torch.cumsum(lengths, 0) - lengths  # [n]
    nz = loss_mask.bool().nonzero()  # [M, 2]
    return offsets[nz[:, 0]] + nz[:, 1]


def in_row_order(pieces: list[tuple[list[int], torch.Tensor]], counts: Sequence[int]) -> torch.Tensor:
    """Per-position outputs of micro-batches back in row order. pieces: (rows, values [m, ...])
    with values packed row by row in the order of `rows`; counts[i]: the positions of row i.
    Returns the values of rows 0, 1, ... concatenated."""
    by_row: dict[int, torch.Tensor] = {}
    for rows, values in pieces:
        for row, part in zip(rows, torch.split(values, [int(counts[r]) for r in rows])):
            by_row[row] = part
    return torch.cat([by_row[i] for i in range(len(counts))])
