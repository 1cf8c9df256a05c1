"""Bootstrap over users, 95% intervals and paired tests (the one module evaluate and the study share).

The resampling of per-user sums must give what rescoring every resample gave (the former code, kept
here as the reference), within Monte-Carlo error."""

import numpy as np
import pytest

from mta_ray.core.metrics import query_scores, score
from mta_ray.core.statistics import (UserBootstrap, blocks_in_memory, interval95, method_stats, paired, user_index)
from mta_ray.core.tasks import get_task


def reference_resamples(users_of, n_users, samples, seed):
    """The former code: query indices of each resample, every query of each drawn user."""
    rng = np.random.default_rng(seed)
    by_user = [np.flatnonzero(users_of == u) for u in range(n_users)]
    return [np.concatenate([by_user[u] for u in rng.integers(0, n_users, n_users)]) for _ in range(samples)]


def reference_draws(task, preds, golds, resamples):
    """The former code: every metric rescored on every resample."""
    per = [score(task, [preds[i] for i in idx], [golds[i] for i in idx]) for idx in resamples]
    return {k: np.array([m[k] for m in per]) for k in per[0]}


def new_stats(task, users_of, n_users, preds_by_method, golds, samples, seed, block_users=None):
    boot = UserBootstrap(n_users, samples, seed, block_users)
    scores = {m: query_scores(task, p, golds) for m, p in preds_by_method.items()}
    return method_stats(task, boot, blocks_in_memory(task, boot, users_of, scores))


def test_user_index_sorts_users():
    users_of, n = user_index(["b", "a", "b", "c", "b", "a"])
    assert n == 3 and users_of.tolist() == [1, 0, 1, 2, 1, 0]


@pytest.mark.parametrize("block_users", [None, 7])
def test_every_resample_draws_n_users_with_replacement_seeded_per_block(block_users):
    n, B = 50, 4000
    boot = UserBootstrap(n, B, seed=3, block_users=block_users)
    w = np.concatenate([boot.weights(j) for j in range(boot.n_blocks)])   # (users, resamples)
    assert w.shape == (n, B) and np.all(w.sum(axis=0) == n)                # n users per resample
    assert np.all(w == np.round(w)) and w.min() >= 0
    assert w.mean() == pytest.approx(1.0)                                  # multinomial(n, 1/n): mean 1,
    assert w.var(axis=1).mean() == pytest.approx(1 - 1 / n, rel=0.08)     # variance 1 - 1/n,
    c = np.corrcoef(w)[np.triu_indices(n, 1)].mean()                       # correlation -1/(n-1)
    assert c == pytest.approx(-1 / (n - 1), abs=0.01)
    again = UserBootstrap(n, B, seed=3, block_users=block_users)
    assert all(np.array_equal(boot.weights(j), again.weights(j)) for j in range(boot.n_blocks))


def _users(n_users, rng):
    per_user = rng.integers(1, 4, n_users)   # 1..3 queries per user, as LaMP users with held-out items
    return np.repeat(np.arange(n_users), per_user)


def _assert_same_interval(new, ref):
    width = ref[1] - ref[0]
    assert abs(new[0] - ref[0]) < 0.12 * width and abs(new[1] - ref[1]) < 0.12 * width, (new, ref)


def test_classification_accuracy_and_macro_f1_match_rescoring_every_resample():
    task = get_task("lamp2")
    rng = np.random.default_rng(0)
    users_of = _users(150, rng)
    labels = list(task.labels[:5])
    golds = [labels[i] for i in rng.integers(0, 5, len(users_of))]
    good = [g if rng.random() < 0.7 else labels[rng.integers(0, 5)] for g in golds]
    bad = [g if rng.random() < 0.3 else ("nonsense" if rng.random() < 0.3 else labels[rng.integers(0, 5)])
           for g in golds]
    stats = new_stats(task, users_of, 150, {"good": good, "bad": bad}, golds, 3000, seed=1, block_users=32)
    ref = {m: reference_draws(task, p, golds, reference_resamples(users_of, 150, 3000, seed=2))
           for m, p in (("good", good), ("bad", bad))}
    for m, p in (("good", good), ("bad", bad)):
        assert stats.point[m] == pytest.approx(score(task, p, golds))
        assert stats.n[m] == len(golds)
        for k in ("accuracy", "f1"):
            _assert_same_interval(stats.ci95(m)[k], interval95(ref[m][k]))
    t = stats.paired("good", "bad")
    r = paired(ref["good"]["accuracy"], ref["bad"]["accuracy"], stats.point["good"]["accuracy"],
               stats.point["bad"]["accuracy"], True)
    assert t["metric"] == "accuracy" and t["advantage"] == pytest.approx(r["advantage"])
    _assert_same_interval(t["ci95"], r["ci95"])
    assert t["p_not_better"] == 0 == r["p_not_better"]


def test_rmse_and_rouge_match_rescoring_every_resample():
    rng = np.random.default_rng(1)
    users_of = _users(120, rng)
    task = get_task("lamp3")
    golds = [str(g) for g in rng.integers(1, 6, len(users_of))]
    preds = [str(min(5, max(1, int(g) + rng.integers(-1, 2)))) if rng.random() < 0.9 else "?" for g in golds]
    stats = new_stats(task, users_of, 120, {"m": preds}, golds, 3000, seed=5)
    ref = reference_draws(task, preds, golds, reference_resamples(users_of, 120, 3000, seed=6))
    assert stats.point["m"] == pytest.approx(score(task, preds, golds))
    for k in ("mae", "rmse"):
        _assert_same_interval(stats.ci95("m")[k], interval95(ref[k]))
    task = get_task("lamp5")
    words = "neural networks learn fast models of language data for users".split()
    golds = [" ".join(rng.choice(words, 5)) for _ in users_of]
    preds = [" ".join(rng.choice(words, 4)) for _ in users_of]
    stats = new_stats(task, users_of, 120, {"m": preds}, golds, 2000, seed=7, block_users=16)
    r1 = query_scores(task, preds, golds)["rouge1"]   # the former code averaged these per resample
    ref = np.array([r1[idx].mean() for idx in reference_resamples(users_of, 120, 2000, seed=8)])
    assert stats.point["m"]["rouge1"] == pytest.approx(score(task, preds, golds)["rouge1"])
    _assert_same_interval(stats.ci95("m")["rouge1"], interval95(ref))


def test_interval_and_paired_test_on_known_answers():
    task = get_task("lamp1")
    rng = np.random.default_rng(0)
    users_of = np.repeat(np.arange(200), 2)
    golds = ["[1]"] * 400
    good = ["[1]" if x else "[2]" for x in rng.random(400) < 0.8]     # right 80% of the time
    bad = ["[1]" if x else "[2]" for x in rng.random(400) < 0.3]
    s = new_stats(task, users_of, 200, {"good": good, "bad": bad}, golds, 400, seed=1)
    lo, hi = s.ci95("good")["accuracy"]
    acc = s.point["good"]["accuracy"]
    assert lo < acc < hi and hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.8 * 0.2 / 400), rel=0.35)
    t = s.paired("good", "bad")
    assert t["advantage"] == pytest.approx(acc - s.point["bad"]["accuracy"]) and t["ci95"][0] > 0
    assert t["p_not_better"] == 0
    same = s.paired("good", "good")
    assert same["advantage"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_not_better"] == 1.0
    flipped = paired(s.draws["bad"]["accuracy"], s.draws["good"]["accuracy"], 0.3, 0.8, higher_is_better=False)
    assert flipped["advantage"] > 0 and flipped["p_not_better"] == 0   # lower is better: bad wins
