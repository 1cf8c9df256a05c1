"""Training examples as workers build them: LaMP-1's hard negatives come from other users' items."""

import pytest

from mta_ray.config import ModelConfig, load_config
from mta_ray.core.tasks import get_task
from mta_ray.engine.encoding import job_examples
from mta_ray.files.models import load_tokenizer
from mta_ray.files.tables import task_negatives, write_users

TITLES = {
    "u0": ["Graph neural networks for molecules", "Molecular graph generation with diffusion"],
    "u1": ["Graph kernels for molecules and proteins", "Protein folding with attention"],
    "u2": ["Speech recognition with transformers", "Transformers for speech synthesis"],
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


@pytest.fixture
def lamp1_users(tmp_path):
    users = [{"user_id": u, "task": "lamp1", "persona": None, "queries": [],
              "history": [{"id": f"{u}-{j}", "input": t, "output": "abstract"} for j, t in enumerate(titles)]}
             for u, titles in TITLES.items()]
    path = tmp_path / "users.parquet"
    write_users(users, path)
    return path, {u["user_id"]: u for u in users}


def _prompts(examples, tokenizer):
    return [tokenizer.decode([t for t, lab in zip(e.input_ids, e.labels) if lab == -100]) for e in examples]


def test_lamp1_examples_take_their_negative_from_another_user(lamp1_users, tokenizer):
    path, users = lamp1_users
    cfg = load_config("configs/lamp/lamp1.yaml", ["data.history_k=0", "model.chat_template=false"])
    pool = task_negatives(path, get_task("lamp1"), cfg.seed)
    assert len(pool) == 6 and task_negatives(path, get_task("lamp2"), cfg.seed) == []
    prompts = _prompts(job_examples(get_task("lamp1"), users["u0"], tokenizer, cfg, pool), tokenizer)
    assert "Graph kernels for molecules and proteins" in prompts[0]      # BM25-closest title of another user
    assert all("A survey of unrelated work" not in p for p in prompts)
    # an anchor trained on u0's and u1's histories draws its negatives from u2 only
    anchor = {"user_id": "anchor-0000", "owners": ["u0", "u1"],
              "histories": [users["u0"]["history"], users["u1"]["history"]]}
    anchor_prompts = _prompts(job_examples(get_task("lamp1"), anchor, tokenizer, cfg, pool), tokenizer)
    assert len(anchor_prompts) == 4
    assert all(any(t in p for t in TITLES["u2"]) for p in anchor_prompts)
