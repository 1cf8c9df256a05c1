"""The study's bookkeeping: folds, held-out items, settings, run identity, choice on validation, report."""

from __future__ import annotations

import json

import pytest

from mta_ray.config import load_config, with_values
from mta_ray.core.tasks import get_task
from mta_ray.errors import InputError
from mta_ray.study.driver import Run, choose, fold_of, held_out, make_run, setting_users


def _user(uid: str, n: int = 10) -> dict:
    return {"user_id": uid, "history": [{"id": f"{uid}-{i}", "input": f"movie {uid} {i}", "output": "comedy"}
                                        for i in range(n)],
            "queries": [{"id": f"{uid}-q", "input": "description: a film", "gold": "comedy"}]}


def test_folds_are_balanced_seeded_and_cover_everyone():
    ids = [f"u{i}" for i in range(72)]
    folds = fold_of(ids, 2, seed=0)
    assert sorted(folds) == sorted(ids)
    assert sum(f == 0 for f in folds.values()) == 36
    assert folds == fold_of(list(reversed(ids)), 2, seed=0)  # input order does not matter
    assert folds != fold_of(ids, 2, seed=1)


def test_held_out_items_are_disjoint_seeded_per_user_and_need_enough_history():
    val, ext = held_out(_user("a"), 2, 2, seed=0)
    assert len(val) == 2 and len(ext) == 2 and not set(val) & set(ext)
    assert (val, ext) == held_out(_user("a"), 2, 2, seed=0)
    assert [held_out(_user(u), 2, 2, 0) for u in "abcdef"] != [(val, ext)] * 6  # varies by user
    with pytest.raises(InputError, match="need at least 5"):
        held_out(_user("short", 4), 2, 2, seed=0)


def test_settings_never_train_on_their_own_queries():
    u = _user("a")
    val, ext = held_out(u, 2, 2, seed=0)
    v = setting_users([u], "val", 2, 2, 0)[0]
    p = setting_users([u], "paper", 2, 2, 0)[0]
    e = setting_users([u], "extended", 2, 2, 0)[0]
    assert len(v["history"]) == 8 and [q["gold"] for q in v["queries"]] == ["comedy"] * 2
    assert {q["input"] for q in v["queries"]} == {u["history"][i]["input"] for i in val}
    assert not {q["input"] for q in v["queries"]} & {it["input"] for it in v["history"]}
    assert p["history"] == u["history"] and p["queries"] == u["queries"]
    assert len(e["history"]) == 8 and len(e["queries"]) == 3 and e["queries"][0] == u["queries"][0]
    assert not {q["input"] for q in e["queries"][1:]} & {it["input"] for it in e["history"]}
    assert {q["input"] for q in e["queries"][1:]} == {u["history"][i]["input"] for i in ext}


def test_a_run_is_named_by_the_settings_its_method_depends_on():
    choice = {"bank.anchor_data": "own", "bank.lr": 1e-4, "merge.space": "delta", "merge.top_k": 2,
              "merge.fixed_alpha": None, "adapt.lr": 1e-4, "adapt.rank": 4, "adapt.alpha": 8.0, "oppu.lr": 1e-4}
    assert make_run("paper", "base", choice).name == "base"
    assert make_run("paper", "oppu", choice).name == "oppu[oppu.lr=0.0001]"
    merged = make_run("paper", "merged_only", choice, merge__top_k=4)
    assert "merge.top_k=4" in merged.name and "adapt" not in merged.name
    # the same settings reached two ways are one run (cached once)
    assert make_run("val", "mta", choice, merge__top_k=2) == make_run("val", "mta", choice)
    assert make_run("val", "mta", choice).key != make_run("paper", "mta", choice).key


class _FakeStudy:
    """Answers runs from a table: choose() only needs ``run``."""

    def __init__(self, accuracy: dict):
        self.accuracy, self.asked = accuracy, []

    def run(self, run: Run) -> dict:
        self.asked.append(dict(run.values))
        acc = self.accuracy[dict(run.values)["merge.top_k"]]
        n_right = int(acc * 10)
        rows = [{"pred": "comedy" if i < n_right else "sci-fi", "gold": "comedy"} for i in range(10)]
        return {"rows": rows}


def test_choice_takes_the_best_validation_score_and_keeps_the_earlier_candidate_on_ties():
    task = get_task("lamp2")
    base = {"bank.anchor_data": "own", "bank.lr": 1e-4, "merge.space": "delta", "merge.top_k": 2,
            "merge.fixed_alpha": None}
    study = _FakeStudy({2: 0.3, 1: 0.5, 4: 0.5, 8: 0.1})
    chosen, table = choose(study, task, "merged_only", base, [{"merge.top_k": k} for k in (2, 1, 4, 8)])
    assert chosen["merge.top_k"] == 1  # 4 ties with 1 but comes later
    assert [t["changes"]["merge.top_k"] for t in table] == [2, 1, 4, 8]
    assert table[1]["score"][0] == pytest.approx(0.5)
    assert all(v["bank.lr"] == 1e-4 for v in study.asked)


