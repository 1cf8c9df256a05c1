"""The embedded demo benchmark: deterministic, and built so that other users carry the answer."""

from collections import defaultdict

import pytest

from mta_ray.config import SyntheticConfig
from mta_ray.core.tasks import LAMP2_TAGS, get_task
from mta_ray.files.synthetic import TOPICS, generate_users, persona_table


def _topic_of(text: str) -> str:
    hits = [t for t, spec in TOPICS.items() if any(w in text for w in spec["what"])]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("task", ["lamp2", "lamp4"])
def test_deterministic_and_seeded(task):
    cfg = SyntheticConfig(num_users=12, seed=3)
    a = list(generate_users(cfg, get_task(task)))
    assert a == list(generate_users(cfg, get_task(task)))
    assert a != list(generate_users(SyntheticConfig(num_users=12, seed=4), get_task(task)))


def test_queries_need_the_persona_not_the_users_own_items():
    cfg = SyntheticConfig(num_users=40, num_personas=4)
    task = get_task("lamp2")
    users = list(generate_users(cfg, task))
    personas = persona_table(cfg.num_personas, cfg.seed)
    answer_by_persona_topic = defaultdict(set)
    for u in users:
        for it in u["history"]:
            answer_by_persona_topic[(u["persona"], _topic_of(it["input"]))].add(it["output"])
    # every persona answers each of its topics one way only
    assert all(len(v) == 1 for v in answer_by_persona_topic.values())
    ordinary = [u for u in users if len(u["history"]) <= cfg.max_items]
    assert ordinary
    for u in ordinary:
        own_topics = {_topic_of(it["input"]) for it in u["history"]}
        for q in u["queries"]:
            topic = _topic_of(task.query_slots(q["input"])["x"])
            assert topic not in own_topics                       # own history does not show it
            assert topic in personas[u["persona"]]["topics"]
            assert q["gold"] in LAMP2_TAGS
            # ...but another user of the same persona has items of that topic with that answer
            mates = [v for v in users if v["persona"] == u["persona"] and v is not u]
            assert any(_topic_of(it["input"]) == topic and it["output"] == q["gold"]
                       for v in mates for it in v["history"])


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
    users = list(generate_users(cfg, get_task("lamp2")))
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
