"""The embedded demo benchmark: deterministic, and each query's answer is where the module docstring says."""

import pytest

from mta_ray.config import SyntheticConfig
from mta_ray.core.tasks import LAMP2_TAGS, get_task
from mta_ray.files.synthetic import (ALL_TOPICS, GENERAL_TOPICS, QUERY_KINDS, TOPICS, generate_users,
                                     persona_table, query_kind, topic_of)

TASK = get_task("lamp2")


def _users(**kw):
    cfg = SyntheticConfig(**{"num_users": 40, "num_personas": 4, "queries_per_user": 4, **kw})
    return list(generate_users(cfg, TASK))


def _query_topic(q) -> str:
    return topic_of(TASK.query_slots(q["input"])["x"])


@pytest.mark.parametrize("task", ["lamp2", "lamp4"])
def test_deterministic_and_seeded(task):
    cfg = SyntheticConfig(num_users=12, seed=3)
    a = list(generate_users(cfg, get_task(task)))
    assert a == list(generate_users(cfg, get_task(task)))
    assert a != list(generate_users(SyntheticConfig(num_users=12, seed=4), get_task(task)))


def test_queries_cycle_through_the_four_kinds():
    for u in _users():
        assert [query_kind(q["id"]) for q in u["queries"]] == list(QUERY_KINDS)


def test_every_persona_answers_its_topics_one_way_and_never_the_obvious_way():
    users = _users()
    answers = {}
    for u in users:
        for it in u["history"]:
            if topic_of(it["input"]) in TOPICS:
                answers.setdefault((u["persona"], topic_of(it["input"])), set()).add(it["output"])
    assert all(len(v) == 1 for v in answers.values())
    assert all(ALL_TOPICS[t]["tags"][0] not in v for (_, t), v in answers.items())


def test_shared_answers_are_carried_by_other_users_of_the_persona_only():
    users = _users()
    ordinary = [u for u in users if len(u["history"]) <= 6]
    assert ordinary
    for u in ordinary:
        q = next(q for q in u["queries"] if query_kind(q["id"]) == "shared")
        topic = _query_topic(q)
        assert topic not in {topic_of(it["input"]) for it in u["history"]}     # not in its own items
        assert q["gold"] != ALL_TOPICS[topic]["tags"][0]                        # not the obvious guess
        mates = [v for v in users if v["persona"] == u["persona"] and v is not u]
        assert any(topic_of(it["input"]) == topic and it["output"] == q["gold"] for v in mates for it in v["history"])


def test_quirk_answers_are_in_the_users_own_items_and_not_the_crowds():
    for u in _users():
        q = next(q for q in u["queries"] if query_kind(q["id"]) == "quirk")
        topic = _query_topic(q)
        assert topic in GENERAL_TOPICS and q["gold"] != GENERAL_TOPICS[topic]["tags"][0]
        assert any(topic_of(it["input"]) == topic and it["output"] == q["gold"] for it in u["history"])


def test_plain_answers_are_named_by_the_description():
    for u in _users():
        q = next(q for q in u["queries"] if query_kind(q["id"]) == "plain")
        topic = _query_topic(q)
        assert topic in GENERAL_TOPICS and q["gold"] == GENERAL_TOPICS[topic]["tags"][0] in LAMP2_TAGS
        assert q["gold"] in TASK.query_slots(q["input"])["x"].lower()
    for spec in ALL_TOPICS.values():  # every cue names its topic's obvious tag
        assert spec["tags"][0] in spec["cue"].lower() and set(spec["tags"]) <= set(LAMP2_TAGS)


def test_own_answers_are_in_the_users_own_items():
    for u in _users():
        q = next(q for q in u["queries"] if query_kind(q["id"]) == "own")
        assert any(topic_of(it["input"]) == _query_topic(q) and it["output"] == q["gold"] for it in u["history"])


def test_personas_have_own_topics_and_non_obvious_answers():
    personas = persona_table(8, 0)
    first_four = [set(p["topics"]) for p in personas[:4]]
    assert all(not (a & b) for i, a in enumerate(first_four) for b in first_four[i + 1:])
    assert all(idx in (1, 2) for p in personas for idx in p["answer"].values())   # never the obvious tag
    for p in personas:  # a persona's two topics never share a tag
        a, b = p["topics"]
        assert TOPICS[a]["tags"][p["answer"][a]] != TOPICS[b]["tags"][p["answer"][b]]
    for p in range(4):  # a second round of personas reuses the topics
        assert personas[p]["topics"] == personas[p + 4]["topics"]


def test_active_users_are_the_longest_histories():
    cfg = SyntheticConfig(num_users=20, num_personas=4, active_users_per_persona=1, active_items=16)
    users = list(generate_users(cfg, TASK))
    longest = sorted(users, key=lambda u: -len(u["history"]))[:4]
    assert sorted(u["persona"] for u in longest) == [0, 1, 2, 3]


def test_generation_task_titles_follow_persona_styles():
    users = list(generate_users(SyntheticConfig(num_users=8), get_task("lamp4")))
    q = users[5]["queries"][0]
    assert q["input"].startswith("Generate a headline for the following article: ")
    assert any(marker in q["gold"] for marker in (": what you need to know", "Why ", "Breaking news"))


def test_other_tasks_are_refused():
    with pytest.raises(ValueError, match="lamp3"):
        generate_users(SyntheticConfig(), get_task("lamp3"))


def test_short_tagging_task_asks_the_same_queries_with_its_own_prompt():
    """``lamp2-synthetic`` (the demo's task): the same users and golds as ``lamp2``, a prompt a third as
    long that shows the format by an example whose tag is no label, and LaMP-2's prompt left as it was."""
    cfg = SyntheticConfig(num_users=12, queries_per_user=4)
    short_task = get_task("lamp2-synthetic")
    short, lamp2 = list(generate_users(cfg, short_task)), list(generate_users(cfg, TASK))
    assert [u["history"] for u in short] == [u["history"] for u in lamp2]
    for us, ul in zip(short, lamp2):
        for qs, ql in zip(us["queries"], ul["queries"]):
            x = short_task.query_slots(qs["input"])["x"]
            assert qs["gold"] == ql["gold"] and x == TASK.query_slots(ql["input"])["x"]
            prompt = short_task.prompt({"x": x}, [])
            assert prompt.endswith(f"Movie: {x}\nTag:\n") and len(prompt) < len(TASK.prompt({"x": x}, [])) / 2
    example = short_task.instruction.split("\n\n")[0]
    assert "Tag:\nwestern" in example and not any(tag in example.lower() for tag in LAMP2_TAGS)
    assert "tags: [sci-fi, based on a book" in TASK.prompt({"x": "a film"}, [])
    assert short_task.labels == TASK.labels
