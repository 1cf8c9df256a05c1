"""The allowed range of every numeric setting of :mod:`mta_ray.config` and the known values of named text
settings, checked when a config is built (a NaN learning rate or zero clusters fail before any work)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from mta_ray.core.tasks import TASKS
from mta_ray.errors import InputError

Range = tuple[float, float, bool, bool]
"""(low, high, low included, high included) of a numeric setting."""
AT_LEAST_0: Range = (0, math.inf, True, False)
AT_LEAST_1: Range = (1, math.inf, True, False)
POSITIVE: Range = (0, math.inf, False, False)
UNIT: Range = (0, 1, True, True)
UNIT_OPEN: Range = (0, 1, True, False)

RANGES: dict[str, Range] = {
    "SyntheticConfig.num_users": AT_LEAST_1, "SyntheticConfig.num_personas": AT_LEAST_1,
    "SyntheticConfig.min_items": AT_LEAST_1, "SyntheticConfig.max_items": AT_LEAST_1,
    "SyntheticConfig.active_users_per_persona": AT_LEAST_0, "SyntheticConfig.active_items": AT_LEAST_1,
    "SyntheticConfig.queries_per_user": AT_LEAST_1, "SyntheticConfig.seed": AT_LEAST_0,
    "DataConfig.max_users": AT_LEAST_0, "DataConfig.history_k": AT_LEAST_0,
    "ModelConfig.max_prompt_tokens": (16, math.inf, True, False),
    "EmbedConfig.batch_size": AT_LEAST_1, "EmbedConfig.concurrency": AT_LEAST_1,
    "EmbedConfig.max_seq_length": AT_LEAST_1,
    "LoraTrainConfig.rank": AT_LEAST_1, "LoraTrainConfig.alpha": POSITIVE, "LoraTrainConfig.dropout": UNIT_OPEN,
    "LoraTrainConfig.lr": POSITIVE, "LoraTrainConfig.epochs": AT_LEAST_1, "LoraTrainConfig.batch_size": AT_LEAST_1,
    "LoraTrainConfig.grad_accum": AT_LEAST_1, "LoraTrainConfig.warmup_ratio": UNIT_OPEN,
    "LoraTrainConfig.max_grad_norm": AT_LEAST_0, "LoraTrainConfig.weight_decay": AT_LEAST_0,
    "DeepSpeedConfig.workers": AT_LEAST_1,
    "BankConfig.num_clusters": AT_LEAST_1, "BankConfig.min_items": AT_LEAST_1,
    "BankConfig.minibatch_kmeans_above": AT_LEAST_0,
    "MergeConfig.top_k": AT_LEAST_1, "MergeConfig.min_similarity": (0, 1, False, True),
    "MergeConfig.fixed_alpha": UNIT,
    "AdaptConfig.slots": AT_LEAST_1, "AdaptConfig.max_rows": AT_LEAST_0, "AdaptConfig.shard_users": AT_LEAST_1,
    "EvalConfig.max_new_tokens": AT_LEAST_0, "EvalConfig.batch_size": AT_LEAST_1,
    "EvalConfig.bootstrap": AT_LEAST_1, "EvalConfig.users_per_batch": AT_LEAST_1,
    "RayConfig.num_cpus": AT_LEAST_0, "RayConfig.actors": AT_LEAST_0, "RayConfig.gpus_per_actor": POSITIVE,
    "RayConfig.gpu_memory_gib": AT_LEAST_0,
    "BenchConfig.users": AT_LEAST_1, "BenchConfig.baseline_users": AT_LEAST_1,
    "BenchConfig.prompt_tokens": (2, math.inf, True, False), "BenchConfig.target_tokens": AT_LEAST_1,
    "BenchConfig.history_items": AT_LEAST_1, "BenchConfig.anchors": AT_LEAST_1,
    "BenchConfig.memory_budget_gib": POSITIVE, "BenchConfig.scalability_users": AT_LEAST_1,
    "BenchConfig.memory_users": AT_LEAST_1, "BenchConfig.gpu_counts": AT_LEAST_1,
    "BenchConfig.evaluate_queries": AT_LEAST_1, "BenchConfig.evaluate_methods": AT_LEAST_1,
    "BenchConfig.evaluate_queries_per_user": AT_LEAST_1, "BenchConfig.bank_users": AT_LEAST_0,
    "BenchConfig.prompt_lengths": AT_LEAST_1, "StudyConfig.bank_folds": (2, math.inf, True, False),
    "ExportConfig.users_per_batch": AT_LEAST_1,
    "StudyConfig.folds": (2, math.inf, True, False), "StudyConfig.validation_items": AT_LEAST_1,
    "StudyConfig.extended_items": AT_LEAST_1, "StudyConfig.bank_lrs": POSITIVE, "StudyConfig.top_k": AT_LEAST_1,
    "StudyConfig.alphas": UNIT, "StudyConfig.ranks": AT_LEAST_1, "StudyConfig.adapt_lrs": POSITIVE,
    "StudyConfig.oppu_lrs": POSITIVE,
    "Config.seed": AT_LEAST_0,
}
"""The allowed range of every numeric setting (and of each element of a numeric list), by the class that
declares it; ``tests/test_config.py`` checks that no numeric field is missing. Every float must also be
finite (NaN passes ``lr <= 0``)."""

CHOICES: dict[str, Callable[[], list[str]]] = {
    "DataConfig.task": lambda: list(TASKS),
}
"""Text settings that name one of a known set (enums that are not ``Literal`` types)."""


def declared(cls: type, name: str, table: dict) -> Any:
    for klass in cls.__mro__:
        if f"{klass.__name__}.{name}" in table:
            return table[f"{klass.__name__}.{name}"]
    return None


def _describe(r: Range) -> str:
    lo, hi, lo_in, hi_in = r
    num = lambda x: f"{x:g}"  # noqa: E731
    if hi == math.inf:
        return f"at least {num(lo)}" if lo_in else f"greater than {num(lo)}"
    return f"in {'[' if lo_in else '('}{num(lo)}, {num(hi)}{']' if hi_in else ')'}"


def check_ranges(obj: Any, where: str, prefix: str = "") -> None:
    """Every numeric field of ``obj`` finite and inside its :data:`RANGES`; named text fields in :data:`CHOICES`."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        allowed = declared(type(obj), f.name, CHOICES)
        if allowed is not None and value not in list(allowed()):
            raise InputError(where, f"{key} must be one of {list(allowed())}, got {value!r}")
        values = value if isinstance(value, list) else [value]
        r = declared(type(obj), f.name, RANGES)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                raise InputError(where, f"{key} must be a finite number, got {v}")
            if r is not None:
                lo, hi, lo_in, hi_in = r
                if not ((v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)):
                    raise InputError(where, f"{key} must be {_describe(r)}, got {v:g}")
