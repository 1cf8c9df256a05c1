import numpy as np
import pytest

from mta_ray.core.adaptive import merge_weights, top_k_anchors


def test_most_similar_anchor_gets_the_largest_weight():
    # the public reference code swaps the two weights; we must not
    w = merge_weights([0.9, 0.3], 1e-6)
    assert w == pytest.approx([0.75, 0.25]) and w[0] > w[1]


def test_weights_are_normalised_and_clamped():
    w = merge_weights([0.5, -0.2, 0.0], 1e-6)
    assert sum(w) == pytest.approx(1.0) and all(x > 0 for x in w)
    assert w[0] == pytest.approx(1.0, abs=1e-5)


def test_fixed_alpha_for_studies():
    assert merge_weights([0.9, 0.3, 0.2], 1e-6, fixed_alpha=0.5) == pytest.approx([0.5, 0.25, 0.25])
    assert merge_weights([0.9], 1e-6, fixed_alpha=0.25) == [1.0]


def test_top_k_by_cosine_best_first():
    anchors = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    idx, sims = top_k_anchors(np.array([2.0, 0.2]), anchors, 3)
    assert idx == [0, 2, 1]
    assert sims[0] == pytest.approx(0.995, abs=1e-3) and sims == sorted(sims, reverse=True)


def test_anchor_ties_go_to_the_member_nearest_the_centroid_then_to_the_smallest_id():
    import numpy as np

    from mta_ray.stages.cluster import pick_anchors

    x = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [5.0, 5.0], [7.0, 5.0]])
    labels = np.array([0, 0, 0, 1, 1])
    ids = ["c", "b", "a", "e", "d"]
    # cluster 0: all tied on activity; "b" sits on the centroid. cluster 1: equidistant -> smallest id "d".
    got = pick_anchors(ids, [10, 10, 10, 10, 10], labels, min_items=5, x=x)
    assert [a["user_id"] for a in got] == ["b", "d"]
    # activity still comes first
    got = pick_anchors(ids, [10, 9, 10, 3, 4], labels, min_items=4, x=x)
    assert [a["user_id"] for a in got] == ["a", "d"]
    # too few items: no anchor for that cluster
    assert [a["user_id"] for a in pick_anchors(ids, [10, 9, 10, 3, 3], labels, 4, x)] == ["a"]