def test_study_settings_are_validated_and_override_values_checked():
    cfg = load_config("configs/study/lamp2.yaml")
    assert cfg.study.folds == 2 and cfg.bank.num_clusters <= 36 // 4
    with pytest.raises(InputError, match="folds"):
        load_config("configs/study/lamp2.yaml", ["study.folds=1"])
    with pytest.raises(InputError, match="protocols"):
        load_config("configs/study/lamp2.yaml", ["study.protocols=[paper, bogus]"])
    assert with_values(cfg, {"merge.top_k": 4}).merge.top_k == 4
    with pytest.raises(InputError, match="unknown key"):
        with_values(cfg, {"merge.topk": 4})
    with pytest.raises(InputError, match="top_k"):
        with_values(cfg, {"merge.top_k": 0})


def test_report_statistics_on_known_predictions(tmp_path):
    """Two methods on 4 users x 2 queries: MTA right on 6, the other on 2; paired stats follow."""
    from mta_ray.study.report import Results

    task = get_task("lamp2")

    def run(name, right):
        rows = [{"user_id": f"u{i // 2}", "pred": "comedy" if i in right else "sci-fi", "gold": "comedy"}
                for i in range(8)]
        return {"name": name, "method": name, "values": {}, "rows": rows, "train_s": 0, "eval_s": 0}

    a, b = run("mta", {0, 1, 2, 3, 4, 5}), run("oppu", {0, 6})
    res = Results(task, [a, b], samples=300, seed=0)
    s = res.summary(a)
    assert s["metrics"]["accuracy"] == pytest.approx(0.75)
    assert s["ci95"]["accuracy"][0] <= 0.75 <= s["ci95"]["accuracy"][1]
    c = res.paired(a, b)
    assert c["advantage"] == pytest.approx(0.5)
    assert c["queries_only_a_right"] == 5 and c["queries_only_b_right"] == 1
    assert 0 <= c["p_not_better"] < 0.2
    assert json.loads(json.dumps(c)) == c
    with pytest.raises(ValueError, match="other queries"):
        Results(task, [a, {**b, "rows": b["rows"][:4]}], samples=10, seed=0)


STUDY_SMALL = ["data.format=synthetic", "data.synthetic.num_users=8", "data.synthetic.min_items=4",
               "data.synthetic.max_items=4", "data.synthetic.active_items=6", "data.synthetic.queries_per_user=1",
               "bank.num_clusters=2", "bank.min_items=4", "adapt.epochs=1", "bank.epochs=1", "oppu.epochs=1",
               "eval.bootstrap=30", "eval.max_new_tokens=4", "model.max_prompt_tokens=160",
               "study.validation_items=1", "study.extended_items=1", "study.anchor_data=[own, cluster]",
               "study.bank_lrs=[1e-3]", "study.spaces=[params, delta]", "study.top_k=[2, 1]", "study.alphas=[0.5]",
               "study.ranks=[4]", "study.adapt_lrs=[1e-3]", "study.oppu_lrs=[1e-3]", "study.ablation_protocols=[paper]",
               "bank.lr=1e-3", "adapt.lr=1e-3", "oppu.lr=1e-3", "merge.space=params"]


@pytest.mark.slow
def test_study_end_to_end_on_local_ray_resumes_and_guards_its_folder(tiny_model_dir, tmp_path, capsys):
    """The whole study on a tiny model: choice on validation, both protocols, report and plots; a rerun
    trains nothing; other settings in the same folder are refused."""
    from mta_ray.cli import main

    cfg = "configs/study/lamp2.yaml"
    out, rep = tmp_path / "work", tmp_path / "report"
    args = [cfg, f"model.base={tiny_model_dir}", *STUDY_SMALL, "--out", str(out), "--report", str(rep)]
    assert main(["study", *args]) == 0
    report = json.loads((rep / "report.json").read_text())
    assert set(report["protocols"]) == {"paper", "extended"}
    assert report["protocols"]["paper"]["n_queries"] == 8           # one LaMP-style query per user
    assert report["protocols"]["extended"]["n_queries"] == 16       # + one held-out item each
    methods = set(report["protocols"]["paper"]["methods"])
    assert methods == {"mta", "base", "rag_k1", "rag_k3", "rag_k5", "oppu", "adapt_only", "merged_only"}
    chosen = report["chosen_on_validation"]
    assert chosen["bank.anchor_data"] in ("own", "cluster") and chosen["merge.space"] in ("params", "delta")
    steps = [row["method"] for row in report["selection"]]
    assert steps[:2] == ["merged_only", "merged_only"] and "mta" in steps and "oppu" in steps
    tests = report["protocols"]["paper"]["studies"]["tests"]
    assert any("delta vs params" in t for t in tests) and any("cluster-pooled" in t for t in tests)
    assert {"methods.png", "top_k.png"} <= {p.name for p in rep.glob("*.png")}
    assert "MTA against each" in (rep / "report.md").read_text()

    cached = sorted(p.name for p in (out / "preds").rglob("*.json"))
    capsys.readouterr()
    assert main(["study", *args]) == 0                             # resumes: everything is cached
    assert sorted(p.name for p in (out / "preds").rglob("*.json")) == cached
    assert "personalize[" not in capsys.readouterr().out

    assert main(["study", *args, "adapt.epochs=2"]) == 2           # other settings, same folder: refused
    assert "other settings" in capsys.readouterr().err
    import ray
    ray.shutdown()
