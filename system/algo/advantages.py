"""Group-relative advantages for GRPO (and Dr.GRPO without std scaling).

Shapes: B prompts, G responses per prompt; rewards arrive flat as [B*G] with each group contiguous
(group i is rows i*G .. i*G+G-1), which is how the rollout side emits them.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage of each response relative to its group.

    A_i = (r_i - mean_g) / (std_g + eps) when ``scale_by_std`` (GRPO), A_i = r_i - mean_g otherwise
    (Dr.GRPO). The std is the population std (``unbiased=False``, divide by G): it is defined for
    G = 1 and is the std of exactly the numbers being normalised. (TRL and verl use the unbiased std;
    the two differ by the constant factor sqrt(G / (G - 1)).)

    A group whose rewards are all equal carries no learning signal and gets advantage exactly 0
    (never NaN, never a rounding residue such as 1e-17 / 1e-6).

    Args:
        rewards: [B*G] float, groups contiguous.
        group_size: G.
        scale_by_std: divide by the group std (GRPO) or not (Dr.GRPO).
        eps: added to the std before dividing.

    Returns:
        advantages: [B*G], same dtype as ``rewards`` (float32 if rewards are not floating point).
        metrics: detached 0-d tensors: reward_mean, reward_std, advantage_mean, advantage_abs_mean,
            zero_std_group_frac (fraction of groups with all-equal rewards).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = rewards.detach().view(-1, group_size)  # [B, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    # Exact test (max == min), not std < tol: a group of identical rewards must give exactly 0.
    degenerate = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # [B, 1]
    if scale_by_std:
        std = grouped.std(dim=1, unbiased=False, keepdim=True)  # [B, 1]
        centered = centered / (std + eps)
    adv = torch.where(degenerate, torch.zeros_like(centered), centered).view(-1)  # [B*G]

    metrics = {
        "reward_mean": rewards.detach().mean(),
        "reward_std": rewards.detach().std(unbiased=False),
        "advantage_mean": adv.mean(),
        "advantage_abs_mean": adv.abs().mean(),
        "zero_std_group_frac": degenerate.to(rewards.dtype).mean(),
    }
    return adv, metrics
