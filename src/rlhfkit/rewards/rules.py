"""Verifiable rule-based rewards for answers with one right value (GSM8K, MATH-style problems).

Pure standard library: no torch, no IO. The pieces, from small to large:

* ``normalize_answer(text)``: the canonical string of an answer.
* ``exact_match(candidate, answer)``: equal canonical strings.
* ``parse_number(text)`` / ``numeric_match(candidate, answer, rel_tol, abs_tol)``: equal values.
* ``extract_final_answer(text)``: the final answer a response states.
* ``math_answer(prompts, responses, answers)``: 1.0 per correct response, else 0.0.

Where the gold answer comes from: rlhfkit's function-reward loader (``rewards.function.
FunctionReward``) calls ``fn(prompts, responses)``, and the ``ScoringBatch`` it reads carries
no reference answer: ``data.processing.tokenize_prompts`` drops a row's final assistant
turn (its ``output`` / response column) before the rollout. So ``math_answer`` takes the
gold answers as a third argument, one per response, and the training loop must pass
them: the dropped final assistant reply of each prompt row, repeated for each of that
prompt's G responses. Called with only two arguments it raises a ValueError that says so,
rather than scoring every response 0.

Decisions (each tested):

* Percentages: a trailing ``%`` (or ``\\%``) is dropped, so ``"50%"`` equals ``"50"`` and does
  NOT equal ``"0.5"`` or ``"1/2"``. Gold answers in GSM8K and MATH write percentages as the
  bare number, and reading "50%" as 0.5 as well would accept two different values.
* Integers compare exactly (a 30-digit answer off by one is wrong); other values compare
  with ``|a - b| <= max(rel_tol * max(|a|, |b|), abs_tol)``, in exact rational arithmetic,
  so huge numbers neither overflow nor lose digits. ``"1e3"`` equals ``"1000"``.
* Thousands separators are commas between groups of exactly three digits: ``"1,000"`` is
  1000, while ``"1,00"`` and the pair ``"1, 2"`` are left alone.
* Unicode minus signs (U+2212, en dash, full-width hyphen-minus) read as ``-``.
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction
from typing import Sequence

__all__ = [
    "answers_match",
    "exact_match",
    "extract_final_answer",
    "gold_answer",
    "math_answer",
    "normalize_answer",
    "numeric_match",
    "parse_number",
]

_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2012": "-", "\ufe63": "-", "\uff0d": "-"})
_MAX_EXPONENT = 1000  # larger powers of ten are not parsed (a number with > 1000 digits is not an answer)
_MAX_ROUNDS = 8  # wrappers peeled by normalize_answer, e.g. $\boxed{\text{42}}$.


def _closing_braces(text: str) -> dict[int, int]:
    """``{index of "{": index of its matching "}"}`` for every balanced pair, in one pass."""
    pairs, open_stack = {}, []
    for index, char in enumerate(text):
        if char == "{":
            open_stack.append(index)
        elif char == "}" and open_stack:
            pairs[open_stack.pop()] = index
    return pairs


def _unwrap_commands(text: str, commands: Sequence[str]) -> str:
    """Replace every outermost ``\\cmd{X}`` (nested braces allowed) by ``X``.

    One level per call (no recursion, so deep nesting cannot overflow the stack);
    ``normalize_answer`` calls it once per round.
    """
    pattern = re.compile(r"\\(?:" + "|".join(commands) + r")\s*(?=\{)")
    out, position, closing = [], 0, _closing_braces(text)
    for match in pattern.finditer(text):
        close = closing.get(match.end())
        if match.start() < position or close is None:
            continue  # inside a group already copied, or unbalanced
        out.append(text[position : match.start()])
        out.append(text[match.end() + 1 : close])
        position = close + 1
    out.append(text[position:])
    return "".join(out)


_TEXT_COMMANDS = ("boxed", "fbox", "text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mbox", "operatorname")
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_THOUSANDS = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_ASSIGNMENT = re.compile(r"^[a-zA-Z]\s*=\s*(?=\S)")


def normalize_answer(text: str | None) -> str:
    """Canonical string of an answer, for ``exact_match``.

    Applies, until nothing changes: Unicode NFKC and minus signs to ``-``; strip
    whitespace; remove surrounding math delimiters (``$..$``, ``$$..$$``, ``\\(..\\)``,
    ``\\[..\\]``) and a lone leading ``$`` or ``\\$`` (money); unwrap ``\\boxed{}``,
    ``\\text{}``, ``\\mathrm{}`` and friends (nested braces kept intact); drop ``\\left``,
    ``\\right``, LaTeX spacing (``\\,`` ``\\!`` ``\\;``), degree marks, ``\\dfrac`` /
    ``\\tfrac`` to ``\\frac``, ``\\%`` to ``%``, ``{,}`` to ``,``; drop trailing ``. , ; : ! ?``
    and leading ``:``; drop a leading single-letter assignment (``x = 5`` -> ``5``).
    Then case-fold, collapse whitespace and remove thousands separators (``1,000`` -> ``1000``).

    Args:
        text: an answer string (None reads as "").

    Returns:
        The canonical string ("" for no answer).
    """
    if not text:
        return ""
    s = unicodedata.normalize("NFKC", str(text)).translate(_MINUS_SIGNS)
    for _ in range(_MAX_ROUNDS):
        before = s
        s = s.strip()
        for opening, closing in _DELIMITERS:
            if len(s) >= len(opening) + len(closing) and s.startswith(opening) and s.endswith(closing):
                s = s[len(opening) : len(s) - len(closing)].strip()
                break
        if s.startswith("\\$"):
            s = s[2:]
        elif s.startswith("$") and s.count("$") == 1:
            s = s[1:]
        s = _unwrap_commands(s, _TEXT_COMMANDS)
        s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
        s = re.sub(r"\\[,!;:]|\\ ", "", s)
        s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°", "", s)
        s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
        s = s.replace("\\%", "%").replace("{,}", ",")
        s = s.rstrip(" .,;:!?\n\t").lstrip(" :\n\t")
        s = _ASSIGNMENT.sub("", s)
        if s == before:
            break
    s = " ".join(s.casefold().split())
    return _THOUSANDS.sub(lambda match: match.group(1).replace(",", ""), s)


def exact_match(candidate: str | None, answer: str | None) -> bool:
    """True when both normalise to the same non-empty string (``normalize_answer``).

    ``candidate`` is an answer, not a whole response: run ``extract_final_answer`` first.
    """
    gold = normalize_answer(answer)
    return bool(gold) and normalize_answer(candidate) == gold


_DECIMAL = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_DECIMAL_RE = re.compile(rf"^{_DECIMAL}$")
_SCIENTIFIC_RE = re.compile(rf"^({_DECIMAL})(?:e([-+]?\d+)|(?:\\times|\\cdot|×|\*|x)10\^\{{?([-+]?\d+)\}}?)$")
_FRACTION_RE = re.compile(rf"^({_DECIMAL})/({_DECIMAL})$")
_LATEX_FRACTION_RE = re.compile(r"^([-+]?)\\frac(?:\{([^{}]+)\}\{([^{}]+)\}|(\d)(\d))$")


def _plain_number(s: str) -> Fraction | None:
    """An int / decimal / scientific-notation literal (no spaces) as an exact Fraction."""
    if _DECIMAL_RE.match(s):
        return Fraction(s)
    match = _SCIENTIFIC_RE.match(s)
    if match:
        exponent = int(match.group(2) if match.group(2) is not None else match.group(3))
        if abs(exponent) > _MAX_EXPONENT:
            return None
        return Fraction(match.group(1)) * Fraction(10) ** exponent
    return None


def parse_number(text: str | None) -> Fraction | None:
    """The exact value of a numeric answer, or None when it is not one number.

    Reads (after ``normalize_answer``, spaces removed except between two digits): integers and decimals with an
    optional sign (``-3``, ``+5``, ``.5``, ``5.``), thousands separators (``1,000``),
    scientific notation (``1e3``, ``2.5E-4``, ``1.5\\times10^{3}``), fractions ``a/b`` of
    such numbers, ``\\frac{a}{b}`` / ``\\dfrac`` / ``\\frac12`` with an optional sign, and a
    trailing percent sign, which is dropped (``50%`` is 50; see the module docstring).
    Mixed numbers (``1 1/2``), expressions and division by 0 give None. Never raises.

    Args:
        text: an answer string.

    Returns:
        A ``fractions.Fraction`` or None.
    """
    s = re.sub(r"(?<!\d) | (?!\d)", "", normalize_answer(text))  # keep only digit-space-digit ("1 1/2")
    if s.endswith("%"):
        s = s[:-1]
    if not s or len(s) > 10_000:
        return None
    try:
        value = _plain_number(s)
        if value is not None:
            return value
        match = _FRACTION_RE.match(s) or _LATEX_FRACTION_RE.match(s)
        if match is None:
            return None
        if match.re is _FRACTION_RE:
            sign, numerator, denominator = "", _plain_number(match.group(1)), _plain_number(match.group(2))
        else:
            top, bottom = (match.group(2), match.group(3)) if match.group(2) is not None else match.group(4, 5)
            sign, numerator, denominator = match.group(1), parse_number(top), parse_number(bottom)
        if numerator is None or denominator is None or denominator == 0:
            return None
        value = numerator / denominator
        return -value if sign == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):  # e.g. Python's limit on int digits
        return None


def numeric_match(
    candidate: str | None, answer: str | None, rel_tol: float = 1e-6, abs_tol: float = 1e-9
) -> bool:
    """True when both parse as numbers (``parse_number``) with the same value.

    Two integers must be equal; otherwise, in exact rational arithmetic::

        |a - b| <= max(rel_tol * max(|a|, |b|), abs_tol)

    Args:
        candidate: the extracted answer of a response.
        answer: the gold answer.
        rel_tol: relative tolerance (0.5 vs 1/2 is exact; 0.333 vs 1/3 is off by 1e-3).
        abs_tol: absolute tolerance, for values near 0.
    """
    a, b = parse_number(candidate), parse_number(answer)
    if a is None or b is None:
        return False
    if a.denominator == 1 and b.denominator == 1:
        return a == b
    tolerance = max(Fraction(rel_tol) * max(abs(a), abs(b)), Fraction(abs_tol))
    return abs(a - b) <= tolerance


def answers_match(candidate: str | None, answer: str | None, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """``exact_match(candidate, answer) or numeric_match(candidate, answer, rel_tol, abs_tol)``."""
    return exact_match(candidate, answer) or numeric_match(candidate, answer, rel_tol, abs_tol)


_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_MARKER_RE = re.compile(r"answer\s*(?:is\s*:?|:)|####", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|\n")
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)])-)?\\[dt]?frac\{[^{}]*\}\{[^{}]*\}"
    r"|(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?%?"
    r"|(?:(?<![\w)])-)?\.\d+"
)
# "18 dollars", "$18 per week": a number followed only by words (units), no "or"/"and" hedge.
_NUMBER_WITH_UNITS_RE = re.compile(r"^\$?(" + _NUMBER_RE.pattern + r")\$?\s+[a-zA-Z][a-zA-Z ]*$")
_HEDGE_RE = re.compile(r"\b(?:or|and)\b", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    """Content of the last non-empty ``\\boxed{...}`` (or ``\\fbox``), nested braces kept."""
    closing = _closing_braces(text)
    for match in reversed(list(_BOX_RE.finditer(text))):  # from the end: the last box wins
        close = closing.get(match.end())
        if close is not None:
            content = text[match.end() + 1 : close].strip()
        elif match.group(0)[-1:].isspace():  # "\boxed 5": the next token
            token = re.match(r"[^\s${}]+", text[match.end() :])
            content = token.group(0) if token else ""
        else:  # "\boxedx", or an unbalanced "\boxed{"
            content = ""
        if content:
            return content
    return None


def extract_final_answer(text: str | None, fallback_to_last_number: bool = True) -> str | None:
    """The final answer a response states, as raw text (not normalised).

    In order of preference:

    1. the content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept:
       ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``);
    2. after the LAST "answer is" / "answer:" marker ("The answer is X", "Final Answer: X",
       case-insensitive) or GSM8K's "#### X": the rest of that line up to the end of the
       sentence (a period followed by a space or the end); when that is a number followed
       only by words ("18 dollars"), just the number, unless the words hedge ("or", "and");
    3. with ``fallback_to_last_number``, the last number in the text (an integer, decimal,
       fraction, percentage, scientific literal or ``\\frac{a}{b}``).

    Args:
        text: a model response (or a gold solution).
        fallback_to_last_number: use step 3.

    Returns:
        The answer text, or None when there is none.
    """
    if not text:
        return None
    text = unicodedata.normalize("NFKC", str(text)).translate(_MINUS_SIGNS)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    markers = list(_MARKER_RE.finditer(text))
    if markers:
        rest = text[markers[-1].end() :].lstrip(" \t:")
        end = _SENTENCE_END_RE.search(rest)
        stated = (rest[: end.start()] if end else rest).strip()
        with_units = _NUMBER_WITH_UNITS_RE.match(stated)
        if with_units and not _HEDGE_RE.search(stated):
            return with_units.group(1)
        if stated:
            return stated
    if fallback_to_last_number:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1]
    return None


def gold_answer(answer: str | None) -> str | None:
    """The value to compare against: the final answer of a worked solution (``\\boxed``,
    "#### X", "The answer is X"), else the whole string. Never the last-number guess, so a
    gold expression such as ``x + 1`` stays whole."""
    if answer is None:
        return None
    return extract_final_answer(answer, fallback_to_last_number=False) or str(answer)


def math_answer(
    prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None] | None = None
) -> list[float]:
    """1.0 for each response whose final answer equals its gold answer, else 0.0.

    ``candidate = extract_final_answer(response)`` and ``gold = gold_answer(answer)`` match
    when ``answers_match(candidate, gold)`` (exact after normalisation, or numerically
    equal). A response with no answer, or a None gold answer, scores 0.0. Never raises on
    odd text.

    Args:
        prompts: the prompts (unused; kept for the ``fn(prompts, responses)`` interface).
        responses: decoded responses, one per sample.
        answers: gold answers, one per response (each prompt's reference repeated for its G
            responses). The function reward passes each prompt row's final assistant reply in
            the data (`ScoringBatch.answers`); called directly, pass them yourself.

    Returns:
        ``list[float]`` of 0.0 / 1.0, one per response.
    """
    if answers is None:
        raise ValueError(
            "math_answer needs the gold answers: call math_answer(prompts, responses, answers) with one "
            "reference answer per response"
        )
    if len(answers) != len(responses):
        raise ValueError(f"math_answer got {len(responses)} responses but {len(answers)} answers; "
                         "pass one gold answer per response (repeat a prompt's answer for each of its responses)")
    scores = []
    for response, answer in zip(responses, answers):
        gold, candidate = gold_answer(answer), extract_final_answer(response)
        correct = gold is not None and candidate is not None and answers_match(candidate, gold)
        scores.append(1.0 if correct else 0.0)
    return scores
