"""prepare: real LaMP-2 users, both LaMP formats, and every kind of bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mta_ray.cli import main
from mta_ray.files.tables import load_users

ROOT = Path(__file__).resolve().parents[1]
LAMP2_CFG = str(ROOT / "configs/lamp/lamp2.yaml")


def prepare(*args) -> int:
    return main(["prepare", *map(str, args)])


def test_prepare_real_lamp2_processed(lamp2_file, tmp_path, capsys):
    assert prepare(LAMP2_CFG, "data.format=processed", f"data.path={lamp2_file}", "--out", tmp_path) == 0
    table = load_users(tmp_path / "users.parquet")
    assert table.num_rows == 72
    rows = table.to_pylist()
    assert all(len(r["history"]) == 10 and len(r["queries"]) == 1 for r in rows)
    assert rows[0]["user_id"] == "8000002" and rows[0]["task"] == "lamp2"
    assert rows[0]["history"][0]["output"] == "twist ending"
    assert rows[0]["queries"][0]["gold"] == "twist ending"
    assert (tmp_path / "prepare.config.yaml").is_file()
    assert "72 users, 720 history items, 72 queries" in capsys.readouterr().out
    # second run skips: output up to date
    assert prepare(LAMP2_CFG, "data.format=processed", f"data.path={lamp2_file}", "--out", tmp_path) == 0
    assert "up to date" in capsys.readouterr().out


def _write_official(tmp_path: Path, task="LaMP_3", questions=None, golds=None) -> Path:
    questions = questions if questions is not None else [
        {"id": "q1", "input": "What is the score ... review: Terrible blender.",
         "profile": [{"id": "p1", "text": "Loved it", "score": 5}, {"id": "p2", "text": "Meh", "score": "3"}]},
        {"id": "q2", "input": "What is the score ... review: Fine.", "user_id": "u7",
         "profile": [{"id": "p3", "text": "Bad", "score": 1}]},
    ]
    golds = golds if golds is not None else [{"id": "q1", "output": "1"}, {"id": "q2", "output": "4"}]
    qpath = tmp_path / "dev_questions.json"
    qpath.write_text(json.dumps(questions))
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": task, "golds": golds}))
    return qpath


def test_prepare_official_lamp_format(tmp_path):
    qpath = _write_official(tmp_path)
    out = tmp_path / "out"
    assert prepare(ROOT / "configs/lamp/lamp3.yaml", f"data.path={qpath}", "--out", out) == 0
    rows = load_users(out / "users.parquet").to_pylist()
    assert [r["user_id"] for r in rows] == ["q1", "u7"]
    assert rows[0]["history"][0] == {"id": "p1", "input": "Loved it", "output": "5"}
    assert rows[1]["queries"] == [{"id": "q2", "input": "What is the score ... review: Fine.", "gold": "4"}]
    # a folder holding both files works too
    assert prepare(ROOT / "configs/lamp/lamp3.yaml", f"data.path={tmp_path}", "--out", out, "--force") == 0


def _processed(tmp_path: Path, users) -> Path:
    path = tmp_path / "users.json"
    path.write_text(users if isinstance(users, str) else json.dumps(users))
    return path


GOOD = {"user_id": 1, "profile": [{"id": "1", "tag": "comedy", "description": "d"}],
        "query": [{"id": "q", "input": "description: x", "gold": "comedy"}]}

BAD_INPUTS = {
    "invalid_json": ('[{"user_id": 1, ', "invalid JSON at line 1"),
    "not_a_list": ({"user_id": 1}, "expected a JSON list of users"),
    "missing_profile": ([{"user_id": 1, "query": []}], "user '1': missing key 'profile'"),
    "missing_item_key": ([{**GOOD, "profile": [{"id": "1", "tag": "comedy"}]}],
                         "profile item 0: missing key 'description'"),
    "missing_gold": ([{**GOOD, "query": [{"id": "q", "input": "x"}]}], "query 0: missing key 'gold'"),
    "empty_history": ([{**GOOD, "profile": []}], "user '1': empty history"),
    "duplicate_ids": ([GOOD, GOOD], "duplicate user_id '1'"),
    "unsafe_id": ([{**GOOD, "user_id": "../../etc/passwd"}], "is not a safe file name"),
    "id_with_slash": ([{**GOOD, "user_id": "a/b"}], "is not a safe file name"),
    "empty_file": ("", "invalid JSON"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_is_lost(kind, tmp_path, capsys):
    content, message = BAD_INPUTS[kind]
    path = _processed(tmp_path, content)
    out = tmp_path / "out"
    out.mkdir()
    previous = out / "users.parquet"
    previous.write_bytes(b"an earlier good table")
    code = prepare(LAMP2_CFG, "data.format=processed", f"data.path={path}", "--out", out)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and message in err
    assert previous.read_bytes() == b"an earlier good table"          # nothing lost
    assert sorted(p.name for p in out.iterdir()) == ["users.parquet"]  # nothing half-written


def test_unknown_task_and_missing_files(tmp_path, capsys):
    path = _processed(tmp_path, [GOOD])
    assert prepare(LAMP2_CFG, "data.format=processed", f"data.path={path}", "data.task=lamp9",
                   "--out", tmp_path / "o") == 2
    assert "data.task must be one of ['lamp1', 'lamp2', 'lamp2-synthetic', 'lamp3', 'lamp4', 'lamp5'], got 'lamp9'" in capsys.readouterr().err
    assert prepare(LAMP2_CFG, "data.format=processed", f"data.path={tmp_path / 'nope.json'}",
                   "--out", tmp_path / "o") == 2
    assert "nope.json: file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_official_format_errors(tmp_path, capsys):
    qpath = _write_official(tmp_path, golds=[{"id": "q1", "output": "1"}])
    assert prepare(ROOT / "configs/lamp/lamp3.yaml", f"data.path={qpath}", "--out", tmp_path / "o") == 2
    assert "dev_outputs.json: no gold output for question id 'q2'" in capsys.readouterr().err
    qpath = _write_official(tmp_path, task="LaMP_5")
    assert prepare(ROOT / "configs/lamp/lamp3.yaml", f"data.path={qpath}", "--out", tmp_path / "o") == 2
    assert "outputs are for task 'LaMP_5', config says 'lamp3'" in capsys.readouterr().err


def test_cli_process_prints_no_traceback(tmp_path):
    path = _processed(tmp_path, '{"broken": ')
    proc = subprocess.run([sys.executable, "-m", "mta_ray.cli", "prepare", LAMP2_CFG, "data.format=processed",
                           f"data.path={path}", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_max_users_is_a_debug_size(lamp2_file, tmp_path):
    assert prepare(LAMP2_CFG, "data.format=processed", f"data.path={lamp2_file}", "data.max_users=5",
                   "--out", tmp_path) == 0
    assert pq.read_table(tmp_path / "users.parquet").num_rows == 5
