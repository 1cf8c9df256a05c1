"""The throughput benchmark runs end to end at a debug size (CPU) and reports both systems."""

import json
from pathlib import Path

from mta_ray.bench import device_peak
from mta_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_throughput_debug_size(tmp_path, capsys):
    code = main(["bench", "throughput", str(ROOT / "configs/bench/throughput-8b.yaml"), "--out", str(tmp_path),
                 "bench.shape=tiny", "bench.users=6", "bench.baseline_users=2", "bench.prompt_tokens=24",
                 "bench.history_items=3", "bench.variants=[2, 3f]"])
    assert code == 0
    (path,) = tmp_path.glob("throughput-tiny-*.json")
    result = json.loads(path.read_text())
    base = result["baseline_peft_one_at_a_time"]
    assert base["users"] == 2 and base["users_per_hour"] > 0 and len(base["final_losses"]) == 2
    variants = {v["variant"]: v for v in result["multi_slot"]}
    assert set(variants) == {"2", "3f"}
    for v in variants.values():
        assert v["users"] == 6 and v["failed_users"] == 0 and v["tokens_per_s"] > 0   # users >= 2 x slots
    # the same users train to the same losses with or without fused kernels
    assert abs(variants["2"]["mean_final_loss"] - variants["3f"]["mean_final_loss"]) < 1e-3
    assert result["speedup_users_per_hour"] > 0 and result["settings"]["train"]["rank"] == 4
    assert (tmp_path / "bench.config.yaml").is_file()


def test_device_peaks():
    assert device_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak("NVIDIA H100 PCIe") == 756e12
    assert device_peak("NVIDIA H200") == 989e12
    assert device_peak("some cpu") is None


def test_scalability_is_not_built_yet(capsys):
    assert main(["bench", "scalability", str(ROOT / "configs/bench/throughput-8b.yaml")]) == 3
    assert "not built yet" in capsys.readouterr().err
