"""The bytes one user's adapter takes in a store, at the store's precision (the study's storage column).

``adapt.storage_precision: int8`` stores int8 values with one bf16 scale per rank component
(:mod:`mta_ray.files.store`, :mod:`mta_ray.core.quant`); the study reports these bytes next to the
accuracy, and the int8 profiles' answers against their bf16 twins'.
"""

from __future__ import annotations

from pathlib import Path

from mta_ray.core.quant import stored_bytes
from mta_ray.files.store import read_layout


def adapter_size(path: str | Path) -> dict:
    """Per user of the store at ``path``: adapter values, rank components, their bytes, and the precision."""
    layout, precision = read_layout(Path(path))
    if layout is None:
        return {}
    params = sum(a[0] * a[1] + b[0] * b[1] for _, a, b in layout)
    components = sum(a[0] for _, a, _ in layout)
    return {"params": params, "components": components, "bytes": stored_bytes(params, components, precision),
            "precision": precision}
