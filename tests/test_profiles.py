"""MTA profiles: the table is valid config, runs are named consistently, the fixed-settings study and its report."""

from __future__ import annotations

import json

import pytest

from mta_ray.config import load_config, with_values
from mta_ray.core.profiles import LEAN, PAPER, PROFILES, overrides, profile
from mta_ray.errors import InputError
from mta_ray.study.driver import fixed_choice, make_run, profile_run

CHOICE = {"bank.anchor_data": "cluster", "bank.lr": 1e-4, "merge.space": "params", "merge.top_k": 2,
          "merge.fixed_alpha": 0.25, "adapt.lr": 1e-4, "adapt.rank": 4, "adapt.alpha": 8.0, "oppu.lr": 2e-3}


def test_every_profile_is_valid_config_and_named_for_the_benchmark():
    cfg = load_config("configs/study/lamp2-profiles.yaml")
    assert PAPER in PROFILES and PAPER not in LEAN and PROFILES[PAPER].values == {}
    for name, p in PROFILES.items():
        assert name.startswith("mta") and p.method in ("mta", "merged_only") and p.summary
        changed = with_values(cfg, p.values)                       # every key exists and validates
        assert load_config("configs/study/lamp2-profiles.yaml", overrides(name)) == changed
        assert changed.adapt.alpha == 2 * changed.adapt.rank          # the update's scale stays the paper's
    assert not PROFILES["mta-merged-only"].trains
    with pytest.raises(KeyError, match="known: mta"):
        profile("mta-r3")
    with pytest.raises(InputError, match="unknown profiles"):
        load_config(None, ["study.profiles=[mta-r3]"])
    with pytest.raises(InputError, match="unknown systems"):
        load_config(None, ["bench.systems=[peft]"])


def test_a_profile_run_is_the_same_run_wherever_it_is_made():
    cfg = load_config("configs/study/lamp2-profiles.yaml")
    assert profile_run("paper", "mta", CHOICE, cfg) == make_run("paper", "mta", CHOICE)
    assert profile_run("paper", "mta-merged-only", CHOICE, cfg) == make_run("paper", "merged_only", CHOICE)
    rank2 = make_run("paper", "mta", CHOICE, adapt__rank=2, adapt__alpha=4.0)   # the rank study's run
    assert profile_run("paper", "mta-r2", CHOICE, cfg) == rank2
    qv = profile_run("paper", "mta-qv-r2-e1", CHOICE, cfg)
    assert qv.config_values()["adapt.target_modules"] == ["q_proj", "v_proj"]
    assert qv.config_values()["adapt.epochs"] == 1 and "adapt.target_modules=[q_proj,v_proj]" in qv.name
    assert with_values(cfg, qv.config_values()).adapt.target_modules == ["q_proj", "v_proj"]
    assert len({qv, profile_run("paper", "mta-qv-r2-e1", CHOICE, cfg)}) == 1    # hashable, stable
    assert profile_run("extended", "mta-qv", CHOICE, cfg).key != profile_run("paper", "mta-qv", CHOICE, cfg).key
    # a profile value equal to the config's is not part of the name (so it equals the run made without it)
    same = with_values(cfg, {"adapt.epochs": 1})
    assert "adapt.epochs" not in profile_run("paper", "mta-e1", CHOICE, same).name


def test_fixed_settings_come_from_a_report_or_the_config(tmp_path):
    cfg = load_config("configs/study/lamp2-profiles.yaml", ["study.fixed_from="])
    chosen, ao = fixed_choice(cfg)
    assert chosen["adapt.lr"] == cfg.adapt.lr == ao["adapt.lr"] and chosen["merge.space"] == "params"
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"chosen_on_validation": CHOICE, "adapt_only_lr": 0.002}))
    chosen, ao = fixed_choice(with_values(cfg, {"study.fixed_from": str(tmp_path)}))
    assert chosen == CHOICE and ao == {**CHOICE, "adapt.lr": 0.002}
    committed, _ = fixed_choice(load_config("configs/study/lamp2-profiles.yaml"))   # results/lamp2/report.json
    assert committed["bank.anchor_data"] == "cluster"
    report.write_text(json.dumps({"chosen_on_validation": {**CHOICE, "merge.top_k": 0}, "adapt_only_lr": 0.002}))
    with pytest.raises(InputError, match="top_k"):
        fixed_choice(with_values(cfg, {"study.fixed_from": str(report)}))
    report.write_text("{}")
    with pytest.raises(InputError, match="not a study report"):
        fixed_choice(with_values(cfg, {"study.fixed_from": str(report)}))


