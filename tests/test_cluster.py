"""Cluster manifests: valid against KubeRay's own CRDs and Ray's launcher schema, one image built from
cluster/Dockerfile on the pinned Ray, entrypoints that exist, storage that is defined."""

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "k8s" / "kuberay-crds"
IMAGE_DIR = "/home/ray/mta_ray"          # where cluster/Dockerfile puts the repository
PYTHON = "py312"


def _pinned_ray() -> str:
    m = re.search(r'"ray\[default,data,train\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml must pin ray[default,data,train] (the job server and CLI need ray[default])"
    return m.group(1)


def _docs() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "cluster").glob("*.yaml"))}


def _find(node, key: str) -> list:
    """Every value of ``key`` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in _find(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _find(v, key)]
    return []


def _image_from_dockerfile() -> tuple[str, str]:
    """(the Ray base image cluster/Dockerfile builds on, the image name its header says to push)."""
    text = (ROOT / "cluster/Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    pushed = re.search(r"docker push (\S+)", text).group(1)
    return base, pushed


def test_the_image_builds_on_the_official_ray_image_of_the_pinned_version():
    version = _pinned_ray()
    base, pushed = _image_from_dockerfile()
    assert base == f"rayproject/ray:{version}-{PYTHON}-gpu"
    assert f"ray{version}-{PYTHON}" in pushed
    text = (ROOT / "cluster/Dockerfile").read_text()
    assert f"ray.__version__ == '{version}'" in text and 'pip install ".[deepspeed]"' in text


def test_every_manifest_runs_the_image_built_here_and_pins_ray():
    version = _pinned_ray()
    _, pushed = _image_from_dockerfile()
    docs = _docs()
    assert {"ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "shared-storage.yaml"} <= set(docs)
    for name, doc in docs.items():
        if name == "shared-storage.yaml":
            continue
        images = _find(doc, "image")
        assert images and set(images) == {pushed}, name
    assert not any("ray-ml" in p.read_text() for p in (ROOT / "cluster").iterdir())
    assert docs["kuberay-raycluster.yaml"]["spec"]["rayVersion"] == version
    assert docs["kuberay-rayjob.yaml"]["spec"]["rayClusterSpec"]["rayVersion"] == version


# --------------------------------------------------------------------------- KubeRay's own schemas

def _strict(schema):
    """An OpenAPI v3 schema as JSON Schema: ``x-kubernetes-*`` keys dropped and, where the CRD does not
    preserve unknown fields, unknown keys refused (as ``kubectl apply``'s strict field validation does)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in schema and "additionalProperties" not in schema and \
            not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _crd_schema(kind: str, api_version: str) -> dict:
    if not CRDS.is_dir():
        pytest.skip("../shared/k8s is not beside this checkout")
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            group, version = api_version.split("/")
            assert crd["spec"]["group"] == group
            (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
            return _strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"no CRD for kind {kind}")


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests_satisfy_kuberays_crd_schema(name):
    doc = _docs()[name]
    schema = _crd_schema(doc["kind"], doc["apiVersion"])
    jsonschema.Draft7Validator(schema).validate(doc)


def test_the_strict_schema_catches_a_misspelt_field():
    doc = _docs()["kuberay-rayjob.yaml"]
    schema = _crd_schema(doc["kind"], doc["apiVersion"])
    broken = {**doc, "spec": {**doc["spec"], "shutdownAfterJobFinish": True}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def test_the_launcher_config_satisfies_rays_own_schema():
    import ray.autoscaler

    schema = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    import json

    jsonschema.Draft7Validator(json.loads(schema.read_text())).validate(_docs()["ray-cluster.yaml"])


# --------------------------------------------------------------------------- what the manifests point at

def test_rayjob_runs_an_existing_job_module_and_config_from_the_image():
    spec = _docs()["kuberay-rayjob.yaml"]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    assert (ROOT / (argv[2].replace(".", "/") + ".py")).is_file()
    config = argv[argv.index("--config") + 1]
    assert config.startswith(IMAGE_DIR + "/") and (ROOT / config[len(IMAGE_DIR) + 1:]).is_file()
    assert argv[argv.index("--out") + 1].startswith("/data/")        # the shared volume


def test_rayjob_runtime_env_is_the_one_the_submission_test_uses():
    from tests.test_submit import rayjob_runtime_env

    env = rayjob_runtime_env()
    assert env == {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}  # no working_dir URL


def test_the_shared_claim_is_defined_and_mounted_at_data_everywhere():
    docs = _docs()
    pvc = docs["shared-storage.yaml"]
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["apiVersion"] == "v1"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        claims = {c["claimName"] for c in _find(docs[name], "persistentVolumeClaim")}
        assert claims == {pvc["metadata"]["name"]}, name
        assert {m["mountPath"] for m in _find(docs[name], "volumeMounts") for m in m} == {"/data"}


def test_every_launcher_key_is_commented():
    for line in (ROOT / "cluster/ray-cluster.yaml").read_text().splitlines():
        if re.match(r"^\s*(- )?[A-Za-z_~/.]+:", line):
            assert "#" in line, f"uncommented key: {line}"


def test_the_launcher_brings_the_repository_and_setup_fails_loudly():
    doc = _docs()["ray-cluster.yaml"]
    assert doc["file_mounts"] == {"~/mta_ray": "."}
    setup = " ".join(doc["setup_commands"])
    assert "~/mta_ray" in setup and "|| true" not in setup and "set -e" in setup


def test_readme_and_job_docstrings_submit_with_the_tested_runtime_env():
    import json

    from tests.test_submit import rayjob_runtime_env

    flag = f"--runtime-env-json '{json.dumps(rayjob_runtime_env())}'"
    readme = (ROOT / "README.md").read_text()
    assert flag in readme and "--working-dir ." in readme
    for job in ("run_pipeline", "personalize", "bench_throughput"):
        assert flag in (ROOT / "jobs" / f"{job}.py").read_text(), job
