"""The embedded demo benchmark: LaMP-format users whose answers come from four known sources.

Every method of the report has a job here, and the structure says which queries each one can
reach, so a reader can check the table against it. ``configs/demo.yaml`` runs it.

**Topics.** Items are movie descriptions (or articles, for the title tasks) about a topic. Each
topic has three answers: its *obvious* one, which the description's opening names ("A sci-fi
film: an astronaut ...", obvious tag ``sci-fi``), and two others. Eight *persona topics* (space,
crime, romance, magic, war, mind, society, family) and four *general topics* (action, novel,
mystery, satire). For the title tasks (LaMP-4/5) the three answers are three headline styles.

**Personas.** A persona is a taste shared by a group of users: two persona topics of its own,
each answered one fixed non-obvious way (e.g. persona 0 tags its space films ``dystopia``);
``personas.json`` holds the table. General topics are everyone's, answered the obvious way.

**Users.** Each user belongs to a persona. An ordinary user's history (``min_items`` to
``max_items`` items, in the cycle own, quirk, own, quirk, plain, own) holds:

- *own* items: its persona's first topic, with the persona's answer (about half);
- *quirk* items: one general topic that this user alone answers its own non-obvious way (a third);
- *plain* items: other general topics, answered the obvious way (the rest).

It has no item on its persona's second topic. ``active_users_per_persona`` users of each persona
have ``active_items`` items on *both* persona topics (three quarters), their quirk and a plain
topic: the most active user of a cluster (the anchor), and what carries the persona's answers to
the others.

**Queries** cycle through four kinds, one share each (``queries_per_user: 3`` gives the first
three; the query id ends with its kind):

| kind | topic | gold | where the answer is |
| --- | --- | --- | --- |
| ``shared`` | the persona's second topic | the persona's answer | other users of the persona (the anchors) |
| ``quirk`` | the user's quirk topic | the user's own answer | only the user's own items |
| ``plain`` | a general topic the user has no item on | the obvious answer | the prompt (the description names it) |
| ``own`` | the persona's first topic | the persona's answer | the user's own items and the anchors |

(An active user has items on both persona topics, so its ``shared`` query is answered by its own
items too.)

**What the structure predicts.** The queries each method can reach, if its mechanism works at all
with the model:

- ``base`` (prompt without history): ``plain`` only, and only if the model answers with a bare tag
  (the demo's task, ``lamp2-synthetic``, shows the format by one example whose tag is no label; under
  LaMP-2's own prompt, which lists all 15 tags, SmolLM2-135M answers by listing tags);
- ``rag_k1/3/5``: ``plain`` (the retrieved items show the format), ``quirk`` and ``own`` by
  reading retrieved items of the same topic; not ``shared`` (no item of that topic, and the
  obvious guess is wrong by construction);
- ``oppu``, ``adapt_only``: ``quirk``, ``own`` and ``plain``, learned from the user's own items;
  not ``shared``;
- ``merged_only``: ``shared``, ``own`` and ``plain`` from the persona's anchors; not ``quirk``
  (the anchors answer general topics the obvious way);
- ``mta``: all four (the merged anchors for ``shared``, the stacked adapter for ``quirk``).

So MTA should be the best and base the worst, and merged-only and adapt-only should each trail
MTA by the share the other one reaches. The structure does **not** order merged-only,
adapt-only, OPPU and RAG among themselves (each reaches all but one kind): that is decided by how
well each mechanism works with the model (in-context copying, learning from 4-8 items, a merge of
two anchors), and the report shows what the runs give, whichever way it goes.

**Prompts.** ``lamp2`` gives the queries LaMP-2's instruction (all 15 tags listed, ~94 tokens a
prompt); ``lamp2-synthetic`` (``configs/demo.yaml``) the same users, golds and labels with a prompt of
~52 tokens (``core.tasks.SYNTHETIC_TAG_INSTRUCTION``): every stage's compute is about proportional to
prompt tokens on a CPU.

Seeded and deterministic: the same config always yields the same users.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

from mta_ray.config import SyntheticConfig
from mta_ray.core.tasks import Task

TOPICS: dict[str, dict[str, Any]] = {
    "space": {"tags": ["sci-fi", "dystopia", "action"], "cue": "A sci-fi film",
              "who": ["an astronaut", "a starship crew", "a lonely pilot", "a robot engineer"],
              "does": ["drifts toward", "must reach", "is stranded near", "fights to escape"],
              "what": ["a dying star", "a distant planet", "an alien moon", "a black hole"]},
    "crime": {"tags": ["violence", "twist ending", "dark comedy"], "cue": "A crime film full of violence",
              "who": ["a weary detective", "a getaway driver", "two small-time crooks", "a crime boss"],
              "does": ["plans a heist of", "is hunted for", "investigates a murder at", "double-crosses"],
              "what": ["a casino vault", "the city docks", "a mob family", "a jewellery store"]},
    "romance": {"tags": ["romance", "comedy", "classic"], "cue": "A romance",
                "who": ["a shy baker", "two old friends", "a travelling singer", "a young widow"],
                "does": ["falls for", "keeps meeting", "writes letters to", "competes with"],
                "what": ["a charming stranger", "the neighbour upstairs", "a rival florist", "a sailor on leave"]},
    "magic": {"tags": ["fantasy", "based on a book", "classic"], "cue": "A fantasy film",
              "who": ["a young wizard", "an orphan princess", "a talking fox", "a knight errant"],
              "does": ["searches for", "is cursed by", "must protect", "steals"],
              "what": ["an enchanted sword", "a dragon's egg", "a hidden kingdom", "a witch's spellbook"]},
    "war": {"tags": ["true story", "violence", "action"], "cue": "A war film from a true story",
            "who": ["a field medic", "a platoon of soldiers", "a resistance fighter", "a wartime nurse"],
            "does": ["holds the line at", "smuggles refugees across", "survives the siege of", "defends"],
            "what": ["a ruined village", "the eastern front", "a bombed city", "a mountain pass"]},
    "mind": {"tags": ["psychology", "thought-provoking", "twist ending"], "cue": "A psychology drama",
             "who": ["a troubled therapist", "an insomniac clerk", "a patient with amnesia", "a grieving father"],
             "does": ["doubts the memory of", "is haunted by", "slowly unravels", "keeps dreaming of"],
             "what": ["a childhood accident", "a missing sister", "a second identity", "an empty house"]},
    "society": {"tags": ["social commentary", "dystopia", "dark comedy"], "cue": "A social commentary",
                "who": ["a factory worker", "a reality-show host", "a city clerk", "a teenage activist"],
                "does": ["exposes", "rebels against", "is crushed by", "profits from"],
                "what": ["a corrupt government", "a surveillance state", "a greedy corporation", "a rigged election"]},
    "family": {"tags": ["comedy", "based on a book", "true story"], "cue": "A family comedy",
               "who": ["a clumsy dad", "three siblings", "a stubborn grandmother", "a new stepmother"],
               "does": ["plans a road trip to", "tries to save", "inherits", "reunites at"],
               "what": ["the family farm", "a seaside hotel", "a failing bakery", "a summer camp"]},
}

# Topics no persona owns: every user's plain items, and each user's quirk, are about these.
GENERAL_TOPICS: dict[str, dict[str, Any]] = {
    "action": {"tags": ["action", "violence", "twist ending"], "cue": "An action film",
               "who": ["a bounty hunter", "an ex-soldier", "a bodyguard", "a stunt driver"],
               "does": ["chases", "races across", "battles through", "escapes from"],
               "what": ["a burning skyscraper", "a speeding train", "a jungle fortress", "a desert highway"]},
    "novel": {"tags": ["based on a book", "classic", "romance"], "cue": "A film based on a book",
              "who": ["a Victorian governess", "a young poet", "a ship's captain", "an old librarian"],
              "does": ["inherits", "writes about", "returns to", "discovers"],
              "what": ["a country estate", "a lost manuscript", "a whaling ship", "a forgotten diary"]},
    "mystery": {"tags": ["twist ending", "thought-provoking", "psychology"], "cue": "A film with a twist ending",
                "who": ["a small-town sheriff", "a night-shift nurse", "a retired magician", "a ghost writer"],
                "does": ["uncovers", "is lured into", "keeps returning to", "vanishes from"],
                "what": ["a locked room", "an abandoned lighthouse", "a masked ball", "a stolen painting"]},
    "satire": {"tags": ["dark comedy", "comedy", "violence"], "cue": "A dark comedy",
               "who": ["a funeral director", "an unlucky hitman", "a bored accountant", "a game-show contestant"],
               "does": ["accidentally ruins", "tries to hide", "bungles", "cashes in on"],
               "what": ["a wedding", "a body in the freezer", "a lottery win", "a company picnic"]},
}
ALL_TOPICS = {**TOPICS, **GENERAL_TOPICS}

# Headline styles for the generation task: the three "answers" of each topic are styles.
STYLES = [
    "{Subject}: what you need to know",
    "Why {subject} matters more than ever",
    "Breaking news - {subject} shocks everyone",
]

PERSONA_TOPICS = [("space", "society"), ("crime", "mind"), ("romance", "family"), ("magic", "war")]

SYNTHETIC_TASKS = ("lamp2", "lamp2-synthetic", "lamp4", "lamp5")
"""Tagging with LaMP-2's prompt or the demo's short one (``core.tasks``), and the two title tasks."""
QUERY_KINDS = ("shared", "quirk", "plain", "own")
"""The order a user's queries cycle through (see the module docstring's table)."""
HISTORY_CYCLE = ("own", "quirk", "own", "quirk", "plain", "own")
"""An ordinary user's item kinds, in order: half own, a third quirk, a sixth plain."""
ACTIVE_CYCLE = ("own", "second", "own", "second", "quirk", "plain", "own", "second")
"""An active user's item kinds: both persona topics (three quarters), its quirk and a plain topic."""


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
    """(description, subject phrase) of one item about ``topic``; the description opens with the
    topic's cue, which names its obvious answer."""
    t = ALL_TOPICS[topic]
    who, does, what = rng.choice(t["who"]), rng.choice(t["does"]), rng.choice(t["what"])
    return f"{t['cue']}: {who} {does} {what}.", f"{who} and {what}"


