"""End to end on a local Ray with a tiny model: run, export, and a killed personalize resumed."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mta_ray.cli import main
from mta_ray.config import load_config
from mta_ray.core.methods import METHOD_NAMES as METHODS
from mta_ray.files.store import AdapterStore

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")
SMALL = ["data.synthetic.num_users=8", "data.synthetic.active_items=10", "data.synthetic.queries_per_user=1",
         "adapt.epochs=1", "bank.epochs=1", "oppu.epochs=1", "eval.bootstrap=50", "model.max_prompt_tokens=192",
         "eval.max_new_tokens=4", "bank.num_clusters=4"]

pytestmark = pytest.mark.slow


def test_run_produces_a_report_with_every_method(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "lamp2-synthetic"
    assert set(report["methods"]) == set(METHODS)
    for name, m in report["methods"].items():
        assert m["n"] == 8 and set(m["metrics"]) == {"accuracy", "f1"}
        assert m["ci95"]["accuracy"][0] <= m["metrics"]["accuracy"] <= m["ci95"]["accuracy"][1]
    assert set(report["comparisons"]) == set(METHODS) - {"mta"}
    assert report["storage"]["mta_bytes_per_user"] > 0 and report["timing"]["evaluate_s"] > 0
    assert "| mta |" in (run_dir / "report.md").read_text() and (run_dir / "report.png").is_file()
    manifest = json.loads((run_dir / "bank" / "manifest.json").read_text())
    assert len(manifest["anchors"]) >= 1
    for kind in ("mta", "adapt_only", "oppu"):
        ids = AdapterStore(run_dir / "adapters" / kind).index().column("user_id").to_pylist()
        assert sorted(ids) == sorted(set(ids)) and len(ids) == 8   # every user stored exactly once
    for stage in ("prepare", "embed", "cluster", "bank", "personalize-mta", "evaluate"):
        assert (run_dir / f"{stage}.config.yaml").is_file()
    import pyarrow.parquet as pq
    for name in METHODS:   # every answer streamed to its method's file, with its per-query scores
        t = pq.read_table(run_dir / "predictions" / f"{name}.parquet").to_pylist()
        assert [r["user_index"] for r in t] == list(range(8)) and all(r["query_id"] for r in t)
        assert {"output", "prediction", "gold", "correct", "pred_label", "gold_label"} <= set(t[0])
        assert sum(r["correct"] for r in t) / 8 == pytest.approx(report["methods"][name]["metrics"]["accuracy"])
    assert (run_dir / "loss-curves.png").read_bytes()[:4] == b"\x89PNG" and "loss-curves.png" in report["plots"]
    losses = [a["losses"] for a in manifest["anchors"]]
    assert all(len(x) == a["steps"] for x, a in zip(losses, manifest["anchors"]))
    from mta_ray.files.losses import iter_losses
    stored = dict(iter_losses(run_dir / "adapters" / "mta"))
    assert sorted(stored) == sorted(ids) and all(len(v) >= 1 for v in stored.values())


def test_report_is_rebuilt_from_the_predictions_files_alone(run_dir, tiny_model_dir, tmp_path, capsys):
    """Only predictions/ (no users, bank, adapters, Ray or model): the same report."""
    whole = json.loads((run_dir / "report.json").read_text())
    shutil.copytree(run_dir / "predictions", tmp_path / "predictions")
    assert main(["evaluate", DEMO, "--out", str(tmp_path), "--report-only", f"model.base={tiny_model_dir}",
                 *SMALL]) == 0
    rebuilt = json.loads((tmp_path / "report.json").read_text())
    for method, m in whole["methods"].items():
        assert rebuilt["methods"][method]["metrics"] == m["metrics"] and rebuilt["methods"][method]["ci95"] == m["ci95"]
    assert rebuilt["comparisons"] == whole["comparisons"]
    assert "| mta |" in capsys.readouterr().out
    empty = tmp_path / "empty"
    assert main(["evaluate", DEMO, "--out", str(empty), "--report-only", *SMALL]) == 2
    assert "no predictions file" in capsys.readouterr().err


def test_evaluation_in_user_batches_gives_the_same_report(run_dir, tiny_model_dir, tmp_path):
    """Users stream through evaluate in batches; 3 users per batch answers every query as one batch of 8 did."""
    whole = json.loads((run_dir / "report.json").read_text())
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["evaluate", DEMO, "--out", str(copy), f"model.base={tiny_model_dir}", *SMALL,
                 "eval.users_per_batch=3"]) == 0
    batched = json.loads((copy / "report.json").read_text())
    for method, m in whole["methods"].items():
        assert batched["methods"][method]["n"] == m["n"]
        assert batched["methods"][method]["metrics"] == pytest.approx(m["metrics"])
        assert [e["gold"] for e in batched["methods"][method]["examples"]] == [e["gold"] for e in m["examples"]]
    assert batched["comparisons"].keys() == whole["comparisons"].keys()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the Triton kernels run")
def test_triton_kernels_on_a_worker_without_gpu_are_an_input_error(run_dir, tiny_model_dir, tmp_path, capsys):
    """adapt.lora_kernel=triton on CPU workers would train in Triton's interpreter (hours): refused in one line."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("adapters"))
    assert main(["personalize", DEMO, "--out", str(copy), f"model.base={tiny_model_dir}", *SMALL,
                 "adapt.lora_kernel=triton"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "adapt.lora_kernel: triton runs on CUDA GPUs only" in err[-1] and "Traceback" not in "".join(err)
    assert not list((copy / "adapters" / "mta").glob("index-*.parquet"))


def test_rerun_skips_finished_work(run_dir, tiny_model_dir, capsys):
    assert main(["personalize", DEMO, "--out", str(run_dir), f"model.base={tiny_model_dir}", *SMALL]) == 0
    assert "'skipped': True" in capsys.readouterr().out


def test_export_loads_in_peft_and_reproduces_our_outputs(run_dir, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mta_ray.engine.multilora import inject, set_stacked
    from mta_ray.files.peft_format import served_problems
    from mta_ray.stages.export import personalised_lora, user_folder

    user = "synth-00005"                                  # exact: rank 2 x 8 + 4 = 20 fits a cap of 32
    assert main(["export", DEMO, "--run", str(run_dir), "--out", str(tmp_path / "exact"),
                 f"model.base={tiny_model_dir}", *SMALL, "export.max_rank=32", "export.dtype=float32",
                 f"user_id={user}"]) == 0
    cfg = load_config(DEMO, [f"model.base={tiny_model_dir}", *SMALL])
    lora, _ = personalised_lora(cfg, run_dir, user)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    router, layers = inject(ours, ["all-linear"], slots=1, rank=max(p.A.shape[0] for p in lora.values()))
    set_stacked(layers, 0, lora)
    router.rows = torch.tensor([0])
    ids = torch.randint(0, 1000, (1, 12))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           str(tmp_path / "exact" / user_folder(user)))
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, ours(ids).logits, atol=1e-4)
        assert not torch.allclose(peft_model(ids).logits,
                                  AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits, atol=1e-4)
    assert main(["export", DEMO, "--run", str(run_dir), "--out", str(tmp_path / "all"),   # every user, defaults
                 f"model.base={tiny_model_dir}", *SMALL]) == 0
    assert "export: 8/8 users (100%)" in capsys.readouterr().out   # counts the store's rows, not its loss files
    folders = [p for p in (tmp_path / "all").iterdir() if p.is_dir()]
    assert len(folders) == 8 and all(served_problems(p, 16) == [] for p in folders)


def test_unknown_user_export_is_an_input_error(run_dir, tiny_model_dir, tmp_path, capsys):
    assert main(["export", DEMO, "--run", str(run_dir), "--out", str(tmp_path / "x"),
                 f"model.base={tiny_model_dir}", *SMALL, "user_id=nobody"]) == 2
    assert "user 'nobody' is not personalised" in capsys.readouterr().err


def test_killed_personalize_resumes_and_stores_every_user_once(run_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("adapters"))
    cmd = [sys.executable, "-m", "mta_ray.cli", "personalize", DEMO, "--out", str(out),
           f"model.base={tiny_model_dir}", *SMALL, "adapt.epochs=40", "adapt.slots=1", "adapt.shard_users=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    store = out / "adapters" / "mta"
    deadline = time.time() + 300
    while time.time() < deadline and not list(store.glob("index-*.parquet")):
        time.sleep(0.5)
    import os
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray workers die mid-run
    proc.wait()
    partial = AdapterStore(store).index().column("user_id").to_pylist()
    assert 1 <= len(partial) < 8
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = AdapterStore(store).index().column("user_id").to_pylist()
    assert len(ids) == 8 and len(set(ids)) == 8
    assert set(partial) <= set(ids)


def test_killed_worker_actor_is_restarted_and_its_users_retried(run_dir, tiny_model_dir, tmp_path):
    """A model worker dies mid-task: Ray restarts it, retries its batch, every user is stored once."""
    import os

    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("adapters"))
    cmd = [sys.executable, "-m", "mta_ray.cli", "personalize", DEMO, "--out", str(out),
           f"model.base={tiny_model_dir}", *SMALL, "adapt.epochs=60", "adapt.slots=2", "adapt.shard_users=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    store = out / "adapters" / "mta"
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and killed is None and proc.poll() is None:
        time.sleep(0.5)
        if list(store.glob("index-*.parquet")):   # the worker is busy with its next batch
            pids = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "ray::ModelWorker"],  # this run's only
                                  capture_output=True, text=True).stdout.split()
            if pids:
                killed = int(pids[0])
                os.kill(killed, signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, output[-3000:]
    ids = AdapterStore(store).index().column("user_id").to_pylist()
    assert len(ids) == 8 and len(set(ids)) == 8


def test_killed_bank_actor_is_restarted_and_every_anchor_trained(run_dir, tiny_model_dir, tmp_path):
    """A bank worker dies mid-training: Ray restarts it and retries its anchors; the manifest is complete."""
    import os

    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("adapters", "bank"))
    cmd = [sys.executable, "-m", "mta_ray.cli", "bank", DEMO, "--out", str(out),
           f"model.base={tiny_model_dir}", *SMALL, "bank.epochs=400"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed, seen = None, None
    deadline = time.time() + 300
    while time.time() < deadline and killed is None and proc.poll() is None:
        time.sleep(0.5)
        pids = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "ray::ModelWorker"],
                              capture_output=True, text=True).stdout.split()
        if pids and seen is None:
            seen = time.time()
        if pids and time.time() - seen > 8:      # loaded and training its share of the anchors
            killed = int(pids[0])
            os.kill(killed, signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert killed is not None, "the run ended before the worker could be killed"
    assert proc.returncode == 0, output[-3000:]
    anchors = json.loads((out / "bank" / "manifest.json").read_text())["anchors"]
    clusters = {a["cluster"] for a in anchors}
    assert len(anchors) == len(clusters) == 4
    assert all((out / "bank" / a["path"] / "adapter_model.safetensors").is_file() for a in anchors)


def test_killed_bank_keeps_finished_anchors_and_the_rerun_trains_only_the_missing(run_dir, tiny_model_dir, tmp_path):
    """Kill the whole bank run (driver and workers) after some anchors are stored; the rerun trains only
    the missing ones: every anchor once, the stored ones untouched."""
    import os

    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("adapters", "bank", "predictions"))
    cmd = [sys.executable, "-m", "mta_ray.cli", "bank", DEMO, "--out", str(out), f"model.base={tiny_model_dir}",
           *SMALL, "bank.epochs=150", "adapt.slots=1"]   # one anchor at a time: they finish one by one
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    manifest = out / "bank" / "manifest.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not manifest.is_file():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = json.loads(manifest.read_text())["anchors"]
    assert 1 <= len(before) < 4, "kill the run between its first and its last anchor"
    stamps = {a["anchor_id"]: (out / "bank" / a["path"] / "adapter_model.safetensors").stat().st_mtime_ns
              for a in before}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(before)} anchors already stored, training the {4 - len(before)} missing" in done.stdout
    assert f"'trained': {4 - len(before)}" in done.stdout and "ETA" in done.stdout
    after = json.loads(manifest.read_text())["anchors"]
    assert len(after) == len({a["cluster"] for a in after}) == 4            # every anchor, once
    assert after[:len(before)] == before                                     # none retrained
    assert all((out / "bank" / a).joinpath("adapter_model.safetensors").stat().st_mtime_ns == t
               for a, t in stamps.items())
