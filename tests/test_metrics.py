import math

import pytest
from rouge_score import rouge_scorer

from mta_ray.core.metrics import classification_scores, generation_scores, rating_value, regression_scores, score
from mta_ray.core.tasks import get_task


def test_classification_by_hand():
    labels = ["a", "b", "c"]
    golds = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "zzz"]          # "zzz" is outside the label set: wrong
    s = classification_scores(preds, golds, labels)
    assert s["accuracy"] == pytest.approx(0.5)
    # a: P=1/1 R=1/2 F=2/3 ; b: P=1/2 R=1/1 F=2/3 ; c: P=0 R=0 F=0
    assert s["f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_macro_f1_counts_labels_that_never_occur_like_lamp():
    s = classification_scores(["a"], ["a"], ["a", "b", "c", "d"])
    assert s["accuracy"] == 1.0 and s["f1"] == pytest.approx(0.25)


def test_classification_matches_sklearn():
    from sklearn.metrics import f1_score
    labels = ["x", "y", "z"]
    golds = ["x", "y", "z", "x", "y", "y", "z"]
    preds = ["x", "x", "z", "??", "y", "z", "z"]
    idx = {l: i for i, l in enumerate(labels)}
    ref = f1_score([idx.get(g, -1) for g in golds], [idx.get(p, -1) for p in preds],
                   labels=[0, 1, 2], average="macro", zero_division=0)
    assert classification_scores(preds, golds, labels)["f1"] == pytest.approx(ref)


def test_rating_penalty_is_the_farther_of_one_or_five():
    assert rating_value("4", "2") == 4.0
    assert rating_value("great", "2") == 5.0     # gold 2: 5 is farther
    assert rating_value("", "4") == 1.0          # gold 4: 1 is farther
    assert rating_value("7", "3") == 5.0         # out of range counts as unparsable; tie -> 5
    s = regression_scores(["4", "x", "1"], ["5", "2", "1"])
    # errors: 1, 3 (x -> 5), 0
    assert s["mae"] == pytest.approx(4 / 3)
    assert s["rmse"] == pytest.approx(math.sqrt((1 + 9 + 0) / 3))


def test_rouge_by_hand_and_against_rouge_score():
    s = generation_scores(["the cat sat"], ["the cat sat on the mat"])
    # unigram: 3 matches, P=3/3, R=3/6 -> F=2/3 ; LCS = 3 -> same
    assert s["rouge1"] == pytest.approx(2 / 3) and s["rougeL"] == pytest.approx(2 / 3)
    preds = ["Running dogs chase cats", "A study of neural networks", ""]
    golds = ["The dog runs after the cat", "Neural network studies: a survey", "Empty prediction"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    ref1 = sum(scorer.score(g, p)["rouge1"].fmeasure for p, g in zip(preds, golds)) / 3
    refl = sum(scorer.score(g, p)["rougeL"].fmeasure for p, g in zip(preds, golds)) / 3
    s = generation_scores(preds, golds)
    assert s["rouge1"] == pytest.approx(ref1) and s["rougeL"] == pytest.approx(refl)
    assert s["rouge1"] > 0.3  # stemming matters: dogs/dog, runs/running


def test_score_dispatches_by_task_kind():
    assert set(score(get_task("lamp2"), ["comedy"], ["comedy"])) == {"accuracy", "f1"}
    assert set(score(get_task("lamp3"), ["3"], ["3"])) == {"mae", "rmse"}
    assert set(score(get_task("lamp5"), ["a b"], ["a b"])) == {"rouge1", "rougeL"}
    with pytest.raises(ValueError):
        score(get_task("lamp2"), ["comedy"], [])
