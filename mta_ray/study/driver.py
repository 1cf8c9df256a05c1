"""``mta-ray study``: MTA against every baseline and ablation on real users, with honest statistics.

What it does (settings in ``study:`` of the config, see :class:`mta_ray.config.StudyConfig`):

- **Cross-banking.** The users are split into ``folds`` folds (seeded). A fold's users are tested
  with a bank built only from the other folds' users (their full histories): bank users and test
  users are always disjoint, as in the paper, although all come from one test set.
- **Settings.** Per user, a seeded permutation of its history picks ``validation_items`` items
  (validation queries) and ``extended_items`` other items (extended-protocol queries).
  ``val``: train without the validation items, query them. ``paper``: train on everything, query
  the one LaMP query. ``extended``: train without the extended items, query them and the LaMP query.
- **Choice on validation only.** Greedy, one factor at a time, best accuracy (ties: macro-F1, then
  the earlier candidate): bank (anchor data x bank lr) -> merge space -> top-K -> alpha (adaptive or
  fixed), all scored by merged-only (the merge on its own); then the stacked adapter's lr -> rank,
  scored by MTA; OPPU's and adapt-only's lr by themselves. The test protocols then run the chosen
  configuration, every baseline, and one-factor studies around the choice. ``select: fixed`` skips the
  search and reuses ``fixed_from``'s choice (a committed report) or the config's own settings.
- **Profiles and bank size.** ``profiles``: lean MTA profiles (:mod:`mta_ray.core.profiles`) run on
  every protocol next to the paper recipe; ``bank_folds``: merged-only, MTA and adapt-only on the paper
  protocol with each fold count (bigger banks), in ``<out>/folds-N``. Report: :mod:`mta_ray.study.profiles`.
- **Everything through the pipeline.** The real stages (embed on Ray Data, cluster, bank,
  personalize, evaluate's generation) on one pool of resident-model Ray workers kept for the whole
  study. Each evaluated run's predictions are cached in ``<out>/preds/``, so a rerun (or a second
  call on a fresh machine with ``preds/`` carried over) resumes where it stopped.

Report: :mod:`mta_ray.study.report` (``report.json``, ``report.md``, PNG plots).

Run: ``mta-ray study configs/study/lamp2.yaml data.path=../shared/data/lamp2-movie-tagging-72users.json
--out runs/lamp2-study --report results/lamp2``; the profiles and the bank-size curve without the search:
``mta-ray study configs/study/lamp2-profiles.yaml data.path=... --out runs/lamp2-profiles
--report results/lamp2/profiles``
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mta_ray.config import Config, to_dict, with_values
from mta_ray.core.methods import AROUND_MTA, BASELINES, MERGING, PROPOSED, method
from mta_ray.core.profiles import profile
from mta_ray.core.tasks import get_task
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_write_text
from mta_ray.files.layout import RunLayout, save_resolved
from mta_ray.files.precision import adapter_size
from mta_ray.files.sources import read_users
from mta_ray.files.tables import load_users, write_users
from mta_ray.study.report import canonical, ranking, run_metrics

SETTINGS = ("val", "paper", "extended")
MERGE_KEYS = ("bank.anchor_data", "bank.lr", "merge.space", "merge.top_k", "merge.fixed_alpha")
RECIPE_KEYS = {"adapt": ("adapt.lr", "adapt.rank", "adapt.alpha"), "oppu": ("oppu.lr",)}


def relevant(name: str) -> tuple[str, ...]:
    """The study settings a method's runs depend on (a run's identity = method + these values)."""
    m = method(name)
    return (MERGE_KEYS if m.merges else ()) + RECIPE_KEYS.get(m.recipe or "", ())


# --------------------------------------------------------------------------- users per setting

def fold_of(user_ids: list[str], folds: int, seed: int) -> dict[str, int]:
    """Seeded, balanced assignment of users to folds."""
    order = np.random.default_rng(seed).permutation(sorted(user_ids))
    return {str(u): i % folds for i, u in enumerate(order)}


def held_out(user: dict, n_val: int, n_ext: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a user's validation and extended items: disjoint, seeded by the user id."""
    n = len(user["history"])
    if n < n_val + n_ext + 1:
        raise InputError(f"user {user['user_id']!r}",
                         f"{n} history items: need at least {n_val + n_ext + 1} for the study's held-out items")
    perm = np.random.default_rng([seed, zlib.crc32(user["user_id"].encode())]).permutation(n).tolist()
    return sorted(perm[:n_val]), sorted(perm[n_val:n_val + n_ext])


