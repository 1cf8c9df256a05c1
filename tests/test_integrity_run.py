"""Runs that never lie, end to end on a local Ray with a tiny model (issue 21): stale adapters refused and
retrained with --force, an incomplete run refused or reported as missing, a damaged shard named by a
worker in one line, and a rerun after a lost index leaves no orphan in the storage figures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mta_ray.cli import main
from mta_ray.files.store import AdapterStore

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")
SMALL = ["data.synthetic.num_users=8", "data.synthetic.active_items=10", "data.synthetic.queries_per_user=1",
         "adapt.epochs=1", "bank.epochs=1", "eval.bootstrap=50", "model.max_prompt_tokens=192",
         "eval.max_new_tokens=4", "bank.num_clusters=4", "eval.methods=[base, merged_only, mta]",
         "adapt.shard_users=2"]

pytestmark = pytest.mark.slow


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


def one_error(err: str) -> str:
    """The one error line (Ray's own log lines may share stderr with it: they are not ours)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta_ray.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def test_changed_adapter_settings_are_refused_then_retrained_with_force(run_dir, tiny_model_dir, tmp_path, capsys):
    out = _copy(run_dir, tmp_path)
    store = out / "adapters" / "mta"
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    code = main(["personalize", DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL, "adapt.rank=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "adapters/mta: made with adapt.rank=4, the config has 2: pass --force" in one_error(err)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before        # nothing lost or changed
    assert main(["personalize", DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL, "adapt.rank=2",
                 "--force"]) == 0
    said = capsys.readouterr().out
    assert "removing it and training again (--force)" in said
    layout = json.loads((store / "layout.json").read_text())
    assert all(a_shape[0] == 2 for _, a_shape, _ in layout)                  # really retrained at rank 2
    assert len(AdapterStore(store).finished_users()) == 8
    code = main(["evaluate", DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "made with adapt.rank=2, the config has 4" in one_error(err)   # the report would claim 4
    assert (out / "report.json").read_bytes() == (run_dir / "report.json").read_bytes()


def test_incomplete_run_is_refused_or_reported_missing_then_completed_without_orphans(run_dir, tiny_model_dir,
                                                                                        tmp_path, capsys):
    out = _copy(run_dir, tmp_path)
    store = out / "adapters" / "mta"
    (store / "index-00001.parquet").unlink()              # a killed or damaged run: two users lost their index
    code = main(["evaluate", DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL])
    err = capsys.readouterr().err
    assert code == 2
    err = one_error(err)
    assert "2 of 8 users have no mta adapter (0 failed)" in err and "--kind mta" in err
    assert main(["evaluate", DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL,
                 "--allow-missing"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["missing_users"] == {"mta": 2} and "Missing adapters" in (out / "report.md").read_text()
    assert report["methods"]["mta"]["n"] == 8
    capsys.readouterr()
    assert main(["personalize", DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL]) == 0
    said = capsys.readouterr().out
    assert "removed what no index refers to" in said and "shard-00001.safetensors" in said
    indexed = {r["shard"] for r in AdapterStore(store).index().to_pylist()}
    shards = {p.name for p in store.glob("shard-*.safetensors")}
    assert shards == indexed and len(AdapterStore(store).finished_users()) == 8   # no orphan counted
    assert main(["evaluate", DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "missing_users" not in report
    assert set(report["provenance"]) == {"prepare", "embed", "bank", "personalize-mta"}   # what it was made from
    on_disk = sum(p.stat().st_size for p in store.iterdir() if p.is_file())
    assert report["storage"]["mta_bytes"] == on_disk


def test_a_damaged_shard_read_by_a_worker_is_one_line_naming_file_and_user(run_dir, tiny_model_dir, tmp_path):
    out = _copy(run_dir, tmp_path)
    store = AdapterStore(out / "adapters" / "mta")
    row = store.rows_by_user()["synth-00003"]
    shard = store.path / row["shard"]
    raw = bytearray(shard.read_bytes())
    raw[row["offset"] + 4:row["offset"] + 8] = b"\x01\x02\x03\x04"
    shard.write_bytes(bytes(raw))
    done = _cli("evaluate", DEMO, "--out", out, f"model.base={tiny_model_dir}", *SMALL, "ray.num_cpus=1")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert str(shard) in lines[0] and "checksum mismatch for user 'synth-00003'" in lines[0]
    assert (out / "report.json").read_bytes() == (run_dir / "report.json").read_bytes()   # not overwritten


def test_a_damaged_bank_file_is_refused_in_the_driver(run_dir, tiny_model_dir, tmp_path, capsys):
    out = _copy(run_dir, tmp_path)
    manifest = json.loads((out / "bank" / "manifest.json").read_text())
    anchor = manifest["anchors"][-1]
    weights = next((out / "bank" / anchor["path"]).glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-6:-2] = b"\x00\x7f\x00\x7f"
    weights.write_bytes(bytes(raw))
    for command in ("personalize", "evaluate"):
        code = main([command, DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL])
        err = capsys.readouterr().err
        assert code == 2
        err = one_error(err)
        assert str(weights) in err and f"checksum mismatch (anchor {anchor['anchor_id']}, user " \
                                       f"{anchor['user_id']!r})" in err
    assert (out / "report.json").read_bytes() == (run_dir / "report.json").read_bytes()


def test_run_with_other_data_rebuilds_quick_stages_then_refuses_the_trained_bank(run_dir, tiny_model_dir, tmp_path,
                                                                                 capsys):
    """The issue's example: the same run folder with another synthetic seed."""
    out = _copy(run_dir, tmp_path)
    bank_before = (out / "bank" / "manifest.json").read_bytes()
    code = main(["run", DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL, "data.synthetic.seed=7"])
    captured = capsys.readouterr()
    assert code == 2
    for step in ("prepare", "embed", "cluster"):
        assert f"{step}: " in captured.out and "made with data.synthetic.seed=0, the config has 7: rebuilding" \
            in captured.out
    assert "bank: made with data.synthetic.seed=0, the config has 7: pass --force" in one_error(captured.err)
    assert (out / "bank" / "manifest.json").read_bytes() == bank_before       # nothing lost
    code = main(["personalize", DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL,
                 "data.synthetic.seed=7"])
    err = capsys.readouterr().err
    err = one_error(err)
    assert code == 2 and "bank/manifest.json: made with data.synthetic.seed=0" in err and "mta-ray bank" in err


def test_failed_users_are_retried_on_rerun_and_recorded(run_dir, tiny_model_dir, tmp_path, capsys):
    out = _copy(run_dir, tmp_path)
    store_dir = out / "adapters" / "mta"
    lost = [r["user_id"] for r in AdapterStore(store_dir).index().to_pylist() if r["shard"] == "shard-00003.safetensors"]
    (store_dir / "index-00003.parquet").unlink()
    (store_dir / "shard-00003.safetensors").unlink()
    store = AdapterStore(store_dir, shard_users=8)
    for u in lost:                                         # an earlier run diverged on these users
        store.add(u, None, [], [], 3, float("nan"), status="diverged", error="loss is nan")
    store.flush()
    assert main(["personalize", DEMO, "--out", str(out), f"model.base={tiny_model_dir}", *SMALL]) == 0
    said = capsys.readouterr().out
    assert f"retrying {len(lost)} users whose training failed before" in said
    rows = AdapterStore(store_dir).index().to_pylist()
    for u in lost:
        assert [r["status"] for r in rows if r["user_id"] == u] == ["diverged", "ok"]   # both attempts recorded
    assert len(AdapterStore(store_dir).finished_users()) == 8
