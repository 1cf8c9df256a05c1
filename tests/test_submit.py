"""Submitted the way platform teams do: a real Ray head on loopback, `ray job submit`, the RayJob's runtime env.

The head is `ray start --head --block` on free loopback ports with its own temp dir and its own auth
token, in its own process group; it is stopped by its own process ids (never `ray stop`, which ends
every Ray on the machine). The jobs get exactly the runtime env of `cluster/kuberay-rayjob.yaml`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from mta_ray.core.methods import METHOD_NAMES
from mta_ray.engine.raysetup import JOB_CONFIG_ENV, driver_runtime_env
from mta_ray.files.store import AdapterStore

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
SMALL = ["data.synthetic.num_users=8", "data.synthetic.active_items=10", "data.synthetic.queries_per_user=1",
         "adapt.epochs=1", "bank.epochs=1", "oppu.epochs=1", "eval.bootstrap=50", "model.max_prompt_tokens=192",
         "eval.max_new_tokens=4", "bank.num_clusters=4", "adapt.shard_users=2", "ray.num_cpus=2"]


def rayjob_runtime_env() -> dict:
    """The runtime env of cluster/kuberay-rayjob.yaml: what every submission here uses."""
    job = yaml.safe_load((ROOT / "cluster/kuberay-rayjob.yaml").read_text())
    return yaml.safe_load(job["spec"]["runtimeEnvYAML"])


# --------------------------------------------------------------------------- init_ray inside a job

def test_driver_adds_only_what_the_job_does_not_set():
    job = {"runtime_env": {"working_dir": "gcs://pkg.zip",
                           "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}}
    environ = {JOB_CONFIG_ENV: json.dumps(job), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "MTA_RAY_CACHE": "/cache", "HF_HOME": "/hf"}
    assert driver_runtime_env(environ) == {"env_vars": {"MTA_RAY_CACHE": "/cache", "HF_HOME": "/hf"}}
    everything_set = {**job["runtime_env"]["env_vars"], "MTA_RAY_CACHE": "/c", "HF_HOME": "/h"}
    environ = {**environ, JOB_CONFIG_ENV: json.dumps({"runtime_env": {"env_vars": everything_set}})}
    assert driver_runtime_env(environ) == {}                      # nothing passed twice, nothing at all
    assert driver_runtime_env({}) == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}  # outside a job
    assert driver_runtime_env({JOB_CONFIG_ENV: "not json"}) == {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}


# --------------------------------------------------------------------------- a real head

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _descendants(pid: int) -> set[int]:
    """``pid`` and every process below it now (Ray's workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo += children.get(p, [])
    return found


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and "(Z" not in _state(p)}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    except OSError:
        return "(Z"


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with the job server on loopback; yields (dashboard URL, client environment)."""
    tmp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))          # short: Ray's socket paths have a limit
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",                   # every Ray address on loopback
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node, obj = _free_ports(9)
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={node}", f"--object-manager-port={obj}", "--num-cpus=2",
           f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"]
    log = open(tmp / "head.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_job_server(url, env, head, tmp / "head.log")
        yield url, env
    finally:
        _stop_head(head)
        log.close()


def _wait_for_job_server(url: str, env: dict, head: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited {head.returncode}: {log.read_text()[-2000:]}")
        probe = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise RuntimeError(f"the job server did not come up: {log.read_text()[-2000:]}")


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to the head's process group, then SIGKILL to whatever of its process tree is left."""
    tree = _descendants(head.pid)
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + 30
    while time.time() < deadline and _alive(tree):
        tree |= {d for p in _alive(tree) for d in _descendants(p)}
        time.sleep(0.5)
    for pid in _alive(tree):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    head.wait(timeout=30)


def submit(head, module: str, out: Path, overrides: list[str], timeout: float = 900) -> str:
    """`ray job submit --no-wait` of ``python -m <module>`` with the RayJob's runtime env; waits for the end
    and returns the job's logs (the test fails with them unless the job SUCCEEDED)."""
    url, env = head
    cmd = [RAY, "job", "submit", "--address", url, "--no-wait", "--working-dir", ".",
           "--runtime-env-json", json.dumps(rayjob_runtime_env()), "--",
           "python", "-m", module, "--config", "configs/demo.yaml", "--out", str(out), *overrides]
    sub = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-2000:]
    job_id = re.search(r"(raysubmit_\w+)", sub.stdout + sub.stderr).group(1)
    deadline, status, end = time.time() + timeout, "", None
    while time.time() < deadline:
        status = subprocess.run([RAY, "job", "status", "--address", url, job_id], env=env,
                                capture_output=True, text=True).stdout
        status = re.sub(r"\x1b\[[0-9;]*m", "", status)                # without the CLI's colours
        end = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", status)
        if end:
            break
        time.sleep(3)
    logs = subprocess.run([RAY, "job", "logs", "--address", url, job_id], env=env, capture_output=True,
                          text=True).stdout
    assert end and end.group(1) == "succeeded", f"{status}\n{logs[-4000:]}"
    return logs


# --------------------------------------------------------------------------- the jobs

@pytest.fixture(scope="module")
def submitted_run(ray_head, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("submitted")
    overrides = [f"model.base={tiny_model_dir}", f"model.cache_dir={out / 'cache'}", *SMALL]
    logs = submit(ray_head, "jobs.run_pipeline", out / "run", overrides)
    return out / "run", overrides, logs


@pytest.mark.slow
def test_submitted_pipeline_job_succeeds_with_every_method_and_user(submitted_run):
    run, _, logs = submitted_run
    report = json.loads((run / "report.json").read_text())
    assert set(report["methods"]) == set(METHOD_NAMES)
    assert all(m["n"] == 8 for m in report["methods"].values())
    assert "| mta |" in logs                                          # the report reaches `ray job logs`
    for kind in ("mta", "adapt_only", "oppu"):
        ids = AdapterStore(run / "adapters" / kind).index().column("user_id").to_pylist()
        assert len(ids) == len(set(ids)) == 8


@pytest.mark.slow
def test_submitted_personalize_job_resumes_a_half_done_run(ray_head, submitted_run):
    run, overrides, _ = submitted_run
    store = run / "adapters" / "mta"
    kept = sorted(store.glob("index-*.parquet"))[:2]                  # a run killed after two of four shards
    for index in sorted(store.glob("index-*.parquet"))[2:]:
        index.unlink()
        (store / index.name.replace("index-", "shard-").replace(".parquet", ".safetensors")).unlink()
    partial = AdapterStore(store).index().column("user_id").to_pylist()
    assert len(partial) == 4 and len(kept) == 2
    logs = submit(ray_head, "jobs.personalize", run, overrides)
    assert "'trained': 4" in logs and "4/4 users" in logs
    ids = AdapterStore(store).index().column("user_id").to_pylist()
    assert len(ids) == len(set(ids)) == 8 and set(partial) <= set(ids)
