"""The embedded demo benchmark: LaMP-format users drawn from latent personas.

Why MTA should help here (and the ground truth is known):

- Items are about one of eight **topics** (space, crime, romance, magic, war,
  mind, society, family). Each topic has three plausible answers: three LaMP-2
  tags (the first is the obvious one, e.g. ``sci-fi`` for space), or three
  headline styles for the generation task (LaMP-4/5-like).
- A **persona** is a taste: it watches/writes about two related topics of its
  own (persona 0: space + society, 1: crime + mind, 2: romance + family,
  3: magic + war; further personas reuse the pairs with other answers) and
  answers each of them in one fixed, non-obvious way (its *mapping*), e.g.
  persona 0 tags space movies ``dystopia``. ``personas.json`` holds the table.
- An ordinary user has ``min_items..max_items`` items, all about ONE of its
  persona's topics; its **queries are about the other topic**. Its own items
  cannot teach that answer, and the base model's obvious guess is wrong.
- ``active_users_per_persona`` users per persona have ``active_items`` items on
  both topics: the natural anchors (most active users). Retrieval by history
  text finds the same-persona anchor (it shares the user's topic and answers),
  so the merged LoRA carries the missing answer and the stacked adapter adds the
  user's own items. ``mta`` and ``merged_only`` should beat ``adapt_only``,
  ``oppu``, ``base`` and RAG, which only see the user's own, other-topic items.
  Measured (``make demo``): mta 0.47 accuracy, merged_only 0.63, all others 0.0;
  the stacked adapter, trained only on the other topic, pulls some answers
  toward that topic's tag, so here merged_only beats mta.

Seeded and deterministic: the same config always yields the same users.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

from mta_ray.config import SyntheticConfig
from mta_ray.core.tasks import Task

TOPICS: dict[str, dict[str, Any]] = {
    "space": {"tags": ["sci-fi", "dystopia", "action"],
              "who": ["an astronaut", "a starship crew", "a lonely pilot", "a robot engineer"],
              "does": ["drifts toward", "must reach", "is stranded near", "fights to escape"],
              "what": ["a dying star", "a distant planet", "an alien moon", "a black hole"]},
    "crime": {"tags": ["violence", "twist ending", "dark comedy"],
              "who": ["a weary detective", "a getaway driver", "two small-time crooks", "a crime boss"],
              "does": ["plans a heist of", "is hunted for", "investigates a murder at", "double-crosses"],
              "what": ["a casino vault", "the city docks", "a mob family", "a jewellery store"]},
    "romance": {"tags": ["romance", "comedy", "classic"],
                "who": ["a shy baker", "two old friends", "a travelling singer", "a young widow"],
                "does": ["falls for", "keeps meeting", "writes letters to", "competes with"],
                "what": ["a charming stranger", "the neighbour upstairs", "a rival florist", "a sailor on leave"]},
    "magic": {"tags": ["fantasy", "based on a book", "classic"],
              "who": ["a young wizard", "an orphan princess", "a talking fox", "a knight errant"],
              "does": ["searches for", "is cursed by", "must protect", "steals"],
              "what": ["an enchanted sword", "a dragon's egg", "a hidden kingdom", "a witch's spellbook"]},
    "war": {"tags": ["true story", "violence", "action"],
            "who": ["a field medic", "a platoon of soldiers", "a resistance fighter", "a wartime nurse"],
            "does": ["holds the line at", "smuggles refugees across", "survives the siege of", "defends"],
            "what": ["a ruined village", "the eastern front", "a bombed city", "a mountain pass"]},
    "mind": {"tags": ["psychology", "thought-provoking", "twist ending"],
             "who": ["a troubled therapist", "an insomniac clerk", "a patient with amnesia", "a grieving father"],
             "does": ["doubts the memory of", "is haunted by", "slowly unravels", "keeps dreaming of"],
             "what": ["a childhood accident", "a missing sister", "a second identity", "an empty house"]},
    "society": {"tags": ["social commentary", "dystopia", "dark comedy"],
                "who": ["a factory worker", "a reality-show host", "a city clerk", "a teenage activist"],
                "does": ["exposes", "rebels against", "is crushed by", "profits from"],
                "what": ["a corrupt government", "a surveillance state", "a greedy corporation", "a rigged election"]},
    "family": {"tags": ["comedy", "based on a book", "true story"],
               "who": ["a clumsy dad", "three siblings", "a stubborn grandmother", "a new stepmother"],
               "does": ["plans a road trip to", "tries to save", "inherits", "reunites at"],
               "what": ["the family farm", "a seaside hotel", "a failing bakery", "a summer camp"]},
}

# Headline styles for the generation task: the three "answers" of each topic are styles.
STYLES = [
    "{Subject}: what you need to know",
    "Why {subject} matters more than ever",
    "Breaking news - {subject} shocks everyone",
]


PERSONA_TOPICS = [("space", "society"), ("crime", "mind"), ("romance", "family"), ("magic", "war")]


def persona_table(num_personas: int, seed: int) -> list[dict[str, Any]]:
    """Each persona: its two topics and its answer index (1 or 2, never the obvious 0) for each."""
    personas = []
    for p in range(num_personas):
        pair = p % len(PERSONA_TOPICS)
        topics = list(PERSONA_TOPICS[pair])
        flip = (p // len(PERSONA_TOPICS)) % 2  # a second round of personas answers the other way
        first = 1 + (random.Random(f"personas-{seed}-{pair}").randrange(2) ^ flip)
        if TOPICS[topics[0]]["tags"][first] == TOPICS[topics[1]]["tags"][3 - first]:
            first = 3 - first  # the two topics must not share a tag, or one topic would reveal the other
        answer = {topics[0]: first, topics[1]: 3 - first}
        personas.append({"persona": p, "topics": topics, "answer": answer})
    return personas


def _text(topic: str, rng: random.Random) -> tuple[str, str]:
    """(description, subject phrase) of one item about ``topic``."""
    t = TOPICS[topic]
    who, does, what = rng.choice(t["who"]), rng.choice(t["does"]), rng.choice(t["what"])
    desc = f"{who[0].upper()}{who[1:]} {does} {what}."
    return desc, f"{who} and {what}"


def _item(task: Task, topic: str, answer: int, rng: random.Random) -> tuple[str, str]:
    """(input, output) for one item in the task's format."""
    desc, subject = _text(topic, rng)
    if task.name == "lamp2":
        return desc, TOPICS[topic]["tags"][answer]
    style = STYLES[answer]
    title = style.format(Subject=subject[0].upper() + subject[1:], subject=subject)
    return desc, title


