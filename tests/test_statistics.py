"""Bootstrap over users, 95% intervals and paired tests (the one module evaluate and the study share)."""

import numpy as np
import pytest

from mta_ray.core.statistics import draws, interval95, paired, user_index, user_resamples


def test_a_resample_keeps_every_query_of_each_drawn_user():
    users_of, n = user_index(["b", "a", "b", "c", "b", "a"])
    assert n == 3 and users_of.tolist() == [1, 0, 1, 2, 1, 0]
    for idx in user_resamples(users_of, n, 50, seed=0):
        counts = np.bincount(users_of[idx], minlength=n)
        sizes = np.bincount(users_of, minlength=n)
        assert np.all(counts % sizes == 0) and counts.sum() == len(idx)   # whole users, drawn with replacement
        assert (counts // sizes).sum() == n                                # n users per resample
    again = user_resamples(users_of, n, 5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, user_resamples(users_of, n, 5, seed=0)))


def test_interval_and_paired_test_on_known_answers():
    rng = np.random.default_rng(0)
    users_of = np.repeat(np.arange(200), 2)
    good = rng.random(400) < 0.8           # a method right 80% of the time
    bad = rng.random(400) < 0.3
    resamples = user_resamples(users_of, 200, 400, seed=1)
    d_good = draws(lambda idx: {"accuracy": float(good[idx].mean())}, resamples)["accuracy"]
    d_bad = draws(lambda idx: {"accuracy": float(bad[idx].mean())}, resamples)["accuracy"]
    lo, hi = interval95(d_good)
    assert lo < good.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / 400), rel=0.35)
    t = paired(d_good, d_bad, good.mean(), bad.mean(), higher_is_better=True)
    assert t["advantage"] == pytest.approx(good.mean() - bad.mean()) and t["ci95"][0] > 0 and t["p_not_better"] == 0
    flipped = paired(d_bad, d_good, bad.mean(), good.mean(), higher_is_better=False)   # lower is better: bad wins
    assert flipped["advantage"] > 0 and flipped["p_not_better"] == 0
    same = paired(d_good, d_good, good.mean(), good.mean(), higher_is_better=True)
    assert same["advantage"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_not_better"] == 1.0
