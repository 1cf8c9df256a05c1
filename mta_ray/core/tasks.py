"""LaMP task registry: prompts (paper Appendix E), history -> training pairs, labels, parsing.

Every user's history item is stored as ``{id, input, output}``: ``input`` is what
goes where a query would go, ``output`` the target. A query keeps the official
LaMP input string; :meth:`Task.query_slots` pulls the fields out of it.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from mta_ray.core.retrieval import HistoryIndex

LAMP2_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)

SYNTHETIC_TAG_INSTRUCTION = ("Answer with one tag.\nMovie: A western: a sheriff rides into town.\nTag:\nwestern\n\n"
                             "Movie: {x}\nTag:\n")
"""The ``lamp2-synthetic`` prompt: the answer format by one example whose tag is not a label. The tag goes
on its own line because a training target is tokenised without a leading space
(:func:`mta_ray.engine.encoding.encode_pair`), which is how the model writes a word after a new line; after
"Tag: western" it expects " word", and the first target token of the demo's training pairs cost the base
model 14.0 nats on average instead of 7.7, so few per-user steps could not teach the answer."""

Item = dict  # {"id": str, "input": str, "output": str}


@dataclass(frozen=True)
class Task:
    """One LaMP task: how its data looks, how prompts read, how outputs are scored."""

    name: str
    kind: Literal["classification", "regression", "generation"]
    profile_fields: tuple[str, str]
    """(input field, output field) of a raw LaMP profile item."""
    instruction: str
    """Appendix E instruction; ``{x}`` is the query's main text (LaMP-1 also has {o1}, {o2})."""
    history_line: Callable[[Item], str]
    query_pattern: str
    """Regex with named groups pulling the fields out of an official LaMP input string."""
    max_new_tokens: int
    labels: tuple[str, ...] = field(default_factory=tuple)

    # ------------------------------------------------------------------ prompts
    def query_slots(self, text: str) -> dict[str, str]:
        """The fields of a query: ``x`` (and ``o1``/``o2`` for LaMP-1); falls back to the whole text."""
        m = re.search(self.query_pattern, text, flags=re.DOTALL)
        if m:
            return {k: v.strip() for k, v in m.groupdict().items()}
        return {"x": text.strip(), "o1": "", "o2": ""}

    def prompt(self, slots: dict[str, str], history: Sequence[Item]) -> str:
        """The full prompt: ``User History`` block (if any) and the task instruction."""
        instruction = self.instruction.format(**{"o1": "", "o2": "", **slots})
        if not history:
            return f"User Instruction:\n{instruction}"
        lines = "\n".join(self.history_line(item) for item in history)
        return f"User History:\n{lines}\n\nUser Instruction:\n{instruction}"

    def query_prompt(self, query_input: str, history: Sequence[Item], k: int) -> str:
        """Prompt for a test query: BM25 top-k of the whole history."""
        slots = self.query_slots(query_input)
        idx = HistoryIndex([_item_text(it) for it in history]).top_k(slots["x"], k)
        return self.prompt(slots, [history[i] for i in idx])

    def training_pairs(self, history: Sequence[Item], k: int,
                       negatives: Sequence[str] = ()) -> list[tuple[str, str]]:
        """(prompt, target) per history item; its own input goes where the query would go.

        BM25 retrieves k other items of the same history (leave-one-out). Tasks that
        :attr:`needs_negatives` (LaMP-1) build two-choice questions whose wrong option is the
        BM25-closest of ``negatives`` (other users' item inputs); see :func:`_lamp1_pair`.
        """
        index = HistoryIndex([_item_text(it) for it in history])
        negative_index = HistoryIndex(list(negatives)) if self.needs_negatives and negatives else None
        pairs = []
        for i, item in enumerate(history):
            context = [history[j] for j in index.top_k(item["input"], k, exclude=i)]
            if self.needs_negatives:
                pairs.append(_lamp1_pair(self, i, history, index, negatives, negative_index, context))
            else:
                pairs.append((self.prompt({"x": item["input"]}, context), item["output"]))
        return pairs

    @property
    def needs_negatives(self) -> bool:
        """Its training questions need other users' items as wrong options (LaMP-1's citation choice)."""
        return self.name == "lamp1"

    # ------------------------------------------------------------------ outputs
    def parse_output(self, text: str) -> str:
        """Normalise generated text into a prediction (a label, a score, or a title)."""
        text = text.strip()
        if self.kind == "generation":
            return text.split("\n")[0].strip().strip('"').strip()
        if self.kind == "regression":
            m = re.match(r"^\s*([1-5])(?:\.0+)?(?![0-9.])", text)
            return m.group(1) if m else text
        first = text.split("\n")[0].strip(" \t\"'.")
        for label in self.labels:
            if first.lower() == label.lower():
                return label
        return first


def _item_text(item: Item) -> str:
    return f"{item['input']} {item['output']}"


NEGATIVE_POOL = 512
"""Other users' item inputs sampled (seeded) as the pool LaMP-1's hard negatives are retrieved from."""
FALLBACK_NEGATIVE = "A survey of unrelated work"
"""The wrong option when there are no other users to draw a negative from (a single-user run)."""