def _item(task: Task, topic: str, answer: int, rng: random.Random) -> tuple[str, str]:
    """(input, output) for one item in the task's format."""
    desc, subject = _text(topic, rng)
    if task.kind == "classification":  # tags; the title tasks' answers are headline styles
        return desc, ALL_TOPICS[topic]["tags"][answer]
    style = STYLES[answer]
    title = style.format(Subject=subject[0].upper() + subject[1:], subject=subject)
    return desc, title


def _query_input(task: Task, text: str) -> str:
    if task.name == "lamp2-synthetic":  # its prompt is its own (core.tasks); the query only carries the text
        return f"description: {text}"
    if task.name == "lamp2":
        return task.instruction.split("\ndescription:")[0].replace("\n", " ") + f" description: {text}"
    if task.name == "lamp4":
        return f"Generate a headline for the following article: {text}"
    return f"Generate a title for the following abstract of a paper: {text}"


def generate_users(cfg: SyntheticConfig, task: Task) -> Iterator[dict[str, Any]]:
    """Users in the processed form (user_id, persona, history, queries), generated one at a time."""
    if task.name not in SYNTHETIC_TASKS:
        raise ValueError(f"the synthetic benchmark has lamp2/lamp2-synthetic (tagging) and lamp4/lamp5 (titles), "
                         f"not {task.name}")
    return _generate(cfg, task)


