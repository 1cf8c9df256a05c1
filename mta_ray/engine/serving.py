"""The prompt recipe a server needs to ask an exported adapter exactly what we asked it.

A user's adapter was trained and evaluated on prompts built one way: the task's template (paper
Appendix E) holding the query, the BM25 top-``history_k`` items of the user's own history, the base's
chat template as one user turn, and the token ids cut from the left to ``max_prompt_tokens``.
``mta-ray export`` writes that recipe as ``prompt_recipe.json`` beside the adapters;
:func:`user_prompt` rebuilds the prompt from it and the run's users table, with the very functions
evaluation uses, so a server that sends these token ids sees what our evaluation saw.

Use::

    from mta_ray.engine.serving import PromptRecipe, user_prompt
    recipe = PromptRecipe.load("exported/prompt_recipe.json")
    p = user_prompt(recipe, "runs/demo/users.parquet", "synth-00005", "Which tag fits ... description: ...",
                    tokenizer)     # tokenizer: AutoTokenizer.from_pretrained(recipe.base_name)
    p.token_ids                    # -> vLLM /v1/completions {"model": <user's LoRA>, "prompt": p.token_ids}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mta_ray.config import Config
from mta_ray.core.tasks import get_task
from mta_ray.engine.encoding import encode_prompt, prompt_ids
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_write_text
from mta_ray.files.tables import rows_of_users

RECIPE_FILE = "prompt_recipe.json"


@dataclass(frozen=True)
class PromptRecipe:
    """How every exported user's prompts are built (the run's settings, not the command line's)."""

    task: str
    """LaMP task (``lamp1`` .. ``lamp5``): its template and how its query string is parsed."""
    history_k: int
    """User-history items BM25 retrieves (against the query) into the prompt; 0 = none."""
    chat_template: bool
    """The prompt is one user turn of the tokenizer's chat template (with the generation prompt)."""
    max_prompt_tokens: int
    """Token ids beyond this are cut from the left (the start of the history goes first)."""
    max_new_tokens: int
    """Greedy decoding budget our evaluation used."""
    base_name: str
    """The model (and tokenizer) the adapters apply to."""
    instruction: str = ""
    """The task's instruction template, for reading (``{x}``: the query's text)."""

    @classmethod
    def from_config(cls, cfg: Config, base_name: str) -> "PromptRecipe":
        task = get_task(cfg.data.task)
        return cls(task=task.name, history_k=cfg.data.history_k, chat_template=cfg.model.chat_template,
                   max_prompt_tokens=cfg.model.max_prompt_tokens,
                   max_new_tokens=cfg.eval.max_new_tokens or task.max_new_tokens, base_name=base_name,
                   instruction=task.instruction)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / RECIPE_FILE
        atomic_write_text(path, json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PromptRecipe":
        """From ``prompt_recipe.json`` or the export folder holding it."""
        path = Path(path)
        path = path / RECIPE_FILE if path.is_dir() else path
        if not path.is_file():
            raise InputError(str(path), "no prompt recipe (written by `mta-ray export`)")
        return cls(**json.loads(path.read_text()))


@dataclass(frozen=True)
class ServedPrompt:
    text: str
    """The task prompt (template + retrieved history), before the chat template."""
    token_ids: list[int] | None
    """Exactly the ids our model reads: chat template applied, cut from the left (None without a tokenizer)."""
    truncated: bool = False
    """The templated prompt was longer than ``max_prompt_tokens`` and lost its start."""


def user_prompt(recipe: PromptRecipe, users: str | Path, user_id: str, query: str,
                tokenizer: Any = None) -> ServedPrompt:
    """The exact prompt an exported user's adapter expects for ``query``.

    ``users``: the run's ``users.parquet`` (the user's history is retrieved from it, as in evaluation);
    ``query``: the query's input string as the users table holds queries (a LaMP input);
    ``tokenizer``: the base's tokenizer; with it, the chat-templated and left-truncated token ids.
    Send ``token_ids`` as the prompt (vLLM ``/v1/completions`` takes a list of ids) to reproduce our
    outputs; a chat request with ``text`` gives the same ids when nothing was cut (not ``truncated``).
    """
    row = rows_of_users(users, ["user_id", "history"], {user_id}).get(user_id)
    if row is None:
        raise InputError(str(users), f"user {user_id!r} is not in the users table")
    text = get_task(recipe.task).query_prompt(query, row["history"] or [], recipe.history_k)
    if tokenizer is None:
        return ServedPrompt(text, None)
    ids = encode_prompt(tokenizer, text, recipe.max_prompt_tokens, recipe.chat_template)
    return ServedPrompt(text, ids, len(prompt_ids(tokenizer, text, recipe.chat_template)) > len(ids))