@pytest.mark.slow
def test_fixed_study_runs_profiles_and_the_bank_size_curve(tiny_model_dir, tmp_path):
    """No search: the paper recipe, two profiles and every baseline on the paper protocol, the bank-size
    curve with 2 and 4 folds, and the report's profiles section and plot; a rerun trains nothing."""
    from mta_ray.cli import main
    from mta_ray.bench.scalability import quality_labels

    from tests.test_study import STUDY_SMALL

    out, rep = tmp_path / "work", tmp_path / "report"
    args = ["configs/study/lamp2-profiles.yaml", f"model.base={tiny_model_dir}", *STUDY_SMALL,
            "study.fixed_from=", "study.profiles=[mta-qv-r2-e1, mta-int8, mta-merged-only]", "study.bank_folds=[2, 4]",
            "--out", str(out), "--report", str(rep)]
    assert main(["study", *args]) == 0
    report = json.loads((rep / "report.json").read_text())
    assert report["selection"] == [] and set(report["protocols"]) == {"paper"}
    prof = json.loads((rep / "profiles.json").read_text())
    rows = prof["protocols"]["paper"]["systems"]
    assert set(rows) == {"mta", "mta-qv-r2-e1", "mta-int8", "mta-merged-only", "oppu", "adapt_only"}
    assert rows["mta-int8"]["precision"] == "int8" and 0 <= rows["mta-int8"]["fidelity"]["same_outputs"] <= 1
    assert rows["mta-int8"]["bytes_per_user"] < 0.6 * rows["mta"]["bytes_per_user"]
    # the store itself wrote int8 (its layout.json says so, and its files are smaller than the bf16 run's)
    assert rows["mta-int8"]["store_file_bytes_per_user"] < 0.75 * rows["mta"]["store_file_bytes_per_user"]
    assert 0 < rows["oppu"]["bytes_per_user"] < rows["oppu"]["store_file_bytes_per_user"]   # values < files
    assert rows["mta-merged-only"]["bytes_per_user"] == 2 * 8 and rows["mta-merged-only"]["train_s"] == 0
    # q/v rank 2 stores far less than rank 4 on every linear layer (measured from the store's files)
    assert 0 < rows["mta-qv-r2-e1"]["bytes_per_user"] < rows["mta"]["bytes_per_user"] / 4
    assert "vs_mta" not in rows["mta"] and rows["oppu"]["vs_mta"]["advantage"] == pytest.approx(
        rows["oppu"]["metrics"]["accuracy"] - rows["mta"]["metrics"]["accuracy"])
    assert isinstance(rows["mta-qv-r2-e1"]["not_below_paper"], bool)
    sizes = prof["bank_size"]
    assert [r["folds"] for r in sizes] == [2, 4] and [r["bank_users"] for r in sizes] == [4, 6]
    assert all(r["n_queries"] == 8 and set(r["methods"]) == {"merged_only", "mta", "adapt_only"} for r in sizes)
    assert (rep / "bank_size.png").is_file() and "## Quality against bank size" in (rep / "report.md").read_text()
    labels = quality_labels(str(rep))
    assert labels["oppu-multislot"] == labels["oppu"] and 0 <= labels["mta"]["value"] <= 1
    cached = sorted(p.name for p in out.rglob("preds/**/*.json"))
    assert main(["study", *args]) == 0                                  # resumes: everything is cached
    assert sorted(p.name for p in out.rglob("preds/**/*.json")) == cached
    assert main(["study", *args[:-4], "--out", str(out), "--report", str(rep), "--report-only"]) == 0
    import ray
    ray.shutdown()


