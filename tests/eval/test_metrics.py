"""SQuAD-style answer metrics against hand-computed values."""

import math

import pytest

from lightmem_exp.eval.metrics import exact_match, mean_scores, normalize_answer, token_f1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat sat on a mat.", "cat sat on mat"),
        ("  An   apple,  the pear!  ", "apple pear"),
        ("Rex's ball", "rexs ball"),  # punctuation is deleted, not replaced by a space
        ("2023-05-08", "20230508"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower in Paris", "Eiffel Tower") == 0.0


def test_token_f1_hand_computed():
    # pred tokens: caroline went to support group (5); ref: caroline attended support group (4); common 3
    # P = 3/5, R = 3/4, F1 = 2 * 0.45 / 1.35 = 2/3
    assert token_f1("Caroline went to a support group.", "Caroline attended the support group") == pytest.approx(2 / 3)
    # multiset overlap, pred: x x y (3), ref: x y y z (4); common = min(2,1) + min(1,2) = 2; P = 2/3, R = 2/4; F1 = 4/7
    assert token_f1("x x y", "x y y z") == pytest.approx(4 / 7)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("The", "") == 1.0  # both normalise to nothing
    assert token_f1("", "cat") == 0.0


def test_mean_scores():
    m = mean_scores(["Paris", "the red car", "blue"], ["paris", "red truck", "green"])
    # EM: 1, 0, 0 -> 1/3; F1: 1, (P=1/2, R=1/2 -> 1/2), 0 -> 1/2
    assert m["em"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(0.5)
    assert all(math.isnan(v) for v in mean_scores([], []).values())
    with pytest.raises(ValueError):
        mean_scores(["a"], [])
