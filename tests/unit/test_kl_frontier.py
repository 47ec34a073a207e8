"""kl_frontier's summary: the KL at matched accuracy, interpolated per seed, mean and standard error."""

import math

import pytest

from system.experiments.kl_frontier import kl_at_accuracy, matched_table


def test_kl_at_accuracy_interpolates_log_kl_linearly_in_accuracy():
    runs = [{"acc": 0.4, "true_kl_seq": 1.0}, {"acc": 0.6, "true_kl_seq": 4.0},
            {"acc": 0.5, "true_kl_seq": 2.0}]
    assert kl_at_accuracy(runs, 0.45) == pytest.approx(math.sqrt(2.0))  # halfway between log 1 and log 2
    assert kl_at_accuracy(runs, 0.6) == pytest.approx(4.0)
    assert math.isnan(kl_at_accuracy(runs, 0.7))  # not bracketed


def test_matched_table_mean_and_standard_error_over_seeds():
    rows = [{"mode": "full", "k": 0, "seed": s, "acc": a, "true_kl_seq": kl}
            for s, pts in ((0, [(0.4, 1.0), (0.6, 1.0)]), (1, [(0.4, 3.0), (0.6, 3.0)]))
            for a, kl in pts]
    _, out = matched_table(rows, target_acc=0.5)
    mean, se, n = out[("full", 0)]
    assert (mean, n) == (pytest.approx(2.0), 2)
    assert se == pytest.approx(1.0)  # sample std sqrt(2) / sqrt(2)
