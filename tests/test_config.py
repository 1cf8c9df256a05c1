from pathlib import Path

import pytest
import yaml

from mta_ray.config import Config, load_config
from mta_ray.errors import InputError
from mta_ray.files.layout import save_resolved

ROOT = Path(__file__).resolve().parents[1]
ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs_for_every_lamp_task_and_the_demo():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in ALL_YAML}
    assert {"demo.yaml", "paper/llama3-8b.yaml"} <= names
    assert {f"lamp/lamp{i}.yaml" for i in range(1, 6)} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_every_yaml_in_configs_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("task,epochs,lr", [("lamp1", 2, 5e-5), ("lamp2", 3, 1e-4), ("lamp3", 1, 5e-5),
                                             ("lamp4", 3, 1e-4), ("lamp5", 2, 5e-5)])
def test_lamp_configs_carry_paper_table4(task, epochs, lr):
    """Paper Table 4, except LaMP-2's stacked adapter: the lean profile its cost/quality study chose."""
    from mta_ray.config import with_values
    from mta_ray.core.profiles import profile

    cfg = load_config(ROOT / "configs" / "lamp" / f"{task}.yaml")
    a = cfg.adapt
    if task == "lamp2":
        lean = profile("mta-qv-r2-e1-int8").values
        assert with_values(cfg, lean) == cfg                       # the config is that profile
        a = with_values(cfg, {"adapt.rank": 4, "adapt.epochs": epochs}).adapt   # the rest is Table 4
    assert (cfg.data.task, a.rank, a.epochs, a.lr, a.batch_size, a.grad_accum) == (task, 4, epochs, lr, 2, 4)
    assert cfg.eval.max_new_tokens == {"lamp3": 3, "lamp1": 10, "lamp2": 10}.get(task, 50)


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs/demo.yaml",
                      ["adapt.lr=5e-5", "merge.top_k=3", "data.synthetic.seed=7", "merge.fixed_alpha=0.25",
                       "bank.target_modules=[q_proj, v_proj]", "model.chat_template=false"])
    assert cfg.adapt.lr == 5e-5 and isinstance(cfg.adapt.lr, float)
    assert cfg.merge.top_k == 3 and cfg.data.synthetic.seed == 7 and cfg.merge.fixed_alpha == 0.25
    assert cfg.bank.target_modules == ["q_proj", "v_proj"] and cfg.model.chat_template is False


@pytest.mark.parametrize("override,message", [
    ("adapt.lrr=1", "unknown key 'adapt.lrr' (did you mean adapt.lr?)"),
    ("nosuch.x=1", "unknown key 'nosuch'"),
    ("merge.top_k=two", "merge.top_k must be an integer"),
    ("merge.top_k=2.5", "merge.top_k must be an integer"),
    ("merge.space=weights", "merge.space must be one of ['params', 'delta']"),
    ("model.chat_template=maybe", "model.chat_template must be true or false"),
    ("adapt.lr=fast", "adapt.lr must be a number"),
    ("adapt=3", "adapt must be a mapping"),
    ("merge.top_k=0", "top_k must be at least 1"),
    ("eval.methods=[mta, magic]", "unknown methods ['magic']"),
    ("noequals", "expected key=value"),
])
def test_bad_overrides_are_one_line_input_errors(override, message):
    with pytest.raises(InputError) as err:
        load_config(ROOT / "configs/demo.yaml", [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(InputError, match=r"bad.yaml: invalid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(InputError, match="must be a mapping"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/lamp/lamp3.yaml", ["merge.top_k=4"])
    path = save_resolved(cfg, tmp_path, "prepare")
    assert path.name == "prepare.config.yaml"
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["merge"]["top_k"] == 4
