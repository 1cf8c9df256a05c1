"""The sharded adapter store: round trips, atomic shards, resumability."""

import pytest
import torch

from mta_ray.core.lora import LoraPair
from mta_ray.files.store import AdapterStore, pack


def _lora(seed):
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.q_proj": LoraPair(torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)),
            "layers.0.v_proj": LoraPair(torch.randn(4, 8, generator=g), torch.randn(3, 4, generator=g))}


def test_round_trip_in_bf16_and_index_rows(tmp_path):
    store = AdapterStore(tmp_path / "s", shard_users=2)
    for i in range(5):
        store.add(f"user{i}", _lora(i), ["anchor-0001", "anchor-0002"], [0.6, 0.4], steps=3, final_loss=0.5)
    store.add("bad", None, [], [], steps=1, final_loss=float("nan"), status="failed", error="non-finite loss")
    store.flush()
    rows = AdapterStore(tmp_path / "s").rows_by_user()
    assert sorted(rows) == ["bad", "user0", "user1", "user2", "user3", "user4"]
    assert len(list((tmp_path / "s").glob("shard-*.safetensors"))) == 3   # a few shards, not a file per user
    back = AdapterStore(tmp_path / "s").load(rows["user3"])
    for name, pair in _lora(3).items():
        assert torch.allclose(back[name].A, pair.A, rtol=1e-2, atol=1e-2)     # stored in bf16
        assert torch.allclose(back[name].B, pair.B, rtol=1e-2, atol=1e-2)
    assert rows["user3"]["anchors"] == ["anchor-0001", "anchor-0002"]
    assert rows["user3"]["weights"] == pytest.approx([0.6, 0.4])
    assert rows["bad"]["status"] == "failed" and AdapterStore(tmp_path / "s").load(rows["bad"]) is None
    # offsets point at the user's bytes inside the shard
    r = rows["user1"]
    data = (tmp_path / "s" / r["shard"]).read_bytes()[r["offset"]:r["offset"] + 2 * r["numel"]]
    vec = torch.frombuffer(bytearray(data), dtype=torch.bfloat16)
    assert torch.allclose(vec[:32].float(), _lora(1)["layers.0.q_proj"].A.reshape(-1).to(torch.bfloat16).float())


def test_a_packed_adapter_is_stored_as_the_adapter_itself(tmp_path):
    """Workers pack adapters before returning them: the store keeps the same bytes either way."""
    a, b = AdapterStore(tmp_path / "a"), AdapterStore(tmp_path / "b")
    a.add("u", _lora(7), [], [], steps=1, final_loss=0.1)
    b.add("u", pack(_lora(7)), [], [], steps=1, final_loss=0.1)
    a.flush(), b.flush()
    got_a, got_b = a.load(a.rows_by_user()["u"]), b.load(b.rows_by_user()["u"])
    for name in _lora(7):
        assert torch.equal(got_a[name].A, got_b[name].A) and torch.equal(got_a[name].B, got_b[name].B)
    with pytest.raises(ValueError, match="layout"):
        b.add("v", pack({"layers.0.q_proj": _lora(8)["layers.0.q_proj"]}), [], [], steps=1, final_loss=0.1)


def test_unflushed_users_are_not_stored_and_orphan_shards_are_skipped(tmp_path):
    store = AdapterStore(tmp_path, shard_users=10)
    store.add("a", _lora(0), [], [], 1, 0.1)
    store.flush()
    store.add("b", _lora(1), [], [], 1, 0.1)        # the process dies before flushing "b"
    (tmp_path / "shard-00001.safetensors").write_bytes(b"orphan shard of a killed run (no index)")
    again = AdapterStore(tmp_path, shard_users=10)
    assert again.stored_users() == {"a"}
    again.add("b", _lora(1), [], [], 1, 0.1)
    again.flush()
    assert sorted(AdapterStore(tmp_path).index().column("user_id").to_pylist()) == ["a", "b"]
    assert (tmp_path / "index-00002.parquet").is_file()   # numbering skips the orphan


def test_layout_mismatch_is_refused(tmp_path):
    store = AdapterStore(tmp_path)
    store.add("a", _lora(0), [], [], 1, 0.1)
    other = {"x": LoraPair(torch.zeros(2, 2), torch.zeros(2, 2))}
    with pytest.raises(ValueError, match="layout"):
        store.add("b", other, [], [], 1, 0.1)


def test_int8_store_writes_int8_and_reads_back_what_int8_storage_returns(tmp_path):
    """``adapt.storage_precision: int8``: the shard holds int8 values plus one bf16 scale per rank component
    (the bytes the cost tables count), and every reader gets exactly :func:`quant.roundtrip`'s adapter."""
    from safetensors import safe_open

    from mta_ray.core.quant import roundtrip, stored_bytes
    from mta_ray.files.precision import adapter_size

    store = AdapterStore(tmp_path / "s", shard_users=2, precision="int8")
    for i in range(3):
        store.add(f"u{i}", _lora(i) if i != 1 else pack(_lora(i), "int8"), ["a0"], [1.0], steps=1, final_loss=0.1)
    store.flush()
    again = AdapterStore(tmp_path / "s")
    rows = again.rows_by_user()
    for i in range(3):
        got, want = again.load(rows[f"u{i}"]), roundtrip(_lora(i), "int8")
        for name in want:
            assert torch.equal(got[name].A, want[name].A) and torch.equal(got[name].B, want[name].B)
    params, components = 4 * 8 + 6 * 4 + 4 * 8 + 3 * 4, 4 + 4
    assert adapter_size(tmp_path / "s") == {"params": params, "components": components, "precision": "int8",
                                            "bytes": stored_bytes(params, components, "int8")}
    r = rows["u2"]
    with safe_open(str(tmp_path / "s" / r["shard"]), framework="pt") as f:
        values, scales = f.get_tensor(r["key"]), f.get_tensor(r["key"] + ".scale")
    assert values.dtype == torch.int8 and scales.dtype == torch.bfloat16 and r["numel"] == params
    assert values.numel() + 2 * scales.numel() == stored_bytes(params, components, "int8")   # half of bf16's
    with pytest.raises(ValueError, match="bfloat16"):   # one precision per store
        again.add("v", pack(_lora(5)), [], [], steps=1, final_loss=0.1)


def test_a_damaged_int8_scale_is_caught_by_the_checksum(tmp_path):
    from mta_ray.errors import InputError

    store = AdapterStore(tmp_path, precision="int8")
    store.add("u", _lora(0), [], [], steps=1, final_loss=0.1)
    store.flush()
    row = AdapterStore(tmp_path).rows_by_user()["u"]
    from mta_ray.files.store import _data_offsets

    shard = tmp_path / row["shard"]
    start, _ = _data_offsets(shard)[row["key"] + ".scale"]
    data = bytearray(shard.read_bytes())
    data[start + 1] ^= 0x40   # one scale's high byte: the values are intact
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum mismatch for user 'u'"):
        AdapterStore(tmp_path).load(row)
