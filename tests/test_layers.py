"""The package's import rules: the folders are layers, and no layer reaches above itself.

    core (pure functions)  <  config, errors (the frame)  <  files  <  engine  <  stages  <  bench, study  <  cli

- no module imports a module of a higher layer (function-level imports count too);
- core imports nothing of the package outside core, and neither Ray nor anything that touches files;
- only engine, stages, bench and study import Ray;
- stages never import each other, except the runner (``stages/run.py``) that calls them all;
- bench and study never import each other.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mta_ray"
RANK = {"core": 0, "config": 1, "config_ranges": 1, "errors": 1, "files": 2, "engine": 3, "stages": 4, "bench": 5, "study": 5,
        "cli": 6, "": 6}
RAY_LAYERS = {"engine", "stages", "bench", "study"}
CORE_FORBIDDEN = ("ray", "safetensors", "pyarrow", "shutil", "tempfile", "sentence_transformers", "transformers")


def layer(module: str) -> str:
    """``mta_ray.stages.bank`` -> ``stages``; ``mta_ray.config`` -> ``config``; ``mta_ray`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported(source: str) -> list[str]:
    """Every module name an import statement in ``source`` names (anywhere in it)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"relative import 'from {'.' * node.level}{node.module or ''}': use mta_ray.<layer>")
            names.append(node.module or "")
    return names


def violations(module: str, source: str) -> list[str]:
    """The import rules ``module`` (dotted name) breaks, one line each."""
    mine = layer(module)
    found = []
    for name in imported(source):
        top = name.split(".")[0]
        if top == "ray" and mine not in RAY_LAYERS:
            found.append(f"{module} imports {name}: only {sorted(RAY_LAYERS)} import Ray")
        if mine == "core" and top in CORE_FORBIDDEN:
            found.append(f"{module} imports {name}: core is pure (no Ray, no files)")
        if top != "mta_ray":
            continue
        theirs = layer(name)
        if mine == "core" and theirs != "core":
            found.append(f"{module} imports {name}: core imports only core")
        elif RANK.get(theirs, 6) > RANK[mine] or (theirs != mine and RANK.get(theirs) == RANK[mine] == 5):
            found.append(f"{module} imports {name}: {theirs} is above {mine or 'mta_ray'}")
        elif mine == theirs == "stages" and module != "mta_ray.stages.run" and name != "mta_ray.stages":
            found.append(f"{module} imports {name}: stages never import each other (only stages.run calls them)")
    return found


def package_modules() -> dict[str, str]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path.read_text()
    return out


def test_every_module_sits_in_a_known_layer():
    unknown = [m for m in package_modules() if layer(m) not in RANK]
    assert not unknown, f"modules outside the layers: {unknown}"


def test_no_module_breaks_the_import_rules():
    broken = [v for m, src in package_modules().items() for v in violations(m, src)]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("module,source", [
    ("mta_ray.core.lora", "from mta_ray.files.store import AdapterStore"),
    ("mta_ray.core.lora", "import ray"),
    ("mta_ray.core.lora", "def f():\n    import safetensors.torch"),
    ("mta_ray.files.store", "def f():\n    from mta_ray.engine.trainer import Job"),
    ("mta_ray.files.tables", "import ray"),
    ("mta_ray.stages.bank", "from mta_ray.stages.personalize import run_personalize"),
    ("mta_ray.stages.evaluate", "from mta_ray.bench.common import measure"),
    ("mta_ray.bench.pipeline", "from mta_ray.study.report import Results"),
    ("mta_ray.engine.workers", "from mta_ray.stages.bank import run_bank"),
    ("mta_ray.config", "from mta_ray.files.layout import RunLayout"),
])
def test_the_checker_catches_a_broken_rule(module, source):
    assert violations(module, source)


def test_the_runner_and_upper_layers_may_import_downwards():
    assert not violations("mta_ray.stages.run", "from mta_ray.stages.bank import run_bank")
    assert not violations("mta_ray.study.driver", "from mta_ray.stages.bank import run_bank\nimport ray")
    assert not violations("mta_ray.cli", "from mta_ray.study.driver import run_study")
