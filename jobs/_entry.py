"""Shared argument handling for the job modules: --config, --out, then key=value overrides."""

from __future__ import annotations

import argparse
import sys

from mta_ray.cli import main as cli_main


def run(command: list[str], doc: str, argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--out", required=True, help="output folder (shared storage on a multi-node cluster)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    return cli_main([*command, args.config, "--out", args.out, *args.overrides])


if __name__ == "__main__":
    sys.exit("run one of the jobs.* modules, e.g. python -m jobs.run_pipeline --help")