def setting_users(users: list[dict], setting: str, n_val: int, n_ext: int, seed: int) -> list[dict]:
    """The users as one setting sees them: the history it trains on and the queries it asks."""
    out = []
    for u in users:
        val, ext = held_out(u, n_val, n_ext, seed)
        hidden = {"val": val, "paper": [], "extended": ext}[setting]
        items = [{"id": f"{u['user_id']}/h{i}", "input": u["history"][i]["input"], "gold": u["history"][i]["output"]}
                 for i in hidden]
        queries = items if setting == "val" else u["queries"] + items
        out.append({**u, "history": [it for i, it in enumerate(u["history"]) if i not in hidden],
                    "queries": queries})
    return out


def study_hash(cfg: Config) -> str:
    """Everything that changes a prediction (not where the model file lies, nor Ray's placement)."""
    d = to_dict(cfg)
    for volatile in ("ray", "bench"):
        d.pop(volatile)
    # the grids decide which runs happen, not what any run predicts: only the held-out split counts
    d["study"] = {k: d["study"][k] for k in ("folds", "validation_items", "extended_items")}
    d["model"] = {k: v for k, v in d["model"].items() if k not in ("base", "gguf_file", "cache_dir")}
    d["model"]["base_name"] = Path(cfg.model.base).name
    d["embed"] = {k: (Path(v).name if k.endswith("encoder") else v) for k, v in d["embed"].items()}
    d["data"]["path"] = Path(cfg.data.path).name
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- runs

