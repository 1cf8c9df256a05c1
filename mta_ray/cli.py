"""The ``mta-ray`` command line: one sub-command per pipeline stage.

Run: ``mta-ray <command> CONFIG [--out DIR] [key=value ...]``, e.g.
``mta-ray run configs/demo.yaml --out runs/demo``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

from mta_ray.config import Config, load_config
from mta_ray.core.methods import PROPOSED, TRAINED
from mta_ray.errors import InputError, one_line

OVERVIEW = """\
Merge-then-Adapt (MTA) personalisation of an LLM for every user, on Ray.

Stages (each reads the previous one's files in --out and skips work already done):
  prepare      LaMP / processed / synthetic users -> users.parquet
  embed        sentence-encoder embeddings per user -> embeddings.parquet
  cluster      K-Means over users, one anchor per cluster -> anchors.parquet
  bank         one LoRA per anchor (Ray actors) -> bank/
  personalize  merge top-K anchors + train a stacked rank-4 adapter per user -> adapters/
  evaluate     LaMP metrics for MTA and baselines -> report.json, report.md
  run          all of the above in order
  bench        throughput / scalability / pipeline (GPU memory, GPUs) / memory (driver) / evaluate -> JSON
  export       every user's personalised model as a vLLM-loadable PEFT adapter (+ index, prompt recipe)
  study        real-data study (2-fold cross-banking, validation-chosen settings,
               every baseline and ablation, bootstrap CIs, plots)

Every command takes a YAML config (see configs/) and key=value overrides,
e.g. `mta-ray prepare configs/lamp/lamp2.yaml data.path=FILE adapt.lr=5e-5`.
Bad input is reported on one line and exits with code 2.
"""

def _cmd_prepare(cfg: Config, args: argparse.Namespace) -> int:
    from mta_ray.stages.run import Step, run_step

    t0 = time.time()
    s = run_step(Step("prepare"), cfg, args.out, force=args.force, config_path=args.config)
    if s["skipped"]:
        print(f"prepare: {s['path']} is up to date ({s['users']} users); --force to rebuild")
    else:
        print(f"prepare: {s['users']} users, {s['history_items']} history items, {s['queries']} queries "
              f"({s['task']}) -> {s['path']} in {time.time() - t0:.1f}s")
    return 0


def _stage(stage: str) -> Callable[[Config, argparse.Namespace], int]:
    """A command that runs one stage through the stage runner and prints its summary."""
    def run(cfg: Config, args: argparse.Namespace) -> int:
        from mta_ray.stages.run import Step, run_step

        step = Step(stage, getattr(args, "kind", ""))
        print(f"{args.command}: {run_step(step, cfg, args.out, force=args.force, config_path=args.config)}")
        return 0
    return run


def _cmd_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from mta_ray.files.layout import RunLayout
    from mta_ray.stages.evaluate import render_markdown, required_kinds
    from mta_ray.stages.run import Step, run_step

    if args.report_only:
        from mta_ray.stages.evaluate import build_report

        print(render_markdown(build_report(cfg, args.out, _previous_timing(args.out))))
        return 0
    missing = [k for k in required_kinds(cfg) if not RunLayout(args.out).store(k).exists()]
    if missing:
        raise InputError(str(args.out), f"no adapters for {missing}: run `mta-ray personalize --kind K` "
                                        "for each, or `mta-ray run`")
    print(render_markdown(run_step(Step("evaluate"), cfg, args.out, allow_missing=args.allow_missing,
                                   config_path=args.config)))
    return 0


def _previous_timing(out: Path) -> dict:
    """The timing of the report being rebuilt (the predictions files do not hold it)."""
    import json

    from mta_ray.files.layout import RunLayout

    path = RunLayout(out).report_json
    return json.loads(path.read_text()).get("timing", {}) if path.is_file() else {}


def _cmd_export(cfg: Config, args: argparse.Namespace) -> int:
    from mta_ray.stages.export import run_export

    run = args.run or Path("runs") / Path(args.config).stem
    print(f"export: {run_export(cfg, run, args.out, args.users, where=args.config)}")
    return 0


def _export_users(items: list[str]) -> list[str] | None:
    """``user_id=ID`` / ``users=[A,B]`` of ``mta-ray export`` (they name users, not config keys); None = all."""
    import yaml

    chosen: list[str] | None = None
    for item in items:
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if key == "users" else text
        except yaml.YAMLError:
            value = None
        if key == "users" and (not isinstance(value, list) or not value):
            raise InputError(f"override {item!r}", "users takes a non-empty list, e.g. users=[u1,u2]")
        chosen = (chosen or []) + ([str(v) for v in value] if key == "users" else [value])
    return chosen


BENCHMARKS = {
    "throughput": "multi-slot trainer vs one user at a time (GPU speed of per-user training)",
    "scalability": "MTA vs OPPU time, GPU-hours and storage for N users",
    "pipeline": "every stage's time and peak GPU memory, then personalize (or --part bank-scaling: the bank) "
                "on 1..G GPUs",
    "memory": "each stage's peak driver memory for N and 10N users",
    "evaluate": "time and peak memory of the report's statistics for N queries x M methods (CPU)",
}


def _cmd_bench(cfg: Config, args: argparse.Namespace) -> int:
    from mta_ray.files.layout import save_resolved

    args.out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, args.out, f"bench-{args.kind}" + (f"-{args.part}" if args.kind == "pipeline" else ""))
    if args.kind == "scalability":
        from mta_ray.bench.scalability import run_scalability
        run_scalability(cfg, args.out)
    elif args.kind == "memory":
        from mta_ray.bench.memory import run_memory_bench
        run_memory_bench(cfg, args.out, args.config, args.overrides)
    elif args.kind == "evaluate":
        from mta_ray.bench.evaluate import run_evaluate_bench
        run_evaluate_bench(cfg, args.out, args.config, args.overrides)
    elif args.kind == "pipeline":
        from mta_ray.bench.pipeline import run_pipeline_bench
        run_pipeline_bench(cfg, args.out, args.part, args.work)
    else:
        from mta_ray.bench.throughput import run_throughput
        run_throughput(cfg, args.out, profile=args.profile)
    return 0


def _cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from mta_ray.stages.run import run_all

    run_all(cfg, args.out, force_prepare=args.force, allow_missing=args.allow_missing, config_path=args.config)
    return 0


def _cmd_study(cfg: Config, args: argparse.Namespace) -> int:
    report_dir = args.report or args.out / "report"
    if args.report_only:
        from mta_ray.study.report import write_report

        if not (args.out / "plan.json").is_file():
            raise InputError(str(args.out), "no plan.json: run the study first (without --report-only)")
        write_report(cfg, args.out, report_dir)
    else:
        from mta_ray.study.driver import run_study

        run_study(cfg, args.out, report_dir)
    print(f"study: report in {report_dir}/report.md")
    return 0


COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], int], str]] = {
    "prepare": (_cmd_prepare, "read LaMP/processed/synthetic users into <out>/users.parquet"),
    "embed": (_stage("embed"), "embed users' histories (Ray Data)"),
    "cluster": (_stage("cluster"), "K-Means users and pick anchors"),
    "bank": (_stage("bank"), "train one LoRA per anchor (Ray actors)"),
    "personalize": (_stage("personalize"), "merge-then-adapt every user (or train a baseline's adapters)"),
    "evaluate": (_cmd_evaluate, "LaMP metrics for MTA and baselines"),
    "run": (_cmd_run, "all stages in order"),
    "bench": (_cmd_bench, "throughput / scalability / pipeline / memory / evaluate benchmarks"),
    "export": (_cmd_export, "write every personalised user as a vLLM-loadable PEFT adapter"),
    "study": (_cmd_study, "real-data study: cross-banking, validation-chosen settings, baselines, ablations"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mta-ray", description=OVERVIEW,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"mta-ray {name}: {help_text}.",
                           epilog="Overrides are dotted keys of the config, e.g. data.path=FILE "
                                  "merge.top_k=3; unknown keys are errors.")
        if name == "bench":
            p.add_argument("kind", choices=list(BENCHMARKS),
                           help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
        p.add_argument("config", help="YAML config file (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        p.add_argument("--out", type=Path, default=None,
                       help="folder of the exported adapters (default: exported)" if name == "export" else
                       "output folder (default: runs/<config name>)")
        if name == "bench":
            p.add_argument("--profile", action="store_true",
                           help="throughput: also profile the best variant (writes profile.txt)")
            p.add_argument("--part", choices=["all", "stages", "scaling", "bank-scaling"], default="all",
                           help="pipeline: stages (time, peak GPU memory), scaling (personalize on 1..G GPUs), "
                                "all (both), or bank-scaling (the bank on 1..G GPUs)")
            p.add_argument("--work", type=Path, default=None,
                           help="pipeline: work folder to use and keep (default: a temporary one, removed)")
        if name == "evaluate":
            p.add_argument("--report-only", action="store_true",
                           help="rebuild report.json/report.md from <out>/predictions/ alone (no Ray, no model)")
        if name == "personalize":
            p.add_argument("--kind", choices=list(TRAINED), default=PROPOSED,
                           help=f"{PROPOSED} (default), or a baseline's per-user adapters")
        if name == "export":
            p.add_argument("--run", type=Path, default=None,
                           help="the run folder holding bank/ and adapters/ (default: runs/<config name>)")
            p.epilog = ("Exports every personalised user; user_id=ID or users=[ID,ID] picks some. Settings come "
                        "from the run's resolved config (a contradicting override is an error); export.max_rank, "
                        "export.dtype, export.base_name set the written adapters. " + p.epilog)
        if name == "study":
            p.add_argument("--report", type=Path, default=None,
                           help="folder for report.json/report.md/plots (default: <out>/report)")
            p.add_argument("--report-only", action="store_true",
                           help="rebuild the report from <out>'s cached predictions (no Ray, no GPU)")
        if name in ("prepare", "embed", "cluster", "bank", "personalize", "run"):
            p.add_argument("--force", action="store_true",
                           help="retrain outputs made from other settings or data (refused without it); "
                                "prepare: also rebuild an up-to-date users table")
        if name in ("evaluate", "run"):
            p.add_argument("--allow-missing", action="store_true",
                           help="evaluate even when users lack adapters: report them as missing (their "
                                "answers empty, scored as wrong) instead of refusing")
    return parser


def check_paths(cfg: Config, args: argparse.Namespace) -> None:
    """Before any work: ``--out`` (and ``--report``) must be a writable folder or creatable as one, and no
    input may be a file the run writes into ``--out`` (it would overwrite what it reads)."""
    from mta_ray.files.layout import RunLayout, check_writable_folder

    for flag in ("out", "report"):
        if getattr(args, flag, None) is not None:
            check_writable_folder(Path(getattr(args, flag)), f"--{flag}")
    if args.command in ("bench", "export", "study"):
        return
    run = RunLayout(args.out)
    for key, value in (("data.path", cfg.data.path), ("data.outputs_path", cfg.data.outputs_path)):
        if value and cfg.data.format != "synthetic" and run.overwrites(Path(value)):
            raise InputError(key, f"{value} lies in --out {args.out}, where the run writes its outputs: "
                                  "move the input out of the run folder, or choose another --out")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(args.overrides) + extra  # key=value may also follow --out
    if args.command == "export":  # user_id=... / users=[...] name users, they are not config keys
        picks = [o for o in args.overrides if o.startswith(("user_id=", "users="))]
        args.overrides = [o for o in args.overrides if o not in picks]
    if args.out is None:
        args.out = (Path("bench/results") if args.command == "bench" else
                    Path("exported") if args.command == "export" else Path("runs") / Path(args.config).stem)
    try:
        if args.command == "export":
            args.users = _export_users(picks)
        cfg = load_config(args.config, args.overrides)
        check_paths(cfg, args)
        handler, _ = COMMANDS[args.command]
        return handler(cfg, args)
    except Exception as exc:  # noqa: BLE001 - input, file-system and Ray worker errors become one line
        reported = one_line(exc)
        if reported is None or os.environ.get("MTA_RAY_TRACEBACK") == "1":
            raise
        print(reported[0], file=sys.stderr)
        return reported[1]
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
