"""Cluster manifests parse, pin the project's Ray version, and start job modules that exist."""

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pinned_ray() -> str:
    m = re.search(r'"ray\[data,train\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml must pin ray"
    return m.group(1)


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_manifests_pin_the_projects_ray_version():
    version = _pinned_ray()
    docs = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "cluster").glob("*.yaml"))}
    assert {"ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"} <= set(docs)
    for name, doc in docs.items():
        images = _images(doc)
        assert images and all(f":{version}-" in i for i in images), name
    assert docs["kuberay-raycluster.yaml"]["spec"]["rayVersion"] == version
    assert docs["kuberay-rayjob.yaml"]["spec"]["rayClusterSpec"]["rayVersion"] == version


def test_every_launcher_key_is_commented():
    for line in (ROOT / "cluster/ray-cluster.yaml").read_text().splitlines():
        if re.match(r"^\s*(- )?[A-Za-z_]+:", line):
            assert "#" in line, f"uncommented key: {line}"


def test_rayjob_entrypoint_is_an_existing_job_module():
    job = yaml.safe_load((ROOT / "cluster/kuberay-rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    module = argv[2]
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert (ROOT / argv[argv.index("--config") + 1]).is_file()