@dataclass(frozen=True)
class Run:
    """One evaluated variant: a method with settings, on one setting, over all folds."""

    setting: str
    method: str
    values: tuple = ()
    """Sorted (dotted key, value) pairs that define it (only those relevant to the method)."""

    @property
    def name(self) -> str:
        return self.method + ("[" + ",".join(f"{k}={_text(v)}" for k, v in self.values) + "]" if self.values else "")

    def config_values(self) -> dict[str, Any]:
        """The values as config settings (lists were kept as tuples so that a run can be hashed)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.values}

    @property
    def key(self) -> str:
        return hashlib.sha1(f"{self.setting}/{self.name}".encode()).hexdigest()[:16]


def _text(v: Any) -> str:
    return "[" + ",".join(map(str, v)) + "]" if isinstance(v, tuple) else str(v)


def make_run(setting: str, method: str, choice: dict[str, Any], **changes: Any) -> Run:
    values = canonical({**choice, **{k.replace("__", "."): v for k, v in changes.items()}})
    keys = relevant(method) + (("model.dtype",) if "model.dtype" in values else ())
    return Run(setting, method, tuple(sorted((k, values[k]) for k in keys)))


def profile_run(setting: str, name: str, choice: dict[str, Any], cfg: Config) -> Run:
    """Profile ``name`` on top of ``choice``: its method's run with the profile's settings. A key the method's
    runs already carry is overridden; any other is added only where it differs from the config, so a profile
    equal to a run made elsewhere (the paper recipe, a rank study) is that same run."""
    p = profile(name)
    base = make_run(setting, p.method, choice)
    values, current = dict(base.values), to_dict(cfg)
    for key, value in p.values.items():
        section, leaf = key.split(".")
        if key in values or current[section][leaf] != value:
            values[key] = tuple(value) if isinstance(value, list) else value
    return Run(setting, p.method, tuple(sorted(values.items())))


@dataclass
class Study:
    cfg: Config
    out: Path
    workers: list | None = None
    pool_dtype: str = ""

    # ------------------------------------------------------------------ folders
    def test_dir(self, setting: str, fold: int) -> Path:
        return self.out / setting / f"fold{fold}"

    def bank_users_dir(self, fold: int) -> Path:
        """Users of every fold but ``fold``: the bank that ``fold``'s users are tested with."""
        return self.out / "banks" / f"for-fold{fold}"

    def bank_dir(self, cfg: Config, fold: int) -> Path:
        return self.bank_users_dir(fold) / f"bank-{cfg.bank.anchor_data}-lr{cfg.bank.lr:g}"

    def preds_path(self, run: Run) -> Path:
        return self.out / "preds" / run.setting / f"{run.key}.json"

    # ------------------------------------------------------------------ set-up
    def check_folder(self) -> None:
        """A work folder belongs to one set of settings: cached predictions are only valid for them."""
        h = study_hash(self.cfg)
        stamp = self.out / "study.hash"
        if stamp.is_file() and stamp.read_text().strip() != h:
            raise InputError(str(self.out), "made by a study with other settings; use a new --out (or delete it)")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, h + "\n")

    def prepare(self) -> dict:
        """users.parquet for every (setting, fold) and every bank; embeddings; clusters."""
        from mta_ray.stages.cluster import run_cluster
        from mta_ray.stages.embed import run_embed_many

        cfg, st = self.cfg, self.cfg.study
        self.check_folder()
        if get_task(cfg.data.task).name == "lamp1":
            raise InputError("data.task", "the study holds out history items as queries; LaMP-1 items are not queries")
        users = read_users(cfg.data)
        folds = fold_of([u["user_id"] for u in users], st.folds, cfg.seed)
        dirs = []
        for f in range(st.folds):
            mine = [u for u in users if folds[u["user_id"]] == f]
            others = [u for u in users if folds[u["user_id"]] != f]
            bank = self.bank_users_dir(f)
            bank.mkdir(parents=True, exist_ok=True)
            write_users(others, RunLayout(bank).users)
            dirs.append(bank)
            for s in SETTINGS:
                d = self.test_dir(s, f)
                d.mkdir(parents=True, exist_ok=True)
                write_users(setting_users(mine, s, st.validation_items, st.extended_items, cfg.seed),
                            RunLayout(d).users)
                dirs.append(d)
        emb = run_embed_many(cfg, dirs)
        for f in range(st.folds):
            run_cluster(cfg, self.bank_users_dir(f))
        atomic_write_text(self.out / "folds.json", json.dumps(folds, indent=1, sort_keys=True))
        save_resolved(cfg, self.out, "study")
        return {"users": len(users), "folds": st.folds, "embed": emb}

    def pool(self, dtype: str) -> list:
        """The resident-model workers, (re)started when the model's dtype changes."""
        from mta_ray.engine.raysetup import init_ray
        from mta_ray.engine.workers import start_workers

        if self.workers is None or dtype != self.pool_dtype:
            self.close()
            init_ray(self.cfg)
            self.workers = start_workers(with_values(self.cfg, {"model.dtype": dtype}), None)
            self.pool_dtype = dtype
        return self.workers

    def close(self) -> None:
        from mta_ray.engine.workers import stop_workers

        stop_workers(self.workers)
        self.workers = None

    # ------------------------------------------------------------------ one run
    def run(self, run: Run) -> dict:
        """Train (if the method trains) and evaluate one variant on every fold; cached."""
        path = self.preds_path(run)
        if path.is_file():
            return json.loads(path.read_text())
        from mta_ray.stages.bank import run_bank
        from mta_ray.stages.evaluate import predict
        from mta_ray.stages.personalize import retrieval_plan, run_personalize

        cfg = with_values(self.cfg, run.config_values())
        workers = self.pool(cfg.model.dtype)
        task = get_task(cfg.data.task)
        t0 = time.time()
        rows: list[dict] = []
        train_s = eval_s = 0.0
        size: dict = {}
        bytes_per_user: list[float] = []
        for f in range(cfg.study.folds):
            d = self.test_dir(run.setting, f)
            bank = self.bank_dir(cfg, f) if run.method in MERGING else None
            if bank is not None and "model.dtype" not in dict(run.values):  # a dtype check reuses the bank
                run_bank(cfg, self.bank_users_dir(f), workers, bank)
            users = load_users(RunLayout(d).users, ["user_id", "history", "queries"]).to_pylist()
            plan = retrieval_plan(cfg, d, [u["user_id"] for u in users], bank) if bank else {}
            label = f"study-{run.key}"
            t1 = time.time()
            trains = method(run.method).trained
            store = RunLayout(d).store(label)
            if trains:
                shutil.rmtree(store, ignore_errors=True)  # a half-finished earlier attempt
                run_personalize(cfg, d, run.method, workers, label=label, bank_dir=bank)
                bytes_per_user.append(sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / len(users))
                size = adapter_size(store)  # at the store's precision (int8 profiles write int8)
            t2 = time.time()
            reqs, texts = predict(cfg, d, run.method, users, plan, workers, label=label, bank_dir=bank)
            eval_s += time.time() - t2
            train_s += t2 - t1
            if trains:
                shutil.rmtree(store, ignore_errors=True)  # predictions are what the study keeps
            for r, text in zip(reqs, texts):
                u = users[r["user"]]
                rows.append({"user_id": u["user_id"], "fold": f, "output": text, "pred": task.parse_output(text),
                             "gold": r["gold"], "anchors": plan.get(u["user_id"], ([], []))[0]})
        result = {"setting": run.setting, "method": run.method, "name": run.name, "values": dict(run.values),
                  "rows": rows, "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
                  "seconds": round(time.time() - t0, 1),
                  "adapter_bytes_per_user": round(float(np.mean(bytes_per_user)), 1) if bytes_per_user else 0,
                  "adapter_size": size}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result) + "\n")
        m = run_metrics(task, rows)
        print(f"study: {run.setting} {run.name}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items())
              + f" ({result['seconds']}s)", flush=True)
        return result