def _query_input(task: Task, text: str) -> str:
    if task.name == "lamp2":
        return task.instruction.split("\ndescription:")[0].replace("\n", " ") + f" description: {text}"
    if task.name == "lamp4":
        return f"Generate a headline for the following article: {text}"
    return f"Generate a title for the following abstract of a paper: {text}"


def generate_users(cfg: SyntheticConfig, task: Task) -> Iterator[dict[str, Any]]:
    """Users in the processed form (user_id, persona, history, queries), generated one at a time."""
    if task.name not in ("lamp2", "lamp4", "lamp5"):
        raise ValueError(f"the synthetic benchmark has lamp2 (tagging) and lamp4/lamp5 (titles), not {task.name}")
    return _generate(cfg, task)


def _generate(cfg: SyntheticConfig, task: Task) -> Iterator[dict[str, Any]]:
    rng = random.Random(f"users-{cfg.seed}")
    personas = persona_table(cfg.num_personas, cfg.seed)
    for i in range(cfg.num_users):
        persona = personas[i % cfg.num_personas]
        active = i // cfg.num_personas < cfg.active_users_per_persona
        n_items = cfg.active_items if active else rng.randint(cfg.min_items, cfg.max_items)
        topics = list(persona["topics"])
        seen = topics if active else [topics[rng.randrange(2)]]  # an ordinary user knows one topic
        history = []
        for j in range(n_items):
            topic = seen[j % len(seen)]
            x, y = _item(task, topic, persona["answer"][topic], rng)
            history.append({"id": f"{i}-h{j}", "input": x, "output": y})
        unseen = [t for t in topics if t not in seen] or topics
        queries = []
        for q in range(cfg.queries_per_user):
            topic = unseen[q % len(unseen)]
            x, y = _item(task, topic, persona["answer"][topic], rng)
            queries.append({"id": f"{i}-q{q}", "input": _query_input(task, x), "gold": y})
        yield {"user_id": f"synth-{i:05d}", "persona": persona["persona"], "history": history, "queries": queries}
