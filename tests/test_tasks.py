import pytest

from mta_ray.core.retrieval import HistoryIndex
from mta_ray.core.tasks import LAMP2_TAGS, get_task

OFFICIAL_INPUTS = {
    "lamp1": ('For an author who has written the paper with the title "Deep nets for graphs", which reference '
              'is related? Just answer with [1] or [2] without explanation. [1]: "Graph kernels" [2]: "Soup recipes"'),
    "lamp2": ("Which tag does this movie relate to among the following tags? Just answer with the tag name "
              "without further explanation. tags: [sci-fi, comedy] description: A robot learns to love."),
    "lamp3": ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
              "or 5 without further explanation. review: Broke after two days."),
    "lamp4": "Generate a headline for the following article: The city council voted to close the park.",
    "lamp5": "Generate a title for the following abstract of a paper: We study sparse attention.",
}
EXPECTED_X = {"lamp1": "Deep nets for graphs", "lamp2": "A robot learns to love.",
              "lamp3": "Broke after two days.", "lamp4": "The city council voted to close the park.",
              "lamp5": "We study sparse attention."}


@pytest.mark.parametrize("name", sorted(OFFICIAL_INPUTS))
def test_query_slots_from_official_lamp_inputs(name):
    slots = get_task(name).query_slots(OFFICIAL_INPUTS[name])
    assert slots["x"] == EXPECTED_X[name]
    if name == "lamp1":
        assert (slots["o1"], slots["o2"]) == ("Graph kernels", "Soup recipes")


def test_unknown_task():
    with pytest.raises(KeyError, match="unknown task 'lamp9'"):
        get_task("lamp9")


def test_lamp2_prompt_follows_appendix_e():
    task = get_task("lamp2")
    history = [{"id": "1", "input": "Aliens invade.", "output": "sci-fi"}]
    p = task.prompt({"x": "A robot learns to love."}, history)
    assert p.startswith('User History:\nthe tag for the movie: "Aliens invade." is "sci-fi"\n\nUser Instruction:\n')
    assert "tags: [" + ", ".join(LAMP2_TAGS) + "]" in p
    assert p.endswith("description: A robot learns to love.\nTag:")
    assert task.prompt({"x": "y"}, []).startswith("User Instruction:\n")


def test_training_pairs_put_the_item_in_the_query_slot_and_never_retrieve_it():
    task = get_task("lamp2")
    history = [{"id": str(i), "input": text, "output": tag} for i, (text, tag) in enumerate([
        ("space ship crew lost in space", "sci-fi"),
        ("space station crew fights aliens in space", "action"),
        ("a baker falls in love", "romance"),
    ])]
    pairs = task.training_pairs(history, k=1)
    assert [t for _, t in pairs] == ["sci-fi", "action", "romance"]
    p0 = pairs[0][0]
    assert p0.endswith("description: space ship crew lost in space\nTag:")
    # leave-one-out: item 0 retrieves item 1 (shares "space", "crew"), not itself
    assert 'the tag for the movie: "space station crew fights aliens in space" is "action"' in p0
    assert 'movie: "space ship crew lost in space"' not in p0.split("User Instruction")[0]


def test_bm25_top_k_is_deterministic_and_leave_one_out():
    idx = HistoryIndex(["red apple", "green apple", "blue sky", "red red apple"])
    assert idx.top_k("red apple", 2) == [3, 0]
    assert idx.top_k("red apple", 2, exclude=3) == [0, 1]
    assert idx.top_k("nothing matches", 2) == [0, 1]   # ties: earlier first
    assert HistoryIndex([]).top_k("x", 3) == []
    assert HistoryIndex(["a", "the", "!!"]).top_k("the a", 2, exclude=0) == [1, 2]  # nothing indexable


