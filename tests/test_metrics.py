"""The metrics agree with hand computations and with sacrebleu / rouge-score called directly."""

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from stages.metrics import (
    answer_contained,
    bleu,
    exact_match,
    parse_numbered,
    rouge_l,
    score_composite,
    score_task,
)


def test_exact_match_normalises_case_space_and_punctuation():
    assert exact_match("  True.\nbecause it is", ["true"]) == 100.0
    assert exact_match("The  answer", ["the answer"]) == 100.0
    assert exact_match("not true", ["true"]) == 0.0
    assert exact_match("B", ["A", "b"]) == 100.0


def test_answer_contained():
    assert answer_contained("I think the answer is Paris, France.", ["paris"]) == 100.0
    assert answer_contained("London", ["Paris", "Rome"]) == 0.0
    assert answer_contained("anything", [""]) == 0.0
    assert answer_contained("The statement is incorrect.", ["correct"]) == 0.0
    assert answer_contained("I don't know", ["no"]) == 0.0
    assert answer_contained("No, it is not.", ["no"]) == 100.0
    assert answer_contained("answer: (b) 3.5 m/s!", ["3.5 m/s"]) == 100.0


def test_bleu_by_hand():
    # all n-gram precisions 1, hypothesis 6 tokens vs reference 8: BLEU = BP = exp(1 - 8/6)
    assert bleu(["a b c d e f"], [["a b c d e f g h"]]) == pytest.approx(100 * math.exp(1 - 8 / 6))
    # same length, precisions 5/6, 4/5, 3/4, 2/3: geometric mean (1/3) ** (1/4)
    assert bleu(["a b c d e x"], [["a b c d e f"]]) == pytest.approx(100 * (1 / 3) ** 0.25)


def test_bleu_agrees_with_sacrebleu_on_a_corpus():
    preds = ["The cat sat on the mat.", "It is raining today in Berlin", "hello"]
    refs = [["The cat is on the mat."], ["Today it is raining in Berlin.", "x"], ["hello world"]]
    expected = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]]).score
    assert bleu(preds, refs) == pytest.approx(expected)
    assert 0 < bleu(preds, refs) < 100


def test_rouge_l_by_hand_and_against_rouge_score():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 tokens of 6 on both sides
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(500 / 6)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pred, targets = "a quick brown dog jumps", ["the quick brown fox jumps over", "a dog"]
    best = max(scorer.score(t, pred)["rougeL"].fmeasure for t in targets)
    assert rouge_l(pred, targets) == pytest.approx(100 * best)


def test_score_task_primary_scores():
    acc = score_task("exact_match", ["yes", "no", "Yes."], [["yes"], ["yes"], ["yes"]])
    assert acc["score"] == pytest.approx(200 / 3) and acc["n"] == 3
    assert acc["per_example"] == [100.0, 0.0, 100.0]
    gen = score_task("generation", ["the cat sat on the mat"], [["the cat is on the mat"]])
    assert gen["score"] == gen["rouge_l"] == pytest.approx(500 / 6)
    assert gen["per_example"] == [pytest.approx(500 / 6)]
    assert "bleu" in gen
    with pytest.raises(ValueError, match="unknown metric"):
        score_task("f1", ["a"], [["a"]])


def test_parse_numbered_list():
    text = "1. True\n2) the second\n2.5 km continues it\n3. valid\n1. starting over\n4. extra"
    assert parse_numbered(text, 3) == ["True", "the second\n2.5 km continues it", "valid"]
    assert parse_numbered("1. only one", 3) == ["only one", None, None]
    assert parse_numbered("no list at all", 2) == [None, None]
    assert parse_numbered("1.\n2. b", 2) == [None, "b"]


def test_score_composite_counts_attempts_and_scores_each_subtask():
    preds = ["1. yes\n2. Paris is nice\n3. the cat sat on the mat", "1. no\n2. Rome"]
    refs = [["yes", "paris", "the cat is on the mat"], ["yes", "paris", "a dog"]]
    out = score_composite(preds, refs, ["exact_match", "contains", "generation"], ["t1", "t2", "t3"])
    assert out["subtasks"]["t1"]["score"] == 50.0
    assert out["subtasks"]["t2"]["score"] == 50.0
    assert out["subtasks"]["t3"]["score"] == pytest.approx((500 / 6) / 2)
    assert out["attempted"] == 2.5 and out["attempted_share"] == pytest.approx(2.5 / 3)
    assert out["average"] == pytest.approx((50 + 50 + 250 / 6) / 3)