# --------------------------------------------------------------------------- the procedure

def choose(study: Study, task, method: str, choice: dict, key_values: list[dict]) -> tuple[dict, list[dict]]:
    """Try each candidate (a dict of changes) on validation; keep the best; return it and the table."""
    table, best, best_score = [], None, None
    for changes in key_values:
        result = study.run(make_run("val", method, {**choice, **changes}))
        sc = ranking(task, run_metrics(task, result["rows"]))
        table.append({"method": method, "changes": changes, "score": list(sc)})
        if best_score is None or sc > best_score:  # strict: ties keep the earlier candidate
            best, best_score = changes, sc
    return {**choice, **best}, table


def run_study(cfg: Config, out: Path, report_dir: Path) -> dict:
    """The whole study: prepare, choose on validation (or take the fixed settings), run every test and the
    bank-size curve, write the report."""
    from mta_ray.study.report import write_report

    st = cfg.study
    fixed = fixed_choice(cfg) if st.select == "fixed" else None  # a bad fixed_from fails before any work
    study = Study(cfg, out)
    t0 = time.time()
    print(f"study: prepare {study.prepare()}", flush=True)
    sizes = bank_size_studies(study)  # prepared before any worker holds a GPU (embedding needs one)
    try:
        if fixed is not None:
            chosen, ao = fixed
            selection: list[dict] = []
            print(f"study: fixed settings ({st.fixed_from or 'the config'}): {chosen}", flush=True)
        else:
            chosen, ao, selection = select_on_validation(study)
            print(f"study: chosen on validation: {chosen} (adapt-only lr {ao['adapt.lr']})", flush=True)
        tests = run_tests(study, chosen, ao)
        bank_size = run_bank_size(study, sizes, chosen, ao)
    finally:
        study.close()
    plan = {"chosen": chosen, "adapt_only_lr": ao["adapt.lr"], "selection": selection,
            "select": st.select, "fixed_from": st.fixed_from,
            "tests": {p: [r.key for r in runs] for p, runs in tests.items()},
            "profiles": {p: profile_keys(p, chosen, ao, cfg) for p in st.protocols},
            "bank_size": bank_size, "seconds": round(time.time() - t0, 1)}
    atomic_write_text(out / "plan.json", json.dumps(plan, indent=1, default=str) + "\n")
    return write_report(cfg, out, report_dir)


