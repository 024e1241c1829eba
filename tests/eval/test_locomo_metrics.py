"""LoCoMo-harness metrics, BLEU-1, abstention and the LongMemEval rule, against hand-computed values."""

import math

import pytest

from lightmem_exp.eval.metrics import (
    answer_contained,
    bleu1,
    is_abstention,
    locomo_exact_match,
    locomo_multi_f1,
    locomo_normalize,
    locomo_reference,
    locomo_scores,
    locomo_token_f1,
    locomo_tokens,
    longmemeval_scores,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("The cat, and the hat!", "cat hat"),  # commas, punctuation, articles and "and" go
    ("Rex's ball", "rexs ball"),
    ("Salt and pepper", "salt pepper"),
    ("Andrew and Sandy", "andrew sandy"),  # "and" only as a whole word
    ("7 May 2023", "7 may 2023"),
])
def test_locomo_normalize(text, expected):
    assert locomo_normalize(text) == expected


def test_locomo_f1_compares_stemmed_tokens():
    assert locomo_tokens("Running dogs") == ["run", "dog"]
    # run dog | dog ran: one stem shared; P = 1/2, R = 1/2, F1 = 1/2
    assert locomo_token_f1("running dogs", "dog ran") == pytest.approx(0.5)
    assert locomo_token_f1("Painting", "paints") == pytest.approx(1.0)  # both stem to "paint"
    assert locomo_token_f1("", "") == 0.0  # nothing shared: 0, as in the harness


def test_locomo_multi_answer_f1_for_category_1():
    # answer parts: London -> best prediction part London (1.0); Rome -> 0.0; mean 0.5
    assert locomo_multi_f1("Paris, London", "London, Rome") == pytest.approx(0.5)
    s = locomo_scores("Paris, London", "London, Rome", 1)
    assert s["f1"] == pytest.approx(0.5)
    # the same strings under category 4 are one answer: tokens paris london | london rome -> P = R = 1/2
    assert locomo_scores("Paris, London", "London, Rome", 4)["f1"] == pytest.approx(0.5)
    assert locomo_scores("London", "London, Rome", 4)["f1"] == pytest.approx(2 / 3)  # P = 1, R = 1/2


def test_category_3_scores_the_answer_before_the_semicolon():
    assert locomo_reference("Connecticut; the shelter was there", 3) == "Connecticut"
    assert locomo_scores("Connecticut", "Connecticut; the shelter was there", 3)["f1"] == 1.0
    assert locomo_reference("a; b", 4) == "a; b"


def test_locomo_exact_match_compares_token_sets():
    assert locomo_exact_match("hat, the cat hat", "Cat and hat") == 1.0
    assert locomo_exact_match("cat", "cat hat") == 0.0


def test_bleu1_hand_computed():
    # pred cat sat on mat mat (5), ref cat on mat (3): clipped matches cat, on, mat = 3 -> 3/5; c > r: no penalty
    assert bleu1("cat sat on mat mat", "cat on mat") == pytest.approx(0.6)
    # pred cat (1), ref cat on mat (3): precision 1, brevity penalty exp(1 - 3/1)
    assert bleu1("cat", "the cat on a mat") == pytest.approx(math.exp(-2))
    # equal lengths: no penalty; pred x y vs ref x z: 1/2
    assert bleu1("x y", "x z") == pytest.approx(0.5)
    assert bleu1("", "cat") == 0.0 and bleu1("cat", "") == 0.0


def test_category_5_is_scored_as_abstention():
    assert is_abstention("That is Not Mentioned in the conversation.")
    assert is_abstention("No information available.")
    assert not is_abstention("a violin")
    assert not is_abstention("I am not sure")  # only the harness's two phrases count
    assert locomo_scores("Not mentioned.", None, 5) == {"f1": 1.0, "bleu1": 1.0, "em": 1.0, "abstention": 1.0}
    assert locomo_scores("violin", None, 5) == {"f1": 0.0, "bleu1": 0.0, "em": 0.0, "abstention": 0.0}


def test_longmemeval_rule_based_accuracy():
    assert answer_contained("She studied Business Administration.", "business administration")
    assert not answer_contained("business administrations", "Business Administration")  # whole words only
    assert not answer_contained("anything", "")
    s = longmemeval_scores("I think it was business administration", "Business Administration", False)
    assert s["acc"] == 1.0 and s["em"] == 0.0 and 0 < s["f1"] < 1
    assert longmemeval_scores("Not mentioned", "The user never said", True)["acc"] == 1.0
    assert longmemeval_scores("Paris", "The user never said", True)["acc"] == 0.0