def _lamp1_pair(task: Task, i: int, history: Sequence[Item], index: HistoryIndex, negatives: Sequence[str],
                negative_index: HistoryIndex | None, context: list[Item]) -> tuple[str, str]:
    """LaMP-1 training question: which reference relates to the author's paper?

    The true reference is the author's own most BM25-similar other paper (authors
    cite their related work); the hard negative is the most BM25-similar title
    among other users' papers (``negatives``, never the paper or its positive). The
    answer's position alternates by a hash of the id.
    """
    title = history[i]["input"]
    best = index.top_k(title, 1, exclude=i)
    positive = history[best[0]]["input"] if best else title
    negative = FALLBACK_NEGATIVE
    if negative_index is not None:
        ranked = (negatives[j] for j in negative_index.top_k(title, len(negatives)))
        negative = next((n for n in ranked if n not in (title, positive)), FALLBACK_NEGATIVE)
    first = zlib.crc32(str(history[i]["id"]).encode()) % 2 == 0
    o1, o2 = (positive, negative) if first else (negative, positive)
    target = "[1]" if first else "[2]"
    return task.prompt({"x": title, "o1": o1, "o2": o2}, context), target


TASKS: dict[str, Task] = {
    "lamp1": Task(
        name="lamp1", kind="classification", profile_fields=("title", "abstract"),
        instruction=('For an author who has written the paper with the title "{x}", which reference '
                     "is related? Just answer with [1] or [2] without explanation.\n"
                     "Reference: [1] - {o1} [2] - {o2}\nAnswer:"),
        history_line=lambda it: f'"{it["input"]}"',
        query_pattern=(r'title "(?P<x>.*?)", which reference is related\?.*'
                       r'\[1\]:\s*"?(?P<o1>.*?)"?\s*\[2\]:\s*"?(?P<o2>.*?)"?\s*$'),
        max_new_tokens=10, labels=("[1]", "[2]"),
    ),
    "lamp2": Task(
        name="lamp2", kind="classification", profile_fields=("description", "tag"),
        instruction=("Which tag does this movie relate to among the following tags? Just answer with "
                     "the tag name without further explanation.\ntags: [" + ", ".join(LAMP2_TAGS)
                     + "]\ndescription: {x}\nTag:"),
        history_line=lambda it: f'the tag for the movie: "{it["input"]}" is "{it["output"]}"',
        query_pattern=r"description:\s*(?P<x>.*)$",
        max_new_tokens=10, labels=LAMP2_TAGS,
    ),
    # The embedded demo's tagging task (mta_ray.files.synthetic), not a LaMP task: LaMP-2's labels and
    # scoring with a short prompt. LaMP-2's instruction lists all 15 tags (~60 of a prompt's ~94 tokens,
    # in every training sequence and every query), and without an example SmolLM2-135M answers it by
    # listing tags, so base and RAG could not answer even the queries whose description names the tag.
    # One worked example whose tag is no label ("western") states the format instead: base learns
    # "one bare tag, then a new line" from the prompt and scores on those queries, never by copying
    # a label from the example. Retrieved items (RAG) are written the same way as the example.
    "lamp2-synthetic": Task(
        name="lamp2-synthetic", kind="classification", profile_fields=("description", "tag"),
        instruction=SYNTHETIC_TAG_INSTRUCTION,
        history_line=lambda it: f'Movie: {it["input"]}\nTag:\n{it["output"]}',
        query_pattern=r"description:\s*(?P<x>.*)$",
        max_new_tokens=10, labels=LAMP2_TAGS,
    ),
    "lamp3": Task(
        name="lamp3", kind="regression", profile_fields=("text", "score"),
        instruction=("What is the score of the following review on a scale of 1 to 5? just answer "
                     "with 1, 2, 3, 4, or 5 without further explanation.\nreview: {x}\nScore:"),
        history_line=lambda it: f'{it["output"]} is the score for "{it["input"]}"',
        query_pattern=r"review:\s*(?P<x>.*)$",
        max_new_tokens=3, labels=("1", "2", "3", "4", "5"),
    ),
    "lamp4": Task(
        name="lamp4", kind="generation", profile_fields=("text", "title"),
        instruction="Generate a headline for the following article.\nArticle: {x}\nHeadline:",
        history_line=lambda it: f'"{it["output"]}" is the title for "{it["input"]}"',
        query_pattern=r"article:\s*(?P<x>.*)$",
        max_new_tokens=50,
    ),
    "lamp5": Task(
        name="lamp5", kind="generation", profile_fields=("abstract", "title"),
        instruction="Generate a title for the following abstract of a paper.\nAbstract: {x}\nTitle:",
        history_line=lambda it: f'"{it["output"]}" is the title for "{it["input"]}"',
        query_pattern=r"(?:abstract of a paper|abstract):\s*(?P<x>.*)$",
        max_new_tokens=50,
    ),
}


def get_task(name: str) -> Task:
    """The task called ``name``; KeyError lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
