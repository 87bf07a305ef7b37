"""Checks for rlhfkit.rewards.rules on tricky answer strings; expectations follow the documented rules."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from rlhfkit.rewards.base import ScoringBatch
from rlhfkit.rewards.function import FunctionReward, import_callable
from rlhfkit.rewards.rules import (
    answers_match,
    exact_match,
    extract_final_answer,
    gold_answer,
    math_answer,
    normalize_answer,
    numeric_match,
    parse_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  42  ", "42"),
        ("$42$", "42"),
        ("$$42$$", "42"),
        (r"\(42\)", "42"),
        ("42.", "42"),
        (r"\text{Yes}.", "yes"),
        (r"\boxed{\text{(B)}}", "(b)"),
        ("1,000", "1000"),
        ("1,234,567.5", "1234567.5"),
        ("1, 2", "1, 2"),  # a pair, not a thousands separator
        ("1,00", "1,00"),  # not groups of three
        ("\u22123", "-3"),  # unicode minus
        ("\uff0d3", "-3"),  # full-width hyphen-minus (NFKC)
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\left( 1, 2 \right)", "( 1, 2 )"),
        (r"1\,000", "1000"),
        (r"50\%", "50%"),
        ("x = 5", "5"),
        (r"90^\circ", "90"),
        (r"\$18", "18"),
        ("Hello   World", "hello world"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "text, value",
    [
        ("42", Fraction(42)),
        ("-3", Fraction(-3)),
        ("\u22123", Fraction(-3)),
        ("+5", Fraction(5)),
        ("0.5", Fraction(1, 2)),
        (".5", Fraction(1, 2)),
        ("1/2", Fraction(1, 2)),
        ("-1/2", Fraction(-1, 2)),
        ("1.5/3", Fraction(1, 2)),
        (r"\frac{1}{2}", Fraction(1, 2)),
        (r"-\dfrac{3}{4}", Fraction(-3, 4)),
        (r"\frac12", Fraction(1, 2)),
        (r"\frac{-6}{4}", Fraction(-3, 2)),
        ("50%", Fraction(50)),  # the percent sign is dropped
        (r"12.5\%", Fraction(25, 2)),
        ("1,000", Fraction(1000)),
        ("1e3", Fraction(1000)),
        ("2.5E-4", Fraction(1, 4000)),
        (r"1.5 \times 10^{3}", Fraction(1500)),
        ("$42$", Fraction(42)),
        ("3.", Fraction(3)),
        ("- 3", Fraction(-3)),
        ("1 / 2", Fraction(1, 2)),
        ("123456789012345678901234567890", Fraction(123456789012345678901234567890)),
        ("1e400", Fraction(10) ** 400),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text", ["", None, "abc", "1/0", r"\frac{1}{0}", "1 1/2", "1 2", "x + 1", "1e99999", "nan", "inf", "1_000", "9" * 6000]
)
def test_parse_number_rejects_without_raising(text):
    assert parse_number(text) is None


@pytest.mark.parametrize(
    "candidate, answer, expected",
    [
        ("0.5", "1/2", True),
        (r"\frac{1}{2}", "0.5", True),
        ("1,000", "1000", True),
        ("1e3", "1000", True),
        ("\u22123", "-3", True),
        ("3.0", "3", True),
        ("50%", "50", True),
        ("50%", "0.5", False),  # documented: a percentage is its number, not a fraction of 1
        ("50%", "1/2", False),
        ("0.333", "1/3", False),  # off by 1e-3, beyond rel_tol 1e-6
        ("0.3333333333", "1/3", True),  # off by 1e-10 relative
        ("0", "0.0000000001", True),  # abs_tol 1e-9
        # integers compare exactly, however large
        ("123456789012345678901234567890", "123456789012345678901234567891", False),
        ("123456789012345678901234567890", "123,456,789,012,345,678,901,234,567,890", True),
        ("1e400", "1" + "0" * 400, True),
        ("abc", "1", False),
        ("1", None, False),
    ],
)
def test_numeric_match(candidate, answer, expected):
    assert numeric_match(candidate, answer) is expected


def test_numeric_match_tolerances():
    assert numeric_match("0.333", "1/3", rel_tol=1e-2)  # |diff| = 1/3000 <= 1e-2 * 1/3
    assert not numeric_match("0.5", "0.51", rel_tol=0.0, abs_tol=0.0)
    assert numeric_match("0.5", "0.51", rel_tol=0.0, abs_tol=0.02)


def test_exact_match():
    assert exact_match("$42$.", "42")
    assert exact_match(r"\text{Yes}", "yes")
    assert exact_match(r"\frac{1}{2}", r"\dfrac{1}{2}")
    assert not exact_match("0.5", "1/2")  # equal values, different strings: numeric_match's job
    assert not exact_match("", "")  # an empty gold answer never matches
    assert answers_match("0.5", "1/2") and answers_match("(B)", r"\text{(b)}")


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"So the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),
        (r"First \boxed{3}, then corrected: \boxed{4}", "4"),  # several boxed: last wins
        (r"\boxed{} then \boxed{7}", "7"),
        (r"\boxed{5} and later \boxed{}", "5"),  # an empty box is skipped
        (r"\boxed 5", "5"),
        (r"\fbox{12}", "12"),
        ("The answer is 42.", "42"),
        ("Final Answer: $\\frac{3}{4}$.", r"$\frac{3}{4}$"),
        ("Answer: 3.5", "3.5"),
        ("The answer is 18 dollars.", "18"),
        ("The answer is 4 or 5.", "4 or 5"),
        ("Janet earns 9 * 2 = 18 dollars.\n#### 18", "18"),  # GSM8K
        ("#### 1,000", "1,000"),
        ("answer is \u22123", "-3"),
        ("The answer is 7. Wait, the answer is 8.", "8"),  # the last marker wins
        ("I computed 3 + 4 = 7 and then 7 * 2 = 14", "14"),  # last number
        ("it costs -5 or 2.5e3 units", "2.5e3"),
        ("the range 5-3", "3"),  # a minus after a digit is subtraction
        ("it is -0.75 overall", "-0.75"),
        ("1,234 apples", "1,234"),
        ("half is $\\frac{1}{2}$ here", r"\frac{1}{2}"),
        ("no digits at all", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_without_last_number_fallback_and_gold_answer():
    assert extract_final_answer("3 + 4 = 7", fallback_to_last_number=False) is None
    assert gold_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert gold_answer(r"The area is \boxed{6}.") == "6"
    assert gold_answer("x + 1") == "x + 1"  # never the last-number guess
    assert gold_answer(None) is None


def test_math_answer_scores():
    responses = [
        r"Halving gives \boxed{\frac{1}{2}}",  # gold 0.5 -> numeric match
        r"\boxed{3} no wait \boxed{4}",  # last boxed 4, gold 3 -> wrong
        "So it's 1,000 in total",  # last number 1,000 vs gold 1000
        "The answer is \u22123.",  # unicode minus
        "$42$",
        "I don't know.",  # no answer -> 0.0, no exception
        "Total: 1e3",
        "The answer is 50%.",  # gold "0.5": a percentage is not a fraction of 1 -> 0.0
        "The answer is 50%.",  # gold "50" -> 1.0
        "The answer is 123456789012345678901234567891",  # off by one -> 0.0
        r"\boxed{\text{(B)}}",
        "anything",
    ]
    answers = ["0.5", "3", "1000", "-3", "42", "7", "1000", "0.5", "50", "123456789012345678901234567890",
               "(b)", None]
    expected = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert math_answer([""] * len(responses), responses, answers) == expected


def test_math_answer_uses_gsm8k_gold_solutions():
    gold = "She has 3 + 4 = 7 apples.\n#### 7"
    assert math_answer(["q", "q"], ["The answer is 7 apples.", "The answer is 4."], [gold, gold]) == [1.0, 0.0]


def test_math_answer_needs_answers():
    with pytest.raises(ValueError, match="needs the gold answers"):
        math_answer(["q"], ["1"])
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        math_answer(["q", "q"], ["1", "2"], ["1"])


def test_math_answer_never_raises_on_odd_text():
    odd = ["\\boxed{", "}}}{{{", "$", "####", "answer:", "\\frac{", "1/0", "\x00\uffff", "e" * 10_000, "9" * 6000,
           "\\text{" * 2000 + "1" + "}" * 2000, "\\boxed{" * 2000]
    # none of them states a 2 (the nested \text one does state its 1)
    assert math_answer(odd, odd, ["2"] * len(odd)) == [0.0] * len(odd)


def test_the_function_reward_passes_each_rows_reference_answer():
    # reward_model: rlhfkit.rewards.rules:math_answer with reward_model_type: function resolves ...
    assert import_callable("rlhfkit.rewards.rules:math_answer") is math_answer
    reward = FunctionReward("rlhfkit.rewards.rules:math_answer")
    assert reward.with_answers
    question = [{"role": "user", "content": "1+1?"}]
    batch = ScoringBatch(prompts=["1+1?"] * 3, responses=["So \\boxed{2}.", "It is 3", "2"], messages=[question] * 3,
                         systems=[None] * 3, sequence_ids=torch.zeros(3, 2, dtype=torch.long),
                         sequence_mask=torch.ones(3, 2, dtype=torch.long), answers=["1 + 1 = 2\n#### 2", "2", None])
    # ... and scores against each row's answer (a row without one scores 0)
    assert reward.score(batch).tolist() == [1.0, 0.0, 0.0]
    two_arguments = FunctionReward("rlhfkit.rewards.rules:exact_match")  # (candidate, answer): no `answers`
    assert not two_arguments.with_answers
