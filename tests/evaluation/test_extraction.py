"""Answer extraction: the MetaMath "The answer is:" convention, exact match and number match."""

from __future__ import annotations

import pytest

from nemo_dft.evaluation.extraction import extract, is_correct, parse_number


@pytest.mark.parametrize("prediction,reference,mode,expected", [
    ("3 + 4 = 7. The answer is: 7", "Add them. The answer is: 7", "answer_is", True),
    ("The answer is: 7.0", "The answer is: 7", "answer_is", True),
    ("The answer is: 1,200", "#### 1200", "answer_is", True),  # GSM8K-style reference
    ("The answer is: 8", "The answer is: 7", "answer_is", False),
    ("so 7", "The answer is: 7", "answer_is", False),  # no marker in the prediction
    ("The answer is 12\nThe answer is: 13", "The answer is: 13", "answer_is", True),  # the last marker
    ("The answer is: blue", "The answer is: Blue.", "answer_is", True),
    ("The answer is: 7 apples", "The answer is: 7", "answer_is", True),  # the first number, as MetaMath
    ("The answer is: apples", "The answer is: 7", "answer_is", False),
    ("c a t", " c  a t ", "exact", True),
    ("c a t.", "c a t", "exact", True),
    ("c a ts", "c a t", "exact", False),
    ("about 42 of them", "42", "number", True),
    ("-3/4", "The answer is: -0.75", "number", True),
    ("$1,000 total", "The answer is: 1000", "number", True),
    ("no digits", "5", "number", False),
    ("The answer is: 5, not 6", "The answer is: 5", "number", True),  # the marked number first
])
def test_is_correct(prediction, reference, mode, expected):
    assert is_correct(prediction, reference, mode) is expected


def test_extract_and_numbers():
    assert extract("x\nThe answer is:  42 \nmore", "answer_is") == "42"
    assert extract("nothing here", "answer_is") is None
    assert parse_number("1,234.5 and then 7") == 7.0
    assert parse_number("none") is None
    with pytest.raises(ValueError, match="extract"):
        extract("x", "fuzzy")
