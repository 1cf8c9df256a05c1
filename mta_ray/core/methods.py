"""The method table: what each evaluated method trains, merges, retrieves and stores.

Every list of methods in the package is read from :data:`METHODS` (the config's choices, the
CLI's ``--kind``, which stores evaluate needs, what the study varies, the report's order).

| method      | trains                               | merges anchors | prompt's BM25 items | stores per user          |
| ----------- | ------------------------------------ | -------------- | ------------------- | ------------------------ |
| base        | nothing                              | no             | ``data.history_k``  | nothing                  |
| rag_k1/3/5  | nothing                              | no             | 1 / 3 / 5           | nothing                  |
| oppu        | a LoRA from scratch (``oppu:``)      | no             | ``data.history_k``  | the OPPU LoRA            |
| adapt_only  | stacked adapter on the bare base     | no             | ``data.history_k``  | the stacked adapter      |
| merged_only | nothing                              | yes (frozen)   | ``data.history_k``  | anchor ids and weights   |
| mta         | stacked adapter on the merged anchors| yes (frozen)   | ``data.history_k``  | stacked adapter + anchors|
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Training = Literal["none", "stacked_on_merged", "stacked_on_base", "oppu_lora"]


@dataclass(frozen=True)
class Method:
    name: str
    trains: Training
    """What is trained per user: nothing, the stacked adapter (on the merged anchors or on the bare
    base), or OPPU's LoRA from scratch."""
    merges: bool
    """Uses the user's merged top-K anchor LoRAs (a frozen branch)."""
    rag_k: Optional[int] = None
    """History items BM25 puts in the prompt; None = ``data.history_k``."""

    @property
    def trained(self) -> bool:
        """Has per-user adapters, trained by ``personalize --kind <name>`` into ``adapters/<name>``."""
        return self.trains != "none"

    @property
    def recipe(self) -> Optional[str]:
        """The config section holding its per-user training recipe (``adapt`` or ``oppu``), if it trains."""
        return {"none": None, "oppu_lora": "oppu"}.get(self.trains, "adapt")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("base", "none", merges=False),
    Method("rag_k1", "none", merges=False, rag_k=1),
    Method("rag_k3", "none", merges=False, rag_k=3),
    Method("rag_k5", "none", merges=False, rag_k=5),
    Method("oppu", "oppu_lora", merges=False),
    Method("adapt_only", "stacked_on_base", merges=False),
    Method("merged_only", "none", merges=True),
    Method("mta", "stacked_on_merged", merges=True),
)}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
PROPOSED = "mta"
"""The method every other one is compared against."""
BASELINES: tuple[str, ...] = tuple(n for n in METHODS if n != PROPOSED)
TRAINED: tuple[str, ...] = (PROPOSED,) + tuple(n for n, m in METHODS.items() if m.trained and n != PROPOSED)
"""Methods with per-user adapters, MTA first (the order ``run`` personalises them in)."""
RAG: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.rag_k is not None)
MERGING: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.merges)
"""Methods that merge anchors (the ones bank, merge-space, top-K and alpha studies vary)."""
ABLATIONS: tuple[str, ...] = ("merged_only", "adapt_only")
"""MTA with one of its two stages removed: the merge alone, the stacked adapter on the bare base."""
AROUND_MTA: tuple[str, ...] = (ABLATIONS[0], PROPOSED, ABLATIONS[1])
"""MTA between its two ablations (the bank-size curve's methods, in the order plots show them)."""
PER_USER_BASELINES: tuple[str, ...] = ("oppu", "adapt_only")
"""Trained per-user baselines without the bank: what a leaner MTA profile is compared with."""


def method(name: str) -> Method:
    """The method called ``name``; KeyError lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}") from None
