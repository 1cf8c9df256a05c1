"""Readers of the user sources (LaMP, processed JSON, synthetic) into user dicts, with strict validation.

Formats:
- ``lamp``: official ``*_questions.json`` ``[{id, input, profile: [...]}]`` and
  ``*_outputs.json`` ``{task, golds: [{id, output}]}``. A question's user is its
  ``user_id`` field when present, else the question id (LaMP has one question per user).
- ``processed``: ``[{user_id, profile: [...], query: [{id, input, gold}]}]``.
- ``synthetic``: the embedded demo benchmark (:mod:`mta_ray.files.synthetic`).

Every problem is an :class:`InputError` naming the file and the user.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Iterator

from mta_ray.config import DataConfig
from mta_ray.core.tasks import Task, get_task
from mta_ray.errors import InputError

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct (``json`` keeps the last of duplicates without a word)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def read_json(path: Path) -> Any:
    if not path.exists():
        raise InputError(str(path), "file not found")
    if not path.is_file():
        raise InputError(str(path), "not a regular file")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise InputError(str(path), f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise InputError(str(path), f"duplicate key {exc.args[0]!r} in a JSON object (one would be lost)") from None
    except UnicodeDecodeError:
        raise InputError(str(path), "not UTF-8 text") from None
    except OSError as exc:
        raise InputError(str(path), f"cannot read: {exc.strerror or exc}") from None


def _need(obj: Any, key: str, where: str, what: str) -> Any:
    if not isinstance(obj, dict):
        raise InputError(where, f"{what} must be a JSON object")
    if key not in obj:
        raise InputError(where, f"{what}: missing key {key!r}")
    return obj[key]


def _text(value: Any, where: str, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(where, f"{what} must be text, got {type(value).__name__}")
    return str(value)


SCORE_RANGE = (1.0, 5.0)
"""LaMP-3 review scores (golds and profile items)."""


def _output(value: Any, task: Task, where: str, what: str) -> str:
    """A gold or profile output; a regression task's (LaMP-3) must be a score in 1..5."""
    text = _text(value, where, what)
    if task.kind == "regression":
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if not SCORE_RANGE[0] <= number <= SCORE_RANGE[1]:
            raise InputError(where, f"{what} must be a score from 1 to 5, got {text!r}")
    return text


