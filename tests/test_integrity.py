"""Runs that never lie (issue 21): each class of bad input or state, fed several members, gives one line
naming the file or setting, exit 2, nothing half-written, nothing lost or silently substituted."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path

import pytest
import torch

from mta_ray import config as config_module
from mta_ray.cli import main
from mta_ray.config import load_config
from mta_ray.errors import InputError, one_line
from mta_ray.files import provenance
from mta_ray.files.layout import RunLayout, verify_bank, write_manifest
from mta_ray.files.store import MAX_ATTEMPTS, AdapterStore
from mta_ray.core.lora import LoraPair

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")
LAMP2 = str(ROOT / "configs/lamp/lamp2.yaml")
LAMP3 = str(ROOT / "configs/lamp/lamp3.yaml")


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def one_error_line(err: str, *parts: str) -> None:
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for p in parts:
        assert p in err, err


# --------------------------------------------------------------------------- class 4: numbers and enums

@pytest.mark.parametrize("override,message", [
    ("adapt.lr=.nan", "adapt.lr must be a finite number"),
    ("bank.lr=.inf", "bank.lr must be a finite number"),
    ("oppu.lr=-1e-4", "oppu.lr must be greater than 0"),
    ("eval.bootstrap=-1", "eval.bootstrap must be at least 1"),
    ("eval.bootstrap=0", "eval.bootstrap must be at least 1"),
    ("bank.num_clusters=0", "bank.num_clusters must be at least 1"),
    ("adapt.dropout=1.0", "adapt.dropout must be in [0, 1)"),
    ("merge.min_similarity=0", "merge.min_similarity must be in (0, 1]"),
    ("merge.fixed_alpha=1.5", "merge.fixed_alpha must be in [0, 1]"),
    ("ray.gpus_per_actor=0", "ray.gpus_per_actor must be greater than 0"),
    ("adapt.shard_users=0", "adapt.shard_users must be at least 1"),
    ("seed=-3", "seed must be at least 0"),
    ("study.alphas=[0.5, 1.5]", "study.alphas must be in [0, 1], got 1.5"),
    ("study.adapt_lrs=[1e-4, .nan]", "study.adapt_lrs must be a finite number"),
    ("bench.gpu_counts=[1, 0]", "bench.gpu_counts must be at least 1"),
    ("data.task=lamp9", "data.task must be one of"),
    ("embed.device=tpu", "embed.device must be one of"),
])
def test_every_bad_number_or_enum_is_refused_when_the_config_is_built(override, message, capsys, tmp_path):
    code, err = cli(capsys, "prepare", DEMO, override, "--out", tmp_path / "o")
    assert code == 2
    one_error_line(err, "demo.yaml", message)
    assert not (tmp_path / "o").exists()


def test_every_numeric_setting_has_a_range():
    """No numeric field of any config section is left without a declared range."""
    missing = []
    for name in dir(config_module):
        cls = getattr(config_module, name)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or cls.__module__ != config_module.__name__:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = typing.get_args(tp)
            numeric = tp in (int, float) or (typing.get_origin(tp) in (list, typing.Union) and
                                             any(a in (int, float) for a in args))
            if numeric and config_module._declared(cls, f.name, config_module.RANGES) is None:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, missing


# --------------------------------------------------------------------------- class 5: data dropped or out of range

GOOD = {"user_id": "u1", "profile": [{"id": "1", "tag": "comedy", "description": "d"}],
        "query": [{"id": "q", "input": "description: x", "gold": "comedy"}]}
GOOD3 = {"user_id": "u1", "profile": [{"id": "1", "text": "great", "score": "5"}],
         "query": [{"id": "q", "input": "review: fine", "gold": "4"}]}

PROCESSED_BAD = [
    (LAMP2, '[{"user_id": "u1", "user_id": "u2", "profile": [], "query": []}]', "duplicate key 'user_id'"),
    (LAMP2, [{**GOOD, "query": GOOD["query"] * 2}], "user 'u1' queries: duplicate id 'q'"),
    (LAMP2, [{**GOOD, "profile": GOOD["profile"] * 2}], "user 'u1' profile: duplicate id '1'"),
    (LAMP2, [{**GOOD, "user_id": "u1\n"}], "is not a safe file name"),
    (LAMP2, [{**GOOD, "user_id": "u1 "}], "is not a safe file name"),
    (LAMP3, [{**GOOD3, "query": [{"id": "q", "input": "r", "gold": "6"}]}], "gold must be a score from 1 to 5, got '6'"),
    (LAMP3, [{**GOOD3, "query": [{"id": "q", "input": "r", "gold": "five"}]}], "got 'five'"),
    (LAMP3, [{**GOOD3, "query": [{"id": "q", "input": "r", "gold": "nan"}]}], "got 'nan'"),
    (LAMP3, [{**GOOD3, "profile": [{"id": "1", "text": "t", "score": 0}]}], "score must be a score from 1 to 5, got '0'"),
]


@pytest.mark.parametrize("cfg,content,message", PROCESSED_BAD)
def test_processed_data_that_would_be_dropped_or_out_of_range(cfg, content, message, tmp_path, capsys):
    path = tmp_path / "users.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "out"
    out.mkdir()
    (out / "users.parquet").write_bytes(b"an earlier table")
    code, err = cli(capsys, "prepare", cfg, "data.format=processed", f"data.path={path}", "--out", out)
    assert code == 2
    one_error_line(err, str(path), message)
    assert (out / "users.parquet").read_bytes() == b"an earlier table"
    assert sorted(p.name for p in out.iterdir()) == ["users.parquet"]


def _official(tmp_path: Path, questions: list, golds: list, task: str = "LaMP_3") -> Path:
    q = tmp_path / "dev_questions.json"
    q.write_text(json.dumps(questions))
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": task, "golds": golds}))
    return q


QUESTION = {"id": "q1", "input": "review: ok", "profile": [{"id": "p", "text": "good", "score": "4"}]}

LAMP_BAD = [
    ([QUESTION, QUESTION], [{"id": "q1", "output": "3"}], "dev_questions.json", "duplicate question id 'q1'"),
    ([QUESTION], [{"id": "q1", "output": "3"}, {"id": "q1", "output": "5"}], "dev_outputs.json",
     "gold 1: duplicate id 'q1'"),
    ([QUESTION], [{"id": "q1", "output": "9"}], "dev_outputs.json", "gold 0 output must be a score from 1 to 5"),
    ([{**QUESTION, "user_id": "a"}, {**QUESTION, "id": "q2", "user_id": "a",
                                     "profile": [{"id": "p", "text": "other", "score": "2"}]}],
     [{"id": "q1", "output": "3"}, {"id": "q2", "output": "3"}], "dev_questions.json", "has another profile"),
    ([{**QUESTION, "user_id": "a\n"}], [{"id": "q1", "output": "3"}], "dev_questions.json", "not a safe file name"),
]


@pytest.mark.parametrize("questions,golds,where,message", LAMP_BAD)
def test_official_lamp_data_that_would_be_dropped_or_out_of_range(questions, golds, where, message, tmp_path, capsys):
    q = _official(tmp_path, questions, golds)
    code, err = cli(capsys, "prepare", LAMP3, f"data.path={q}", "--out", tmp_path / "o")
    assert code == 2
    one_error_line(err, where, message)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- class 6: file-system faults

def test_config_faults(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("data:\n  path: caf\xe9\n".encode("latin-1"))
    code, err = cli(capsys, "prepare", bad, "--out", tmp_path / "o")
    assert code == 2
    one_error_line(err, str(bad), "not UTF-8")
    folder = tmp_path / "cfgdir.yaml"
    folder.mkdir()
    code, err = cli(capsys, "prepare", folder, "--out", tmp_path / "o")
    assert code == 2
    one_error_line(err, str(folder), "not a regular file")
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_under_a_file_or_unwritable(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    for out, message in ((a_file, "--out is a file"), (a_file / "sub" / "run", "which is a file"),
                         (Path("/proc/mta_ray_run"), "--out: cannot write into /proc")):
        code, err = cli(capsys, "prepare", DEMO, "--out", out)
        assert code == 2
        one_error_line(err, str(out), message)
    assert a_file.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_out_and_unreadable_input(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, err = cli(capsys, "prepare", DEMO, "--out", ro / "run")
    assert code == 2
    one_error_line(err, "cannot write")
    data = tmp_path / "u.json"
    data.write_text(json.dumps([GOOD]))
    data.chmod(0)
    code, err = cli(capsys, "prepare", LAMP2, "data.format=processed", f"data.path={data}", "--out", tmp_path / "o")
    assert code == 2
    one_error_line(err, str(data), "cannot read")


def test_inputs_that_the_run_would_overwrite_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    for inside in (out / "users.parquet", out / "bank" / "users.json", out / "report.json",
                   out / "adapters" / "mta" / "x.json"):
        inside.parent.mkdir(parents=True, exist_ok=True)
        inside.write_text(json.dumps([GOOD]))
        code, err = cli(capsys, "prepare", LAMP2, "data.format=processed", f"data.path={inside}", "--out", out)
        assert code == 2
        one_error_line(err, "data.path", "lies in --out")
        assert json.loads(inside.read_text()) == [GOOD]
    # beside the outputs (not one of them) is fine
    ok = out / "my-users.json"
    ok.write_text(json.dumps([GOOD]))
    assert cli(capsys, "prepare", LAMP2, "data.format=processed", f"data.path={ok}", "--out", out)[0] == 0


def test_a_data_path_that_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "data.json"
    folder.mkdir()
    code, err = cli(capsys, "prepare", LAMP2, "data.format=processed", f"data.path={folder}", "--out", tmp_path / "o")
    assert code == 2
    one_error_line(err, str(folder), "not a regular file")


# --------------------------------------------------------------------------- class 7: store and bank integrity

def _lora(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.q_proj": LoraPair(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)),
            "layers.0.v_proj": LoraPair(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))}


def _store(tmp_path: Path, users=("a", "b", "c")) -> AdapterStore:
    store = AdapterStore(tmp_path / "store", shard_users=len(users))
    for i, u in enumerate(users):
        store.add(u, _lora(i), [], [], 1, 0.1)
    store.flush()
    return AdapterStore(tmp_path / "store")


def _damage(path: Path, at: int, data: bytes = b"\x55\xaa\x55\xaa") -> None:
    raw = bytearray(path.read_bytes())
    raw[at:at + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["first_user", "last_user", "last_byte"])
def test_bytes_overwritten_in_a_shard_name_the_file_and_user(where, tmp_path):
    store = _store(tmp_path)
    rows = store.rows_by_user()
    shard = store.path / rows["a"]["shard"]
    size = shard.stat().st_size
    victim, at = {"first_user": ("a", rows["a"]["offset"] + 6), "last_user": ("c", rows["c"]["offset"] + 10),
                  "last_byte": ("c", size - 2)}[where]
    _damage(shard, at, b"\x13\x37")
    with pytest.raises(InputError, match=f"checksum mismatch for user '{victim}'") as err:
        store.load(rows[victim])
    assert str(shard) in str(err.value)
    others = [u for u in rows if u != victim]
    assert all(store.load(rows[u]) is not None for u in others)   # the undamaged users still read


def test_truncated_or_missing_shard_and_damaged_index(tmp_path):
    store = _store(tmp_path)
    rows = store.rows_by_user()
    shard = store.path / rows["a"]["shard"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(InputError, match="cannot read user 'c'"):
        store.load(rows["c"])
    shard.write_bytes(b"")
    with pytest.raises(InputError, match=str(shard.name)):
        store.load(rows["a"])
    index = next(store.path.glob("index-*.parquet"))
    index.write_bytes(b"PAR1 not really a parquet file")
    with pytest.raises(InputError, match=f"{index.name}: cannot read the store's index"):
        store.index()


def test_a_rerun_after_a_deleted_or_damaged_index_leaves_no_orphans(tmp_path):
    store = _store(tmp_path, ("a", "b"))
    extra = AdapterStore(store.path, shard_users=2)
    for u in ("c", "d"):
        extra.add(u, _lora(9), [], [], 1, 0.1)
    extra.flush()
    third = AdapterStore(store.path, shard_users=1)
    third.add("e", _lora(3), [], [], 1, 0.1)
    third.flush()
    (store.path / "index-00000.parquet").unlink()                    # deleted index
    (store.path / "index-00002.parquet").write_bytes(b"garbage")     # damaged index
    (store.path / ".shard-00009.safetensors.x.tmp").write_bytes(b"left by a killed run")
    removed = AdapterStore(store.path).repair()
    assert set(removed) == {"index-00002.parquet", "shard-00000.safetensors", "shard-00002.safetensors",
                            ".shard-00009.safetensors.x.tmp"}
    again = AdapterStore(store.path)
    assert again.stored_users() == {"c", "d"}
    assert sorted(p.name for p in store.path.iterdir()) == ["index-00001.parquet", "layout.json",
                                                           "shard-00001.safetensors"]


def test_failed_users_are_retried_a_bounded_number_of_times(tmp_path):
    store = AdapterStore(tmp_path / "s", shard_users=1)
    store.add("ok", _lora(0), [], [], 1, 0.1)
    for attempt in range(MAX_ATTEMPTS):
        assert "bad" not in store.finished_users()            # retried while attempts remain
        store.add("bad", None, [], [], 0, float("nan"), status="diverged", error=f"attempt {attempt}")
    store.flush()
    again = AdapterStore(tmp_path / "s")
    assert again.finished_users() == {"ok", "bad"}             # given up after MAX_ATTEMPTS, all recorded
    assert again.rows_by_user()["bad"]["error"] == f"attempt {MAX_ATTEMPTS - 1}"
    again.add("late", None, [], [], 0, 0.0, status="failed")
    again.add("late", _lora(1), [], [], 1, 0.2)
    again.flush()
    assert AdapterStore(tmp_path / "s").rows_by_user()["late"]["status"] == "ok"   # a retry that succeeded wins


def test_bank_files_are_checksummed_and_verified(tmp_path):
    from mta_ray.files.peft_format import save_peft

    bank = tmp_path / "bank"
    anchors = []
    for c in range(2):
        save_peft(_lora(c), bank / f"anchor-{c:04d}", base_model="tiny")
        anchors.append({"anchor_id": f"anchor-{c:04d}", "cluster": c, "user_id": f"user{c}", "path": f"anchor-{c:04d}",
                        "retrieval_emb": [1.0, 0.0]})
    write_manifest(bank, anchors)
    verify_bank(bank)
    weights = next((bank / "anchor-0001").glob("*.safetensors"))
    _damage(weights, weights.stat().st_size - 4)
    with pytest.raises(InputError, match="checksum mismatch \\(anchor anchor-0001, user 'user1'\\)") as err:
        verify_bank(bank)
    assert str(weights) in str(err.value)
    weights.unlink()
    with pytest.raises(InputError, match="missing \\(anchor anchor-0001"):
        verify_bank(bank)
    (bank / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="manifest is damaged"):
        verify_bank(bank)


# --------------------------------------------------------------------------- class 3: errors inside workers

def test_worker_errors_become_one_line():
    from ray.exceptions import ActorDiedError, RayTaskError

    inner = InputError("runs/x/adapters/mta/shard-00000.safetensors", "checksum mismatch for user 'u3'")
    task_err = RayTaskError("ModelWorker.generate", "Traceback (most recent call last):\n  ...\n" * 60, inner)
    for exc in (task_err, task_err.as_instanceof_cause()):
        assert one_line(exc) == ("error: runs/x/adapters/mta/shard-00000.safetensors: checksum mismatch for user "
                                 "'u3'", 2)
    init_err = RayTaskError("ModelWorker.__init__", "Traceback:\n  File x\nmta_ray.errors.InputError: model.base: "
                            "cannot load model from '/m': not a model\n", RuntimeError("x"))
    assert one_line(ActorDiedError(init_err)) == ("error: model.base: cannot load model from '/m': not a model", 2)
    died_text = ActorDiedError.__new__(ActorDiedError)
    Exception.__init__(died_text)
    died_text.error_msg = ("The actor died because of an error raised in its creation task, ray::ModelWorker.__init__"
                           "\nTraceback (most recent call last):\n  File \"w.py\"\nmta_ray.errors.InputError: "
                           "model.base: /m.gguf: not a GGUF file\n")
    assert one_line(died_text) == ("error: model.base: /m.gguf: not a GGUF file", 2)
    crash = RayTaskError("ModelWorker.train", "Traceback\n" * 100, ZeroDivisionError("division by zero"))
    message, code = one_line(crash)
    assert code == 1 and message == "error: in a Ray worker: ZeroDivisionError: division by zero"
    assert one_line(ValueError("a bug of ours")) is None        # our own bugs keep their traceback


def test_model_checked_in_the_driver_before_any_worker(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_text("not a model either")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    cases = [(f"model.base={tmp_path / 'missing.gguf'}", "model.base", "missing.gguf"),
             (f"model.base={text}", "model.base", "not a .gguf model"),
             (f"model.base={fake_gguf}", "model.base", "not a GGUF file"),
             (f"model.base={empty}", "model.base", "no config.json"),
             ("model.base=random:llama3-405b", "model.base", "unknown shape"),
             (f"model.base={tiny_model_dir}", "bank.target_modules", "['nonexistent'] name no linear layer"),
             (f"model.base={tiny_model_dir}", "bank.target_modules", "['qproj'] name no linear layer")]
    targets = [None, None, None, None, None, "bank.target_modules=[nonexistent]", "bank.target_modules=[q_proj, qproj]"]
    import ray
    ray.shutdown()  # an earlier test's Ray in this process would hide one started here
    for (override, where, message), extra in zip(cases, targets):
        out = tmp_path / "run"
        code, err = cli(capsys, "bank", DEMO, override, *([extra] if extra else []), "--out", out)
        assert code == 2, err
        one_error_line(err, where, message)
        assert not out.exists()   # refused before any work (and before Ray started)
    assert not ray.is_initialized()


# --------------------------------------------------------------------------- class 1: stale outputs

SMALL = ["data.synthetic.num_users=8", "data.synthetic.active_items=10"]


def _prepared(tmp_path: Path, capsys, *overrides) -> Path:
    out = tmp_path / "run"
    assert cli(capsys, "prepare", DEMO, *SMALL, *overrides, "--out", out)[0] == 0
    return out


def _fake_output(out: Path, step: str, overrides: list[str]) -> None:
    """An output of a trained step as the runner leaves it (record written before work), plus one stored user."""
    cfg = load_config(DEMO, SMALL + overrides)
    run = RunLayout(out)
    if step.startswith("personalize"):
        store = AdapterStore(run.store(step.split("-", 1)[1]))
        store.add("synth-00000", _lora(0), [], [], 1, 0.1)
        store.flush()
    elif step == "embed":
        run.embeddings.mkdir()
        (run.embeddings / "part-0.parquet").write_bytes(b"old")
    provenance.write_record(run, provenance.expected_record(cfg, run, step))


@pytest.mark.parametrize("changed", ["adapt.rank=8", "adapt.lr=5e-4", "seed=3", "model.max_prompt_tokens=300",
                                     "data.history_k=2", "data.synthetic.seed=7", "adapt.target_modules=[q_proj]"])
def test_a_trained_output_made_with_other_settings_is_refused(changed, tmp_path, capsys):
    out = _prepared(tmp_path, capsys)
    _fake_output(out, "personalize-adapt_only", [])
    before = sorted(p.name for p in (out / "adapters" / "adapt_only").iterdir())
    overrides = [changed]
    if changed.startswith(("data.", "seed")):  # the users table is rebuilt first (it is cheap), then refused
        assert cli(capsys, "prepare", DEMO, *SMALL, *overrides, "--out", out)[0] == 0
    code, err = cli(capsys, "personalize", DEMO, *SMALL, *overrides, "--kind", "adapt_only", "--out", out)
    assert code == 2
    key, value = changed.split("=")
    one_error_line(err, "adapters/adapt_only", f"made with {key}=", f"the config has", "--force")
    assert sorted(p.name for p in (out / "adapters" / "adapt_only").iterdir()) == before   # nothing lost


def test_changed_data_rebuilds_the_users_table_and_says_so(tmp_path, capsys):
    out = _prepared(tmp_path, capsys)
    code = main(["prepare", DEMO, *SMALL, "data.synthetic.seed=7", "--out", str(out)])
    said = capsys.readouterr().out
    assert code == 0 and "made with data.synthetic.seed=0, the config has 7: rebuilding" in said
    data = tmp_path / "users.json"
    data.write_text(json.dumps([GOOD]))
    assert cli(capsys, "prepare", LAMP2, "data.format=processed", f"data.path={data}", "--out", out)[0] == 0
    data.write_text(json.dumps([{**GOOD, "query": [{"id": "q", "input": "description: y", "gold": "drama"}]}]))
    assert main(["prepare", LAMP2, "data.format=processed", f"data.path={data}", "--out", str(out)]) == 0
    assert "another version of the data file" in capsys.readouterr().out
    from mta_ray.files.tables import load_users
    assert load_users(out / "users.parquet").to_pylist()[0]["queries"][0]["gold"] == "drama"


def test_stale_inputs_are_refused_naming_the_stage_that_rebuilds_them(tmp_path, capsys, tiny_model_dir):
    out = _prepared(tmp_path, capsys)
    _fake_output(out, "embed", [])
    _fake_output(out, "personalize-mta", [])
    assert cli(capsys, "prepare", DEMO, *SMALL, "data.synthetic.seed=7", "--out", out)[0] == 0
    code, err = cli(capsys, "personalize", DEMO, *SMALL, "data.synthetic.seed=7", f"model.base={tiny_model_dir}",
                    "--out", out)
    assert code == 2
    one_error_line(err, "embeddings.parquet", "data.synthetic.seed=0, the config has 7", "mta-ray embed")
    code, err = cli(capsys, "evaluate", DEMO, *SMALL, "data.synthetic.seed=7", f"model.base={tiny_model_dir}",
                    "eval.methods=[base, mta]", "--out", out)
    assert code == 2
    one_error_line(err, "embeddings.parquet", "mta-ray embed")


# --------------------------------------------------------------------------- class 2: incomplete runs

def test_evaluate_refuses_users_without_adapters(tmp_path, capsys, tiny_model_dir):
    out = _prepared(tmp_path, capsys)
    methods = "eval.methods=[base, adapt_only]"
    store = AdapterStore(RunLayout(out).store("adapt_only"), shard_users=8)
    for i in range(5):
        store.add(f"synth-{i:05d}", _lora(i), [], [], 1, 0.1)
    store.add("synth-00005", None, [], [], 0, float("nan"), status="diverged")
    store.flush()
    cfg = load_config(DEMO, SMALL + [f"model.base={tiny_model_dir}"])
    provenance.write_record(RunLayout(out), provenance.expected_record(cfg, RunLayout(out), "personalize-adapt_only"))
    code, err = cli(capsys, "evaluate", DEMO, *SMALL, methods, f"model.base={tiny_model_dir}", "--out", out)
    assert code == 2
    one_error_line(err, "adapters/adapt_only", "3 of 8 users have no adapt_only adapter (1 failed)",
                   f"mta-ray personalize {DEMO} --out {out} --kind adapt_only", "--allow-missing")
    assert not (out / "report.json").exists()


# --------------------------------------------------------------------------- class 8: processes left behind

def _ray_session_of(pid: int, timeout: float = 240) -> str | None:
    """The session folder of the embedded Ray a driver started (from its GCS server's command line)."""
    import time

    from mta_ray.engine.reaper import _processes

    deadline = time.time() + timeout
    while time.time() < deadline:
        for _, (ppid, cmd) in _processes().items():
            if ppid == pid and "gcs_server" in cmd and "session_" in cmd:
                part = cmd.split("/session_", 1)[1].split("/", 1)[0]
                return f"/tmp/ray/session_{part}"
        time.sleep(0.5)
    return None


@pytest.mark.slow
def test_killing_the_driver_leaves_no_ray_process(tmp_path, capsys):
    """Start the CLI (it starts an embedded Ray), SIGKILL the driver alone, and check that every process of
    that Ray session (found by its session folder and their descendants, never `ray stop`) is gone."""
    import signal
    import subprocess
    import sys
    import time

    from mta_ray.engine.reaper import alive, session_processes

    out = _prepared(tmp_path, capsys)
    proc = subprocess.Popen([sys.executable, "-m", "mta_ray.cli", "embed", DEMO, *SMALL, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    session = _ray_session_of(proc.pid)
    assert session, "the driver never started Ray"
    deadline = time.time() + 60
    agents: set[int] = set()
    while time.time() < deadline and len(agents) < 2:
        agents = {p for p in session_processes(session) if alive(p) and
                  b"agent" in Path(f"/proc/{p}/cmdline").read_bytes().lower()}
        time.sleep(0.5)   # wait until the dashboard and runtime-env agents are up
    before = session_processes(session)
    assert len(agents) >= 2 and agents <= before and proc.poll() is None
    time.sleep(5)         # the driver's watcher has seen them
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    watched = before | agents
    while time.time() < deadline and [p for p in watched | session_processes(session) if alive(p)]:
        time.sleep(0.5)
    left = [p for p in watched | session_processes(session) if alive(p)]
    log = Path(session) / "logs" / "mta_ray_reaper.log"
    assert not left, (left, log.read_text() if log.is_file() else "no watcher log")


@pytest.mark.slow
def test_a_worker_a_clean_shutdown_leaves_running_is_ended(tmp_path):
    """Ray 2.60 left a ``ray::TrainController`` running, orphaned, after a clean shutdown. Here a process
    naming the session folder starts a child that does not, then exits (as the raylet does): the watcher,
    having seen the child, ends it once the session's named processes are gone; the driver is untouched."""
    import signal
    import subprocess
    import sys
    import time

    from mta_ray.engine.reaper import alive

    session = tmp_path / "session_2026-01-01_00-00-00_000000_1"
    (session / "logs").mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    driver = subprocess.Popen(sleeper)
    named = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "print(subprocess.Popen(sys.argv[2:]).pid, flush=True); time.sleep(300)",
                              str(session), *sleeper], stdout=subprocess.PIPE, text=True)
    orphan = int(named.stdout.readline())
    watcher = subprocess.Popen([sys.executable, "-m", "mta_ray.engine.reaper", str(driver.pid), str(session)],
                               cwd=ROOT)
    try:
        time.sleep(3)                       # the watcher has seen both
        os.kill(named.pid, signal.SIGKILL)  # the "raylet" is gone; its child lives on, orphaned
        named.wait()
        watcher.wait(timeout=60)
        log = (session / "logs" / "mta_ray_reaper.log").read_text()
        assert not alive(orphan), log
        assert f"clean shutdown left [{orphan}] running" in log and "the session has no process left" in log
        assert driver.poll() is None        # not the session's: never touched
    finally:
        for p in (driver, watcher):
            p.kill()
        if alive(orphan):
            os.kill(orphan, signal.SIGKILL)
