"""VQA accuracy against hand-computed cases of the official evaluator (vqaEval.py): every normalisation rule of the
predicted answer, the human answers' punctuation-only processing, fewer than 3 matches and the leave-one-out mean."""

import numpy as np
import pytest

from mmjax.evaluation import vqa


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"),                       # number words -> digits (after lowercasing)
    ("none", "0"),
    ("the dog.", "dog"),                # articles dropped, a period not followed by a digit dropped
    ("A Red Ball", "red ball"),
    ("2.5", "2.5"),                     # a period followed by a digit stays
    ("yes!", "yes"),                    # "!" next to nothing: becomes a space, then stripped
    ("dont", "don't"),                  # contractions
    ("isnt it", "isn't it"),
    ("1,000", "1000"),                  # digit-comma-digit anywhere: every punctuation mark is dropped
    ("red, white", "red white"),        # ", " (mark next to a space): dropped
    ("red,white", "red white"),         # a mark with no space around it becomes a space
    ("left-hand side", "left hand side"),
    ("  tab\tnew\nline ", "tab new line"),
])
def test_answer_normalisation(raw, normalised):
    assert vqa.normalize_answer(raw) == normalised


def test_leave_one_out_scores_by_number_of_matching_humans():
    # 10 humans; k of them said "cat". Each subset of 9 holds k or k - 1 matches: mean of min(m / 3, 1).
    def humans(k):
        return ["cat"] * k + ["dog"] * (10 - k)

    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}
    scores = vqa.accuracy(["cat"] * len(expected), [humans(k) for k in expected])
    np.testing.assert_allclose(scores, list(expected.values()), atol=1e-12)
    # By hand for k = 2: 2 subsets (leaving a "cat" out) see 1 match -> 1/3; 8 see 2 -> 2/3; mean 0.6.
    assert scores[2] == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)


def test_fewer_than_ten_humans_and_the_prediction_is_normalised():
    scores = vqa.accuracy(["Two", "the Dog"], [["2", "2", "two"], ["dog"] * 3])
    # Q1: humans differ, so they get punctuation processing only: "two" stays "two"; the prediction "2" matches 2
    # of 3 -> leave-one-out: dropping a "2" leaves 1 match (1/3), dropping "two" leaves 2 (2/3): mean 4/9.
    assert scores[0] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    # Q2: "the Dog" -> "dog"; 3 identical humans: every subset of 2 has 2 matches -> 2/3.
    assert scores[1] == pytest.approx(2 / 3)


def test_human_answers_get_punctuation_processing_only_when_they_differ():
    # Differing humans get processPunctuation alone: "yes!" becomes "yes " (the mark turns into a space and nothing
    # strips it), which the prediction "yes" does not equal; it still matches the 9 others.
    humans = ["yes"] * 9 + ["yes!"]
    assert vqa.accuracy(["yes"], [humans])[0] == pytest.approx(1.0)
    assert vqa.accuracy(["yes"], [["yes"] * 2 + ["yes!"] * 8])[0] == pytest.approx(0.6)
    # Identical humans are compared as given: "Yes" x10 never equals the normalised prediction "yes".
    assert vqa.accuracy(["yes"], [["Yes"] * 10])[0] == 0.0
    # ... but differing ones are not lowercased either (punctuation only): "Yes" still never matches.
    assert vqa.accuracy(["yes"], [["Yes"] * 5 + ["no"] * 5])[0] == 0.0


def test_errors():
    with pytest.raises(ValueError, match="2 predicted answers for 1 questions"):
        vqa.accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no human answers"):
        vqa.accuracy(["a"], [[]])
