"""Evaluate's files: predictions streamed to parquet and read back block by block, the progress line,
per-user step losses and the loss-curve PNG (no Ray, no model)."""

import io

import numpy as np
import pytest

from mta_ray.config import load_config
from mta_ray.core.metrics import query_scores
from mta_ray.core.progress import Progress, duration
from mta_ray.core.statistics import UserBootstrap, blocks_in_memory, method_stats
from mta_ray.core.tasks import get_task
from mta_ray.files.losses import LossLog, iter_losses, loss_curves_png, step_quantiles
from mta_ray.files.predictions import PredictionsWriter, first_rows, n_users
from mta_ray.stages.evaluate import statistics_from_files

DEMO = "configs/demo.yaml"


def _answers(task, rng, n_users):
    users = np.repeat(np.arange(n_users), rng.integers(1, 4, n_users))
    golds = [task.labels[i] for i in rng.integers(0, 4, len(users))]
    preds = {m: [g if rng.random() < q else task.labels[rng.integers(0, 4)] for g in golds]
             for m, q in (("mta", 0.7), ("base", 0.4))}
    return users, golds, preds


def _write(task, folder, users, golds, preds, batch_users):
    paths = {}
    for m, p in preds.items():
        w = PredictionsWriter(folder / f"{m}.parquet", task)
        assert not w.path.exists()                        # published only when complete
        for lo in range(0, users.max() + 1, batch_users):  # one row group per batch of users, as evaluate
            idx = np.flatnonzero((users >= lo) & (users < lo + batch_users))
            pi, gi = [p[i] for i in idx], [golds[i] for i in idx]
            w.write({"user_index": users[idx], "user_id": [f"u{u}" for u in users[idx]],
                     "query_id": [f"q{i}" for i in idx], "output": pi, "prediction": pi, "gold": gi,
                     **query_scores(task, pi, gi)})
        w.close()
        paths[m] = w.path
    return paths


@pytest.mark.parametrize("block_users", [5, 64, None])
def test_statistics_streamed_from_files_equal_those_in_memory(tmp_path, block_users):
    task = get_task("lamp2")
    users, golds, preds = _answers(task, np.random.default_rng(0), 40)
    paths = _write(task, tmp_path, users, golds, preds, batch_users=7)
    assert n_users(paths["mta"]) == 40
    assert first_rows(paths["mta"])[0] == {"user_id": "u0", "query_id": "q0", "output": preds["mta"][0],
                                            "prediction": preds["mta"][0], "gold": golds[0]}
    cfg = load_config(DEMO, ["eval.bootstrap=300"])
    out = statistics_from_files(cfg, task, paths, block_users=block_users)
    boot = UserBootstrap(40, 300, cfg.seed, block_users)
    ref = method_stats(task, boot, blocks_in_memory(task, boot, users, {m: query_scores(task, p, golds)
                                                                         for m, p in preds.items()}))
    for m in preds:
        assert out["methods"][m]["metrics"] == pytest.approx(ref.point[m])
        for k, ci in ref.ci95(m).items():
            assert out["methods"][m]["ci95"][k] == pytest.approx(ci)
        assert out["methods"][m]["n"] == len(golds)
    assert out["comparisons"]["base"]["mta_advantage"] == pytest.approx(ref.paired("mta", "base")["advantage"])
    assert out["comparisons"]["base"]["ci95"] == pytest.approx(ref.paired("mta", "base")["ci95"])


def test_files_that_disagree_on_the_users_are_an_input_error(tmp_path):
    from mta_ray.errors import InputError

    task = get_task("lamp2")
    users, golds, preds = _answers(task, np.random.default_rng(1), 20)
    paths = _write(task, tmp_path, users, golds, preds, batch_users=20)
    keep = users < 10
    other = _write(task, tmp_path / "b", users[keep], [g for g, k in zip(golds, keep) if k],
                   {"base": [p for p, k in zip(preds["base"], keep) if k]}, batch_users=20)
    with pytest.raises(InputError, match="disagree"):
        statistics_from_files(load_config(DEMO, []), task, {"mta": paths["mta"], "base": other["base"]})


def test_progress_lines_give_done_total_rate_and_eta():
    t = [0.0]
    out = io.StringIO()
    p = Progress("bank", "anchors", total=50, every_s=10, clock=lambda: t[0], out=out)
    t[0] = 20.0
    p.add(10)                     # first line always
    t[0] = 25.0
    p.add(5)                      # within 10 s of the last: quiet
    t[0] = 100.0
    p.add(35)                     # the last always
    lines = out.getvalue().splitlines()
    assert lines == ["bank: 10/50 anchors (20%), 0.5 anchors/s, 20s elapsed, ETA 1m20s",
                     "bank: 50/50 anchors (100%), 0.5 anchors/s, 1m40s elapsed"]
    assert duration(4000) == "1h06m"


def test_step_losses_are_kept_beside_the_store_and_plotted(tmp_path):
    log = LossLog(tmp_path / "adapters" / "mta", every=2)
    for i in range(5):
        log.add(f"u{i}", [3.0 - 0.1 * s * (i + 1) for s in range(3 + i % 2)])
    log.add("u0", [1.0, 0.5])     # retrained after a kill: its last row counts
    log.flush()
    assert len(list((tmp_path / "adapters" / "mta").glob("losses-*.parquet"))) == 3
    curves = dict(iter_losses(tmp_path / "adapters" / "mta"))
    assert len(curves) == 5 and curves["u0"].tolist() == [1.0, 0.5]
    steps, q, counts = step_quantiles(list(curves.values()))
    assert steps.tolist() == [1, 2, 3, 4] and counts.tolist() == [5, 5, 4, 2]
    assert q[2, 0] == pytest.approx(3.0)           # step 1: four users at 3.0, one at 1.0
    png = tmp_path / "loss-curves.png"
    assert loss_curves_png({"mta": list(curves.values()), "oppu": []}, png, "lamp2")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not loss_curves_png({"mta": []}, tmp_path / "none.png", "x") and not (tmp_path / "none.png").exists()
