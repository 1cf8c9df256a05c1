"""Stage 2 math: top-K anchors by cosine similarity and similarity-normalised merge weights."""

from __future__ import annotations

import numpy as np


def top_k_anchors(user_emb: np.ndarray, anchor_embs: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """Indices and cosine similarities of the k most similar anchors, best first (ties: lower index)."""
    u = user_emb / max(np.linalg.norm(user_emb), 1e-12)
    a = anchor_embs / np.maximum(np.linalg.norm(anchor_embs, axis=1, keepdims=True), 1e-12)
    sims = a @ u
    order = sorted(range(len(sims)), key=lambda i: (-sims[i], i))[:k]
    return order, [float(sims[i]) for i in order]


def merge_weights(sims: list[float], min_similarity: float, fixed_alpha: float | None = None) -> list[float]:
    """alpha_i = sim_i / sum_j sim_j over the kept anchors; the best match gets the largest weight.

    Similarities are clamped at ``min_similarity`` so weights stay positive and finite
    (an anchor with zero or negative similarity gets a tiny weight instead of a
    negative one). ``fixed_alpha`` (studies only) gives the best anchor alpha and
    splits 1 - alpha evenly over the rest.
    """
    if not sims:
        return []
    if fixed_alpha is not None:
        if len(sims) == 1:
            return [1.0]
        return [fixed_alpha] + [(1 - fixed_alpha) / (len(sims) - 1)] * (len(sims) - 1)
    clamped = [max(s, min_similarity) for s in sims]
    total = sum(clamped)
    return [s / total for s in clamped]


class AnchorRetriever:
    """A user's retrieval embedding -> its top-K anchor ids and merge weights, over a bank's anchors."""

    def __init__(self, anchor_ids: list[str], anchor_embs: np.ndarray, top_k: int, min_similarity: float,
                 fixed_alpha: float | None = None):
        if not anchor_ids:
            raise ValueError("a retriever needs at least one anchor")
        self.ids = list(anchor_ids)
        self.embs = np.asarray(anchor_embs, dtype=np.float32)                 # (V, d)
        self.top_k, self.min_similarity, self.fixed_alpha = top_k, min_similarity, fixed_alpha

    def __call__(self, user_emb) -> tuple[list[str], list[float]]:
        idx, sims = top_k_anchors(np.asarray(user_emb, dtype=np.float32), self.embs, self.top_k)
        return [self.ids[i] for i in idx], merge_weights(sims, self.min_similarity, self.fixed_alpha)
