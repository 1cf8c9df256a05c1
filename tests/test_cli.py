import subprocess
import sys
from pathlib import Path

import pytest

from mta_ray.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"mta-ray {command}" in out and "key=value" in out


def test_top_level_help_lists_the_stages():
    proc = subprocess.run([sys.executable, "-m", "mta_ray.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for stage in ("prepare", "embed", "cluster", "bank", "personalize", "evaluate", "run", "bench", "export"):
        assert stage in proc.stdout


def test_prepare_synthetic_writes_personas(tmp_path):
    assert main(["prepare", str(ROOT / "configs/demo.yaml"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "personas.json").is_file() and (tmp_path / "prepare.config.yaml").is_file()
