"""Users -> tokenised training examples and query prompts (chat template, truncation)."""

from __future__ import annotations

from typing import Any, Sequence

from mta_ray.config import Config
from mta_ray.core.tasks import Task
from mta_ray.engine.trainer import IGNORE, Example
from mta_ray.files.tables import others_items


def prompt_ids(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    """Token ids of a prompt, wrapped as a user turn when the tokenizer has a chat template."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def encode_pair(tokenizer: Any, prompt: str, target: str, max_tokens: int, chat_template: bool) -> Example:
    """(prompt, target) -> ids with loss on the target (+ EOS) only; long prompts lose their start."""
    p = prompt_ids(tokenizer, prompt, chat_template)
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    t = t[: max_tokens // 2]
    p = p[-(max_tokens - len(t)):]
    return Example(p + t, [IGNORE] * len(p) + t)


def encode_prompt(tokenizer: Any, prompt: str, max_tokens: int, chat_template: bool) -> list[int]:
    return prompt_ids(tokenizer, prompt, chat_template)[-max_tokens:]


def user_examples(task: Task, history: Sequence[dict], tokenizer: Any, k: int, max_tokens: int,
                  chat_template: bool, negatives: Sequence[str] = ()) -> list[Example]:
    """One training example per history item (BM25 leave-one-out context of k items)."""
    return [encode_pair(tokenizer, p, t, max_tokens, chat_template)
            for p, t in task.training_pairs(history, k, negatives)]


def job_examples(task: Task, user: dict, tokenizer: Any, cfg: Config, negatives: Sequence[tuple[str, str]]) -> list[Example]:
    """Every training example of a user, or of an anchor (``histories``: the histories of its ``owners``).

    ``negatives``: the (user_id, item input) pool of tasks that need other users' items (LaMP-1); the
    ones of the user (or of the anchor's owners) are left out.
    """
    others = others_items(negatives, user.get("owners", [user["user_id"]]))
    return [ex for h in user.get("histories", [user.get("history")])
            for ex in user_examples(task, h, tokenizer, cfg.data.history_k, cfg.model.max_prompt_tokens,
                                    cfg.model.chat_template, others)]