def _distinct(ids: list[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise InputError(where, f"{what}: duplicate id {i!r}")
        seen.add(i)


def _items(profile: Any, task: Task, where: str, who: str) -> list[dict[str, str]]:
    if not isinstance(profile, list):
        raise InputError(where, f"{who}: profile must be a list")
    if not profile:
        raise InputError(where, f"{who}: empty history (profile has no items)")
    in_key, out_key = task.profile_fields
    items = []
    for j, raw in enumerate(profile):
        what = f"{who}, profile item {j}"
        if isinstance(raw, dict) and "input" in raw and "output" in raw and in_key not in raw:
            in_key_j, out_key_j = "input", "output"
        else:
            in_key_j, out_key_j = in_key, out_key
        items.append({
            "id": _text(raw.get("id", j) if isinstance(raw, dict) else j, where, f"{what} id"),
            "input": _text(_need(raw, in_key_j, where, what), where, f"{what} {in_key_j}"),
            "output": _output(_need(raw, out_key_j, where, what), task, where, f"{what} {out_key_j}"),
        })
    _distinct([it["id"] for it in items], where, f"{who} profile")
    return items


def _check_user_id(raw: Any, where: str, index: int) -> str:
    user_id = _text(raw, where, f"user #{index} user_id")
    if not SAFE_ID.fullmatch(user_id) or user_id in {".", ".."}:
        raise InputError(where, f"user #{index}: user_id {user_id!r} is not a safe file name "
                                "(letters, digits, '.', '_', '-'; at most 128)")
    return user_id


def _finish(users: list[dict], where: str, task: Task, max_users: int) -> list[dict]:
    seen: set[str] = set()
    for u in users:
        if u["user_id"] in seen:
            raise InputError(where, f"duplicate user_id {u['user_id']!r}")
        seen.add(u["user_id"])
        u["task"] = task.name
    if not users:
        raise InputError(where, "no users")
    return users[:max_users] if max_users else users


def read_processed(path: Path, task: Task, max_users: int = 0) -> list[dict]:
    where = str(path)
    raw = read_json(path)
    if not isinstance(raw, list):
        raise InputError(where, "expected a JSON list of users [{user_id, profile, query}]")
    users = []
    for i, entry in enumerate(raw):
        user_id = _check_user_id(_need(entry, "user_id", where, f"user #{i}"), where, i)
        who = f"user {user_id!r}"
        history = _items(_need(entry, "profile", where, who), task, where, who)
        queries_raw = _need(entry, "query", where, who)
        if isinstance(queries_raw, dict):
            queries_raw = [queries_raw]
        if not isinstance(queries_raw, list):
            raise InputError(where, f"{who}: query must be a list")
        queries = []
        for j, q in enumerate(queries_raw):
            what = f"{who}, query {j}"
            queries.append({
                "id": _text(_need(q, "id", where, what), where, f"{what} id"),
                "input": _text(_need(q, "input", where, what), where, f"{what} input"),
                "gold": _output(_need(q, "gold", where, what), task, where, f"{what} gold"),
            })
        _distinct([q["id"] for q in queries], where, f"{who} queries")
        users.append({"user_id": user_id, "history": history, "queries": queries})
    return _finish(users, where, task, max_users)


def _lamp_paths(path: Path, outputs_path: str) -> tuple[Path, Path]:
    if path.is_dir():
        qs = sorted(path.glob("*questions*.json"))
        if len(qs) != 1:
            raise InputError(str(path), f"expected one *questions*.json in the folder, found {len(qs)}")
        path = qs[0]
    if outputs_path:
        return path, Path(outputs_path)
    if "questions" not in path.name:
        raise InputError(str(path), "cannot find the outputs file: set data.outputs_path")
    return path, path.with_name(path.name.replace("questions", "outputs"))


def read_lamp(path: Path, outputs_path: str, task: Task, max_users: int = 0) -> list[dict]:
    qpath, opath = _lamp_paths(path, outputs_path)
    questions = read_json(qpath)
    outputs = read_json(opath)
    where_q, where_o = str(qpath), str(opath)
    if not isinstance(questions, list):
        raise InputError(where_q, "expected a JSON list of questions [{id, input, profile}]")
    golds_raw = _need(outputs, "golds", where_o, "outputs file")
    if not isinstance(golds_raw, list):
        raise InputError(where_o, "golds must be a list")
    declared = str(outputs.get("task", "")).lower().replace("_", "")
    if declared and declared != task.name:
        raise InputError(where_o, f"outputs are for task {outputs['task']!r}, config says {task.name!r}")
    golds = {}
    for j, g in enumerate(golds_raw):
        gid = _text(_need(g, "id", where_o, f"gold {j}"), where_o, f"gold {j} id")
        if gid in golds:
            raise InputError(where_o, f"gold {j}: duplicate id {gid!r}")
        golds[gid] = _output(_need(g, "output", where_o, f"gold {j}"), task, where_o, f"gold {j} output")
    by_user: dict[str, dict] = {}
    seen_q: set[str] = set()
    for i, q in enumerate(questions):
        qid = _text(_need(q, "id", where_q, f"question #{i}"), where_q, f"question #{i} id")
        if qid in seen_q:
            raise InputError(where_q, f"question #{i}: duplicate question id {qid!r}")
        seen_q.add(qid)
        user_id = _check_user_id(q.get("user_id", qid) if isinstance(q, dict) else qid, where_q, i)
        who = f"user {user_id!r}"
        if qid not in golds:
            raise InputError(where_o, f"no gold output for question id {qid!r}")
        history = _items(_need(q, "profile", where_q, who), task, where_q, who)
        query = {"id": qid, "input": _text(_need(q, "input", where_q, who), where_q, f"{who} input"),
                 "gold": golds[qid]}
        if user_id in by_user:
            if by_user[user_id]["history"] != history:
                raise InputError(where_q, f"question #{i} ({qid!r}): {who} has another profile than in an "
                                          "earlier question (one of them would be lost)")
            by_user[user_id]["queries"].append(query)
        else:
            by_user[user_id] = {"user_id": user_id, "history": history, "queries": [query]}
    return _finish(list(by_user.values()), where_q, task, max_users)


def _task(cfg: DataConfig) -> Task:
    try:
        return get_task(cfg.task)
    except KeyError as exc:
        raise InputError("data.task", str(exc.args[0])) from None


def iter_users(cfg: DataConfig) -> Iterator[dict]:
    """Users of the configured source one at a time: synthetic users are generated as they are written
    (any number, flat memory); LaMP/processed JSON is one document, parsed (and validated) whole first."""
    if cfg.format != "synthetic":
        yield from read_users(cfg)
        return
    from mta_ray.files.synthetic import generate_users

    task = _task(cfg)
    n = cfg.synthetic.num_users if not cfg.max_users else min(cfg.max_users, cfg.synthetic.num_users)
    for u in itertools.islice(generate_users(cfg.synthetic, task), n):  # ids are unique by construction
        u["task"] = task.name
        yield u


def read_users(cfg: DataConfig) -> list[dict]:
    """Users of the configured source as plain dicts (user_id, task, history, queries)."""
    task = _task(cfg)
    if cfg.format == "synthetic":
        from mta_ray.files.synthetic import generate_users
        return _finish(list(generate_users(cfg.synthetic, task)), "data.synthetic", task, cfg.max_users)
    if not cfg.path:
        raise InputError("data.path", f"required for data.format={cfg.format}")
    path = Path(cfg.path)
    if cfg.format == "processed":
        return read_processed(path, task, cfg.max_users)
    return read_lamp(path, cfg.outputs_path, task, cfg.max_users)
