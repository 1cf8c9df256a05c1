"""Job entry points exist, explain both commands, and pass their arguments through."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = ["run_pipeline", "personalize", "bench_throughput"]


@pytest.mark.parametrize("name", JOBS)
def test_job_docstring_gives_local_and_submit_commands(name):
    doc = importlib.import_module(f"jobs.{name}").__doc__
    assert f"python -m jobs.{name}" in doc and "ray job submit" in doc


def test_job_runs_its_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.run_pipeline", "--config", str(ROOT / "configs/demo.yaml"),
                           "--out", str(tmp_path), "data.synthetic.num_users=8", "nosuch.key=1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "unknown key 'nosuch'" in proc.stderr
