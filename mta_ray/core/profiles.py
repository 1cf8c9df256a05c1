"""MTA profiles: the paper recipe and leaner ways to run MTA, as named overlays of dotted config keys.

One table, read by the study (quality on LaMP-2, ``study.profiles``), the scalability benchmark
(GPU-hours and storage, ``bench.systems``) and the README's profile table. A profile is a method of
:mod:`mta_ray.core.methods` plus the settings it changes; apply one to any run with its overrides, e.g.
``mta-ray run configs/lamp/lamp2.yaml adapt.target_modules=[q_proj,v_proj] adapt.rank=2 adapt.alpha=4``
(:func:`overrides` prints them). The stacked adapter's alpha stays 2 x rank (the paper's 8/4), so a
lower rank changes capacity, not the update's scale. Adapters are stored in bf16 (the store's format);
the ``-int8`` profiles measure int8 storage (:mod:`mta_ray.core.quant`; the store does not write it yet).

| profile           | method      | stacked adapter                   | epochs | what it saves                          |
| ----------------- | ----------- | --------------------------------- | -----: | -------------------------------------- |
| mta               | mta         | rank 4, all linear (paper)        | 3      | nothing: the paper recipe               |
| mta-qv            | mta         | rank 4, q/v                       | 3      | storage and some compute                |
| mta-attn-r2       | mta         | rank 2, q/k/v/o                   | 3      | storage                                |
| mta-r2            | mta         | rank 2, all linear                | 3      | half the storage                       |
| mta-e1            | mta         | rank 4, all linear                | 1      | two thirds of the training             |
| mta-qv-r2-e2      | mta         | rank 2, q/v                       | 2      | storage and a third of the training     |
| mta-qv-r2-e1      | mta         | rank 2, q/v                       | 1      | storage and two thirds of the training  |
| mta-int8          | mta         | the paper's, stored in int8       | 3      | half the storage (measured fidelity)    |
| mta-qv-r2-e2-int8 | mta         | rank 2, q/v, stored in int8       | 2      | the lean adapter at half its bytes      |
| mta-qv-r2-e1-int8 | mta         | rank 2, q/v, stored in int8       | 1      | the leanest trained profile             |
| mta-merged-only   | merged_only | none (training-free)              | 0      | all per-user training; stores K ids+weights |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

QV = ["q_proj", "v_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PRECISION = "adapt.storage_precision"
ANCHOR_RECORD_BYTES = 8
"""Per anchor a user's store row keeps: an anchor index (int32) and its weight (float32)."""


@dataclass(frozen=True)
class Profile:
    name: str
    """Starts with ``mta`` (the benchmark and the report name systems by it)."""
    method: str
    """``mta`` (stacked adapter on the merged anchors) or ``merged_only`` (no per-user training)."""
    values: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys the profile sets on top of the paper recipe."""
    summary: str = ""

    @property
    def trains(self) -> bool:
        return self.method != "merged_only"


def _stacked(rank: int, targets: list[str] | None = None, epochs: int | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {"adapt.rank": rank, "adapt.alpha": 2.0 * rank}
    if targets is not None:
        values["adapt.target_modules"] = list(targets)
    if epochs is not None:
        values["adapt.epochs"] = epochs
    return values


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("mta", "mta", {}, "the paper recipe: rank-4 stacked adapter on every linear layer, the task's epochs"),
    Profile("mta-qv", "mta", _stacked(4, QV), "stacked adapter on q/v only"),
    Profile("mta-attn-r2", "mta", _stacked(2, ATTENTION), "rank-2 stacked adapter on the attention projections"),
    Profile("mta-r2", "mta", _stacked(2), "rank-2 stacked adapter on every linear layer"),
    Profile("mta-e1", "mta", {"adapt.epochs": 1}, "the paper's adapter, one epoch (the merged start converges faster)"),
    Profile("mta-qv-r2-e2", "mta", _stacked(2, QV, 2), "rank 2 on q/v, two epochs"),
    Profile("mta-qv-r2-e1", "mta", _stacked(2, QV, 1), "rank 2 on q/v, one epoch: the leanest trained profile"),
    Profile("mta-int8", "mta", {"adapt.storage_precision": "int8"},
            "the paper recipe stored in int8 (one scale per rank component): half the bytes"),
    Profile("mta-qv-r2-e2-int8", "mta", {**_stacked(2, QV, 2), "adapt.storage_precision": "int8"},
            "rank 2 on q/v, two epochs, stored in int8"),
    Profile("mta-qv-r2-e1-int8", "mta", {**_stacked(2, QV, 1), "adapt.storage_precision": "int8"},
            "rank 2 on q/v, one epoch, stored in int8: the leanest trained profile"),
    Profile("mta-merged-only", "merged_only", {}, "training-free: the merged top-K anchors only; stores K ids+weights"),
)}
PAPER = "mta"
"""The paper recipe: every other profile is compared against it."""
LEAN: tuple[str, ...] = tuple(n for n in PROFILES if n != PAPER)


def profile(name: str) -> Profile:
    """The profile called ``name``; KeyError lists the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None


def bf16_twin(name: str) -> str | None:
    """The profile that trains exactly like ``name`` but stores bf16 (``name`` itself when it stores bf16)."""
    values = {k: v for k, v in profile(name).values.items() if k != PRECISION}
    if values == profile(name).values:
        return name
    return next((n for n, p in PROFILES.items() if p.values == values and p.method == profile(name).method), None)


def overrides(name: str) -> list[str]:
    """``key=value`` overrides that apply profile ``name`` on the command line."""
    def text(v: Any) -> str:
        return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)
    return [f"{k}={text(v)}" for k, v in profile(name).values.items()]