def test_int8_storage_keeps_each_rank_component(tmp_path):
    import torch

    from mta_ray.core.lora import LoraPair, delta
    from mta_ray.core.profiles import bf16_twin
    from mta_ray.core.quant import roundtrip, stored_bytes

    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 64, generator=g) * torch.tensor([[1.0], [1e-3]])   # two components, 1000x apart
    B = torch.randn(32, 2, generator=g) * torch.tensor([[1.0, 1e-3]])
    lora = {"m": LoraPair(A, B)}
    back = roundtrip(lora, "int8")["m"]
    for i in range(2):   # each component within int8 resolution of its own scale (a shared scale would zero one)
        assert torch.allclose(back.A[i], A[i], atol=A[i].abs().max() / 127)
        assert torch.allclose(back.B[:, i], B[:, i], atol=B[:, i].abs().max() / 127)
    assert (delta(back) - delta(lora["m"])).norm() / delta(lora["m"]).norm() < 0.02
    assert stored_bytes(192, 2, "int8") == 192 + 8 and stored_bytes(192, 2, "bfloat16") == 384
    with pytest.raises(ValueError, match="precision"):
        roundtrip(lora, "fp4")
    assert bf16_twin("mta-int8") == "mta" and bf16_twin("mta-qv-r2-e2-int8") == "mta-qv-r2-e2"
    assert bf16_twin("mta-r2") == "mta-r2"

def test_a_rerun_without_bank_sizes_keeps_the_earlier_curve_of_the_same_study(tmp_path):
    """More profiles alone (``study.bank_folds=[]``) must not drop a committed bank-size curve; a report of
    other settings must not lend its curve."""
    from mta_ray.study.profiles import earlier_bank_size, render

    result = {"task": "lamp2", "metric": "accuracy", "select": "fixed", "fixed_from": "r.json",
              "chosen": {"adapt.lr": 1e-4, "merge.top_k": 2}, "protocols": {}, "bank_size": []}
    row = {"folds": 4, "bank_users": 54.0, "methods": {"mta": {"metrics": {"accuracy": 0.25},
                                                               "ci95": {"accuracy": [0.1, 0.4]}}}}
    path = tmp_path / "profiles.json"
    assert earlier_bank_size(path, result) == []                          # no earlier report
    path.write_text(json.dumps({**result, "bank_size": [row]}))
    kept = earlier_bank_size(path, result)
    assert kept == [{**row, "from_earlier_run": True}]
    assert "kept from an earlier run" in render({**result, "bank_size": kept}, [])
    path.write_text(json.dumps({**result, "chosen": {"adapt.lr": 2e-3, "merge.top_k": 2}, "bank_size": [row]}))
    assert earlier_bank_size(path, result) == []                          # other settings: not this curve
    path.write_text("{not json")
    assert earlier_bank_size(path, result) == []


def test_a_kept_curve_is_shown_next_to_this_runs_scores_of_the_same_setting():
    """Two runs of one setting differ (GPU training is not bit-reproducible): the report must put the kept
    row of its own fold count beside this run's scores, not leave two numbers for one setting unexplained."""
    from mta_ray.study.profiles import kept_vs_this_run, render

    def score(x):
        return {"metrics": {"accuracy": x}, "ci95": {"accuracy": [x - 0.1, x + 0.1]}}

    kept = [{"folds": 2, "bank_users": 36.0, "from_earlier_run": True,
             "methods": {"merged_only": score(0.2222), "mta": score(0.25), "adapt_only": score(0.2917)}},
            {"folds": 4, "bank_users": 54.0, "from_earlier_run": True, "methods": {"mta": score(0.139)}}]
    systems = {"mta": {"method": "mta", **score(0.2222)}, "mta-qv": {"method": "mta", **score(0.3)},
               "mta-merged-only": {"method": "merged_only", **score(0.2222)},
               "adapt_only": {"method": "adapt_only", **score(0.2917)}, "oppu": {"method": "oppu", **score(0.11)}}
    result = {"task": "lamp2", "metric": "accuracy", "select": "fixed", "fixed_from": "", "chosen": {},
              "protocols": {"paper": {"systems": systems}}, "bank_size": kept}
    drift = kept_vs_this_run(result, folds=2)
    assert drift == {"folds": 2, "methods": {"merged_only": {"this_run": 0.2222, "kept": 0.2222},
                                             "mta": {"this_run": 0.2222, "kept": 0.25},    # the paper recipe, not a profile
                                             "adapt_only": {"this_run": 0.2917, "kept": 0.2917}}}
    text = render({**result, "protocols": {}, "kept_vs_this_run": drift}, [])
    assert "mta 0.2222 (kept row 0.2500)" in text
    assert kept_vs_this_run(result, folds=8) == {}                        # no kept row of this run's fold count
    measured = [{**r, "from_earlier_run": False} for r in kept]
    assert kept_vs_this_run({**result, "bank_size": measured}, folds=2) == {}   # rows of this run: nothing to say
