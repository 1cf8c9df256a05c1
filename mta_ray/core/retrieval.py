"""BM25 retrieval over one user's own history (bm25s), deterministic and leave-one-out."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

# bm25s imports JAX when it is installed, and JAX grabs 75% of every GPU it sees in each process
# that imports it (the driver, every Ray worker). BM25 needs no GPU: keep JAX on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _bm25s() -> Any:
    """bm25s, imported on first use: the task table imports this module, and training never ranks (a
    GPU machine that only trains or benchmarks needs no bm25s)."""
    import bm25s

    return bm25s


def _tokens(texts: list[str]) -> list[list[str]]:
    return _bm25s().tokenize(texts, stopwords="en", show_progress=False, return_ids=False)


class HistoryIndex:
    """A BM25 index of one user's history items; ranks them against a query text."""

    def __init__(self, docs: list[str]):
        self.size = len(docs)
        self._retriever = None
        if self.size:
            bm25s = _bm25s()
            corpus = bm25s.tokenize(docs, stopwords="en", show_progress=False)
            self._vocab = corpus.vocab
            if any(w for w in self._vocab):  # only stopwords / symbols: nothing to index, all scores 0
                self._retriever = bm25s.BM25()
                self._retriever.index(corpus, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        if self._retriever is None:
            return np.zeros(self.size)
        words = [w for w in _tokens([query])[0] if w in self._vocab]
        if not words:
            return np.zeros(self.size)
        return np.asarray(self._retriever.get_scores(words), dtype=np.float64)

    def top_k(self, query: str, k: int, exclude: int | None = None) -> list[int]:
        """Indices of the k best items, best first; ties go to the earlier item.

        ``exclude`` drops one index (leave-one-out: a history item never retrieves itself).
        """
        if k <= 0 or not self.size:
            return []
        scores = self.scores(query)
        order = sorted(range(self.size), key=lambda i: (-scores[i], i))
        return [i for i in order if i != exclude][:k]