def _first(default: Any, values: list) -> list:
    """The candidates with the current default first, so that it wins ties."""
    return [default] + [v for v in values if v != default]


def profile_keys(protocol: str, chosen: dict, ao: dict, cfg: Config) -> dict[str, str]:
    """Run keys of the paper recipe, each profile of ``study.profiles``, OPPU and adapt-only (the report's rows);
    the training-free profile always, as it is the merged-only baseline every study runs."""
    names = dict.fromkeys(("mta", *cfg.study.profiles, "mta-merged-only"))
    keys = {name: profile_run(protocol, name, chosen, cfg).key for name in names}
    keys["oppu"] = make_run(protocol, "oppu", chosen).key
    keys["adapt_only"] = make_run(protocol, "adapt_only", ao).key
    return keys


def config_choice(cfg: Config) -> dict[str, Any]:
    """The config's own values of every setting the study chooses."""
    return {"bank.anchor_data": cfg.bank.anchor_data, "bank.lr": cfg.bank.lr, "merge.space": cfg.merge.space,
            "merge.top_k": cfg.merge.top_k, "merge.fixed_alpha": cfg.merge.fixed_alpha,
            "adapt.lr": cfg.adapt.lr, "adapt.rank": cfg.adapt.rank, "adapt.alpha": cfg.adapt.alpha,
            "oppu.lr": cfg.oppu.lr}


