"""group_advantages against a naive float64 loop, degenerate groups, Dr.GRPO."""

import math

import pytest
import torch

from system.algo.advantages import group_advantages


def naive_advantages(rewards, group_size, scale_by_std=True, eps=1e-6):
    out = []
    r = [float(x) for x in rewards]
    for i in range(0, len(r), group_size):
        g = r[i : i + group_size]
        mean = sum(g) / len(g)
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / len(g))  # population std
        for x in g:
            if max(g) == min(g):
                out.append(0.0)
            else:
                out.append((x - mean) / (std + eps) if scale_by_std else x - mean)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_matches_naive(scale_by_std):
    torch.manual_seed(0)
    rewards = torch.randn(8 * 5, dtype=torch.float64)
    rewards[10:15] = 0.7  # one degenerate group
    adv, metrics = group_advantages(rewards, 5, scale_by_std=scale_by_std)
    torch.testing.assert_close(adv, naive_advantages(rewards, 5, scale_by_std), rtol=1e-12, atol=1e-12)
    assert metrics["zero_std_group_frac"].item() == pytest.approx(1 / 8)


def test_hand_worked_group():
    # group [0, 1]: mean 0.5, population std 0.5 -> A = -+0.5 / (0.5 + eps)
    adv, _ = group_advantages(torch.tensor([0.0, 1.0]), 2, eps=0.0)
    assert adv.tolist() == [-1.0, 1.0]
    # group [1, 0, 0, 0]: mean 0.25, std sqrt(3)/4
    adv, _ = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), 4, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([3.0, -1.0, -1.0, -1.0], dtype=torch.float64) / math.sqrt(3))


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 1e-30, -3.3])
def test_all_equal_group_is_exactly_zero(value, scale_by_std):
    # 0.1 * 3 / 3 != 0.1 in floating point: a naive (r - mean) / (std + eps) gives ~1e-11, not 0.
    rewards = torch.tensor([value] * 3 + [0.0, 1.0, 2.0])
    adv, metrics = group_advantages(rewards, 3, scale_by_std=scale_by_std)
    assert torch.all(adv[:3] == 0.0)
    assert torch.isfinite(adv).all()
    assert metrics["zero_std_group_frac"].item() == 0.5


def test_group_size_one_gives_zero_not_nan():
    adv, _ = group_advantages(torch.tensor([1.0, 2.0, 3.0]), 1)
    assert adv.tolist() == [0.0, 0.0, 0.0]


def test_dr_grpo_is_centering_only():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 3.0])
    adv, _ = group_advantages(rewards, 3, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -8 / 3, 7 / 3, 1 / 3]))


def test_integer_rewards_and_metrics_are_detached():
    adv, metrics = group_advantages(torch.tensor([1, 0, 1, 1]), 2)
    assert adv.dtype == torch.float32
    for v in metrics.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