def test_lamp1_pairs_are_two_choice_questions():
    task = get_task("lamp1")
    history = [{"id": "a", "input": "Graph neural networks for molecules", "output": "abs"},
               {"id": "b", "input": "Molecular graph generation", "output": "abs"},
               {"id": "c", "input": "Speech recognition with transformers", "output": "abs"}]
    pairs = task.training_pairs(history, k=1, negatives=["Molecules in soup", "Cooking pasta"])
    for prompt, target in pairs:
        assert target in ("[1]", "[2]")
        assert "Reference: [1] - " in prompt and prompt.endswith("Answer:")
    p0, t0 = pairs[0]
    chosen = p0.split("Reference: ")[1]
    right = "Molecular graph generation"
    assert (chosen.index(right) < chosen.index("[2]")) == (t0 == "[1]")


@pytest.mark.parametrize("name,raw,parsed", [
    ("lamp2", "  Sci-Fi\nbecause", "sci-fi"),
    ("lamp2", '"twist ending".', "twist ending"),
    ("lamp2", "horror", "horror"),
    ("lamp3", " 4", "4"),
    ("lamp3", "4.0", "4"),
    ("lamp3", "45", "45"),
    ("lamp1", "[2]", "[2]"),
    ("lamp5", ' "A title"\nmore', "A title"),
])
def test_parse_output(name, raw, parsed):
    assert get_task(name).parse_output(raw) == parsed


def _options(prompt):
    """(option 1, option 2) of a LaMP-1 training question."""
    refs = prompt.split("Reference: [1] - ")[1].split("\nAnswer:")[0]
    o1, o2 = refs.split(" [2] - ")
    return o1, o2


def test_lamp1_negative_is_the_bm25_closest_of_other_users_titles():
    task = get_task("lamp1")
    history = [{"id": "a", "input": "Graph neural networks for molecules", "output": "abs"},
               {"id": "b", "input": "Molecular graph generation", "output": "abs"},
               {"id": "c", "input": "Speech recognition with transformers", "output": "abs"}]
    negatives = ["Cooking pasta at home", "Graph kernels for molecules", "Transformers for speech synthesis",
                 "Molecular graph generation"]   # the last one equals the positive: never the negative
    pairs = task.training_pairs(history, k=1, negatives=negatives)
    options = [set(_options(p)) for p, _ in pairs]
    assert options[0] == {"Molecular graph generation", "Graph kernels for molecules"}
    assert "Transformers for speech synthesis" in options[2]
    assert all("A survey of unrelated work" not in o for o in options)
    for (prompt, target), item in zip(pairs, history):   # the target names the option that is the user's own
        o1, o2 = _options(prompt)
        own = o1 if target == "[1]" else o2
        assert own in {h["input"] for h in history} - {item["input"]}


def test_lamp1_without_other_users_falls_back_to_a_fixed_negative():
    task = get_task("lamp1")
    history = [{"id": "a", "input": "Graphs", "output": "x"}, {"id": "b", "input": "Trees", "output": "y"}]
    assert all("A survey of unrelated work" in p for p, _ in task.training_pairs(history, k=0))


def test_negative_pool_is_seeded_bounded_and_excludes_the_user(tmp_path):
    from mta_ray.files.tables import negative_pool, others_items, write_users

    users = [{"user_id": f"u{i}", "task": "lamp1", "persona": None, "queries": [],
              "history": [{"id": f"{i}-{j}", "input": f"paper {i}.{j}", "output": ""} for j in range(5)]}
             for i in range(40)]
    path = tmp_path / "users.parquet"
    write_users(users, path, batch_rows=7)
    pool = negative_pool(path, 32, seed=0)
    assert len(pool) == 32 and pool == negative_pool(path, 32, seed=0) != negative_pool(path, 32, seed=1)
    assert len({owner for owner, _ in pool}) > 10          # spread over the table, not its first rows
    mine = {u for u, _ in pool}.pop()
    assert all(not t.startswith(f"paper {mine[1:]}.") for t in others_items(pool, [mine]))
    assert negative_pool(path, 500, seed=0) == [(u["user_id"], h["input"]) for u in users for h in u["history"]][:200]