def fixed_choice(cfg: Config) -> tuple[dict, dict]:
    """``select: fixed``: (MTA's settings, adapt-only's) from ``study.fixed_from``'s report, or the config's."""
    choice = config_choice(cfg)
    src = cfg.study.fixed_from
    if not src:
        return choice, choice
    path = Path(src) / "report.json" if Path(src).is_dir() else Path(src)
    try:
        report = json.loads(path.read_text())
        chosen, ao_lr = report["chosen_on_validation"], report["adapt_only_lr"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(str(path), "study.fixed_from: not a study report.json with chosen_on_validation "
                                    "and adapt_only_lr") from None
    unknown = sorted(set(chosen) - set(choice))
    if unknown:
        raise InputError(str(path), f"study.fixed_from: unknown settings {unknown}")
    chosen = canonical({**choice, **chosen})
    with_values(cfg, chosen, str(path))  # validated like a config file
    return chosen, {**chosen, "adapt.lr": ao_lr}


def select_on_validation(study: Study) -> tuple[dict, dict, list[dict]]:
    """Greedy, one factor at a time on validation queries: (MTA's chosen settings, adapt-only's, the table)."""
    cfg, st = study.cfg, study.cfg.study
    task = get_task(cfg.data.task)
    choice: dict[str, Any] = config_choice(cfg)
    banks = [{"bank.anchor_data": a, "bank.lr": lr} for a in _first(choice["bank.anchor_data"], st.anchor_data)
             for lr in _first(choice["bank.lr"], st.bank_lrs)]
    selection: list[dict] = []

    def step(method_name: str, candidates: list[dict], base: dict) -> dict:
        chosen, table = choose(study, task, method_name, base, candidates)
        selection.extend(table)
        return chosen

    choice = step("merged_only", banks, choice)
    choice = step("merged_only", [{"merge.space": s} for s in _first(choice["merge.space"], st.spaces)], choice)
    choice = step("merged_only", [{"merge.top_k": k} for k in _first(choice["merge.top_k"], st.top_k)], choice)
    if choice["merge.top_k"] > 1:
        choice = step("merged_only", [{"merge.fixed_alpha": a} for a in _first(None, st.alphas)], choice)
    choice = step(PROPOSED, [{"adapt.lr": v} for v in _first(choice["adapt.lr"], st.adapt_lrs)], choice)
    choice = step(PROPOSED, [{"adapt.rank": r, "adapt.alpha": 2.0 * r}
                             for r in _first(choice["adapt.rank"], st.ranks)], choice)
    chosen = step("oppu", [{"oppu.lr": v} for v in _first(choice["oppu.lr"], st.oppu_lrs)], choice)
    ao = step("adapt_only", [{"adapt.lr": v} for v in _first(choice["adapt.lr"], st.adapt_lrs)], chosen)
    return chosen, ao, selection


def run_tests(study: Study, chosen: dict, ao: dict) -> dict[str, list[Run]]:
    """Every protocol's test runs: the chosen MTA, every baseline, and the one-factor studies around it."""
    cfg, st = study.cfg, study.cfg.study
    tests: dict[str, list[Run]] = {}
    for p in st.protocols:
        runs = [make_run(p, m, ao if m == "adapt_only" else chosen) for m in BASELINES + (PROPOSED,)]
        runs += [profile_run(p, name, chosen, cfg) for name in st.profiles]
        if p in st.ablation_protocols:
            runs += _ablations(p, chosen, st)
        tests[p] = list(dict.fromkeys(runs))  # unique, in order
        for r in tests[p]:
            study.run(r)
    if st.dtype_check and _on_gpu(cfg) and "paper" in st.protocols:
        other = "float32" if cfg.model.dtype != "float32" else "bfloat16"
        for m in MERGING:
            r = make_run("paper", m, {**chosen, "model.dtype": other})
            study.run(r)
            tests["paper"].append(r)
    return tests


BANK_SIZE_METHODS = AROUND_MTA
"""What the bank-size curve runs: the merge alone, MTA, and the stacked adapter without the merge."""


def bank_size_studies(study: Study) -> dict[int, Study]:
    """One prepared study per fold count of ``study.bank_folds`` (the main study for its own count); they
    will share the main study's workers."""
    cfg = study.cfg
    sizes: dict[int, Study] = {}
    for n in cfg.study.bank_folds:
        if n == cfg.study.folds:
            sizes[n] = study
            continue
        sub = Study(with_values(cfg, {"study.folds": n}), study.out / f"folds-{n}")
        print(f"study: prepare the {n}-fold bank-size study {sub.prepare()}", flush=True)
        sizes[n] = sub
    return sizes


def run_bank_size(study: Study, sizes: dict[int, Study], chosen: dict, ao: dict) -> dict[str, Any]:
    """Merged-only, MTA and adapt-only on the paper protocol with every fold count: {N: folder, run keys}."""
    out: dict[str, Any] = {}
    for n, sub in sizes.items():
        if sub is not study:  # one pool of workers for all (the fold count does not change a worker)
            sub.workers, sub.pool_dtype = study.workers, study.pool_dtype
        keys = {}
        for m in BANK_SIZE_METHODS:
            run = make_run("paper", m, ao if m == "adapt_only" else chosen)
            sub.run(run)
            keys[m] = run.key
        if sub is not study:
            study.workers, study.pool_dtype = sub.workers, sub.pool_dtype
        out[str(n)] = {"out": str(sub.out.relative_to(study.out)) if sub is not study else ".", "runs": keys}
    return out


def _ablations(protocol: str, chosen: dict, st: Any) -> list[Run]:
    """One-factor studies around the choice: the merging methods' space, anchor data, top-K and alpha,
    and MTA's stacked rank (``study:`` grids)."""
    runs: list[Run] = []
    k_alpha = max(chosen["merge.top_k"], 2)
    for m in MERGING:
        runs += [make_run(protocol, m, chosen, merge__space=s) for s in st.spaces]
        runs += [make_run(protocol, m, chosen, bank__anchor_data=a) for a in st.anchor_data]
        runs += [make_run(protocol, m, chosen, merge__top_k=k) for k in st.top_k]
        runs += [make_run(protocol, m, chosen, merge__top_k=k_alpha, merge__fixed_alpha=a)
                 for a in [None] + list(st.alphas)]
    runs += [make_run(protocol, PROPOSED, chosen, adapt__rank=r, adapt__alpha=2.0 * r) for r in st.ranks]
    return runs


def _on_gpu(cfg: Config) -> bool:
    import ray

    from mta_ray.engine.raysetup import init_ray

    init_ray(cfg)
    return ray.cluster_resources().get("GPU", 0) >= cfg.ray.gpus_per_actor > 0