def user_profile(persona: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One user's topics and answers: ``own`` and ``second`` (its persona's topics; an ordinary user
    has items on ``own`` only), ``quirk`` (a general topic it answers its own non-obvious way) and
    ``plain`` (the other general topics, answered the obvious way)."""
    own, second = persona["topics"]
    quirk = rng.choice(list(GENERAL_TOPICS))
    answer = {t: 0 for t in ALL_TOPICS}
    answer.update(persona["answer"])
    answer[quirk] = 1 + rng.randrange(2)
    return {"own": own, "second": second, "quirk": quirk, "answer": answer,
            "plain": [t for t in GENERAL_TOPICS if t != quirk]}


def _topic(kind: str, profile: dict[str, Any], rng: random.Random, avoid: set[str] = frozenset()) -> str:
    """The topic of an item or query of ``kind``; a plain one is drawn from the plain topics not in ``avoid``."""
    if kind != "plain":
        return profile[kind]
    pool = [t for t in profile["plain"] if t not in avoid] or profile["plain"]
    return rng.choice(pool)


def _generate(cfg: SyntheticConfig, task: Task) -> Iterator[dict[str, Any]]:
    rng = random.Random(f"users-{cfg.seed}")
    personas = persona_table(cfg.num_personas, cfg.seed)
    for i in range(cfg.num_users):
        persona = personas[i % cfg.num_personas]
        active = i // cfg.num_personas < cfg.active_users_per_persona
        n_items = cfg.active_items if active else rng.randint(cfg.min_items, cfg.max_items)
        profile = user_profile(persona, rng)
        cycle = ACTIVE_CYCLE if active else HISTORY_CYCLE
        history = []
        for j in range(n_items):
            topic = _topic(cycle[j % len(cycle)], profile, rng)
            x, y = _item(task, topic, profile["answer"][topic], rng)
            history.append({"id": f"{i}-h{j}", "input": x, "output": y})
        seen = {topic_of(it["input"]) for it in history}
        queries = []
        for q in range(cfg.queries_per_user):
            kind = QUERY_KINDS[q % len(QUERY_KINDS)]
            topic = _topic("second" if kind == "shared" else kind, profile, rng, avoid=seen)
            x, y = _item(task, topic, profile["answer"][topic], rng)
            queries.append({"id": f"{i}-q{q}-{kind}", "input": _query_input(task, x), "gold": y})
        yield {"user_id": f"synth-{i:05d}", "persona": persona["persona"], "history": history, "queries": queries}


def topic_of(description: str) -> str:
    """The topic a generated description is about (from its cue)."""
    return next(t for t, spec in ALL_TOPICS.items() if description.startswith(spec["cue"] + ":"))


def query_kind(query_id: str) -> str:
    """The kind (``shared``, ``quirk``, ``plain``, ``own``) of a generated query, from its id."""
    return query_id.rsplit("-", 1)[-1]
