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
