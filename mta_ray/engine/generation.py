"""Batched greedy generation where each row uses its own user's adapters (Ray-free)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mta_ray.core.lora import Lora, rank_of
from mta_ray.engine.multilora import inject, restore, set_merged, set_stacked


class FirstLineDone(StoppingCriteria):
    """Stops a row once it has written a newline after some non-blank text.

    Every task's :meth:`Task.parse_output` reads only the first non-blank line of an answer (LaMP-3: an
    answer that is no score scores the same penalty whatever follows), so the tokens after that line's
    end change no score; stopping there saves most decode steps of a base model that goes on after its
    answer (LaMP-2's default is 10 new tokens for a tag of 1-4). Rows that end with EOS stop as before.
    """

    def __init__(self, tokenizer: Any, n: int, start: int):
        self.tokenizer, self.start = tokenizer, start
        self.seen = [False] * n
        self.done = [False] * n

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if input_ids.shape[1] > self.start:  # only the newest token of each row still writing is read
            for i, tok in enumerate(input_ids[:, -1].tolist()):
                if self.done[i]:
                    continue
                text = self.tokenizer.decode([tok], skip_special_tokens=True)
                self.done[i] = "\n" in text and (self.seen[i] or bool(text.split("\n")[0].strip()))
                self.seen[i] = self.seen[i] or bool(text.strip())
        return torch.tensor(self.done, device=input_ids.device)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int,
             merged: Sequence[Lora | None] | None = None, stacked: Sequence[Lora | None] | None = None,
             targets: Sequence[str] = ("all-linear",)) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids); row i uses ``merged[i]`` + ``stacked[i]``.

    Adapters carry their scaling folded into B, so the branch scale is 1.
    """
    n = len(prompts)
    merged = list(merged) if merged is not None else [None] * n
    stacked = list(stacked) if stacked is not None else [None] * n
    device = next(model.parameters()).device
    T = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((n, T), pad, dtype=torch.long)
    att = torch.zeros((n, T), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding for generation
        ids[i, T - len(p):] = torch.tensor(p)
        att[i, T - len(p):] = 1
    use_adapters = any(x is not None for x in merged + stacked)
    layers = None
    if use_adapters:
        r = max([rank_of(s) for s in stacked if s is not None], default=0)
        R = max([rank_of(m) for m in merged if m is not None], default=0)
        router, layers = inject(model, targets, slots=n, rank=r, merged_rank=R, scale=1.0)
        for i in range(n):
            set_merged(layers, i, merged[i])
            if stacked[i] is not None:
                set_stacked(layers, i, stacked[i])
        slots = torch.arange(n, device=device)
        router.route(slots, slots, 1)  # one row per slot
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, num_beams=1,
                             stopping_criteria=StoppingCriteriaList([FirstLineDone(tokenizer, n, T)]))
    finally:
        if layers is not None:
            restore(model, layers)
    return [tokenizer.decode(row[T:], skip_special_tokens=True) for row in out]
