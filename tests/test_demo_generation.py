"""Generation stops a row at the end of its first line: nothing a parser reads is cut."""

import torch

from mta_ray.core.metrics import rating_value
from mta_ray.core.tasks import get_task
from mta_ray.engine.generation import FirstLineDone


class _Tok:
    """Decodes the ids of a tiny vocabulary (id 0 is the special EOS, dropped)."""

    VOCAB = {0: "", 1: " comedy", 2: "\n", 3: " ", 4: "\n\n", 5: " a\n", 6: "Movie"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.VOCAB[i] for i in ids)


def _run(rows: list[list[int]]) -> list[int]:
    """The step (number of new tokens) at which each row was stopped, -1 if never."""
    stop = FirstLineDone(_Tok(), len(rows), start=1)
    ids = torch.zeros((len(rows), 1), dtype=torch.long)
    assert not stop(ids, None).any()  # the prompt alone stops nothing
    when = [-1] * len(rows)
    for step in range(len(rows[0])):
        ids = torch.cat([ids, torch.tensor([[r[step]] for r in rows])], dim=1)
        for i, done in enumerate(stop(ids, None).tolist()):
            if done and when[i] < 0:
                when[i] = step + 1
    return when


def test_rows_stop_after_a_non_blank_first_line_only():
    assert _run([[1, 2, 6, 6],      # " comedy\n": stops at the newline
                 [3, 2, 1, 2],      # a blank line first: the answer is the next line
                 [4, 1, 6, 4],      # leading blank lines, then the answer's newline
                 [5, 6, 6, 6],      # text and newline in one token
                 [1, 1, 1, 1]]) == [2, 4, 4, 1, -1]


def _first_line(text: str) -> str:
    """``text`` up to and with the newline that ends its first non-blank line (what generation keeps)."""
    first = text.lstrip()
    return text[:len(text) - len(first)] + first[:first.index("\n") + 1]


def test_stopping_at_the_first_line_changes_no_score():
    texts = [" comedy\nMovie: a", "\n 4\nthe rest", "  A headline\n\nMore", " four\n3"]
    for name in ("lamp2", "lamp4", "lamp5"):
        task = get_task(name)
        for text in texts:
            assert task.parse_output(_first_line(text)) == task.parse_output(text)
    lamp3 = get_task("lamp3")  # an answer that is no score scores the penalty, whatever follows it
    for text in texts:
        assert rating_value(lamp3.parse_output(_first_line(text)), "2") == rating_value(lamp3.parse_output(text), "2")
