"""Round a stored set of adapters through another storage precision (the study's int8 fidelity runs).

The adapter store keeps bf16 vectors (:mod:`mta_ray.files.store`). To measure what int8 storage would
change in the outputs, the study trains as usual, then rewrites every shard with each user's adapter as
it reads back from int8 (:func:`mta_ray.core.quant.roundtrip`), still in the store's bf16 format, before
evaluating. Each shard, then its index (new checksums), is replaced atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from mta_ray.core.quant import roundtrip, stored_bytes
from mta_ray.files.store import AdapterStore, flatten, unflatten


def roundtrip_store(path: str | Path, precision: str) -> int:
    """Rewrite the store at ``path`` with every adapter as ``precision`` storage returns it; users rewritten."""
    path = Path(path)
    layout_file = path / "layout.json"
    if not layout_file.is_file():
        return 0
    layout = json.loads(layout_file.read_text())
    return AdapterStore(path).rewrite(lambda vec: flatten(roundtrip(unflatten(vec, layout), precision)))


def adapter_size(path: str | Path, precision: str) -> dict[str, int]:
    """Per user of the store at ``path``: adapter values, rank components, and their bytes in ``precision``."""
    layout = json.loads((Path(path) / "layout.json").read_text())
    params = sum(a[0] * a[1] + b[0] * b[1] for _, a, b in layout)
    components = sum(a[0] for _, a, _ in layout)
    return {"params": params, "components": components, "bytes": stored_bytes(params, components, precision)}
