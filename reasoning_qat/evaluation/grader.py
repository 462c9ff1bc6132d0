"""Math-aware answer checking through math-verify.

The final answer is what data/thinking.py calls the answer: the text after the last `</think>` (so
a `\\boxed{}` tried out inside the thinking does not count). A response whose thinking was opened,
by the response or by the prompt (`thinking_open`: templates whose generation prompt ends in
`<think>`), and never closed (cut off by the token budget) has no final answer and is wrong, whatever
number its thinking reached. A response with no thinking at all is graded on its whole text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from ..data.thinking import answer_text


@dataclass(frozen=True)
class Grade:
    """The grade of one completion: correct, the answer extracted, and whether the thinking was closed."""
    correct: bool
    extracted: str | None


# Normalisation before math-verify, for forms a careful human grader of MATH-500 / AIME accepts:
_UNICODE = {"°": "^\\circ", "π": "\\pi", "−": "-", "×": "\\times", "·": "\\cdot", "∞": "\\infty", "√": "\\sqrt"}
# thin spaces and friends between digit groups: 1\,000, 1\ 000, 1~000, 10{,}000
_DIGIT_SEPARATOR = re.compile(r"(?<=\d)(?:\\[,!;: ]|~|\{,\})(?=\d{3}(?!\d))")
# ordinal superscripts: 12^{\text{th}}, 21^\text{st}, 3^{rd}
_SUFFIX = r"\s*(?:st|nd|rd|th)\s*"
_TEXT = r"\\(?:text|textrm|mathrm)\s*\{" + _SUFFIX + r"\}"
_ORDINAL = re.compile(r"(\d)\s*\^\s*(?:\{\s*" + _TEXT + r"\s*\}|\{" + _SUFFIX + r"\}|" + _TEXT + r"|(?:st|nd|rd|th)\b)")
# a percent sign: 5.4\% and 5.4 are the same answer to "what percent ..." (math-verify already says so for integers)
_PERCENT = re.compile(r"\\?%")


def normalize_answer(text: str) -> str:
    """The answer text with Unicode math symbols as LaTeX, digit-group separators dropped, ordinal
    superscripts dropped and percent signs dropped: forms a human grader reads as the same number."""
    for u, latex in _UNICODE.items():
        text = text.replace(u, latex)
    text = _DIGIT_SEPARATOR.sub("", text)
    text = _ORDINAL.sub(r"\1", text)
    return _PERCENT.sub("", text)


def parse_gold(answer: str):
    """A gold answer parsed by math-verify (LaTeX and plain expressions), for comparison with extracted
    answers."""
    answer = normalize_answer(answer.strip())
    if "\\boxed" not in answer:
        answer = f"\\boxed{{{answer}}}"
    gold = parse(answer, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    if not gold:
        gold = parse(f"${answer}$")
    return gold


def _decimals(expr) -> int | None:
    """How many decimals a number written as a decimal carries (None: not a lone decimal)."""
    import sympy

    if isinstance(expr, sympy.Float):
        text = sympy.sstr(expr, full_prec=False)
        return len(text.split(".")[1].rstrip("0")) if "." in text and "e" not in text else 0
    return None


def _exactly_equal(gold, pred) -> bool:
    """math-verify compares exact expressions numerically with tiny values chopped (1/2^98 equals
    1/2^99) and decimals rounded to 6 places (0.1234567 equals 0.1234568). Exact numbers are compared
    exactly here (relative difference below 1e-40 at 60 digits), and a decimal the model wrote against
    a decimal gold to the gold's own number of decimals. Anything else (symbols, sets, intervals,
    equations, decimals against exact golds: 0.333333 for 1/3) keeps math-verify's verdict."""
    import sympy

    def number(x):
        return isinstance(x, sympy.Expr) and not x.free_symbols and x.is_number

    g, p = gold[0], pred[0]
    if not (number(g) and number(p)):
        return True
    if not (g.is_finite and p.is_finite):  # oo, -oo, zoo: equal or not, no relative difference (oo - oo is nan)
        return bool(g == p)
    gd, pd = _decimals(g), _decimals(p)
    if pd is not None and gd is not None:
        return round(float(p), gd) == round(float(g), gd)
    if g.has(sympy.Float) or p.has(sympy.Float):
        return True
    a, b = sympy.N(g, 60), sympy.N(p, 60)
    scale = max(abs(a), abs(b))
    return bool(scale == 0 or abs(a - b) <= scale * sympy.Float("1e-40", 60))


def grade(response: str, gold_answer: str, thinking_open: bool = False) -> Grade:
    """Whether the final answer of `response` (see data/thinking.py) equals `gold_answer`: math-verify
    (Hugging Face's math-verify: LaTeX and plain-expression extraction, symbolic equivalence) after
    `normalize_answer`, with exact numbers compared exactly (`_exactly_equal`)."""
    answer = answer_text(response, thinking_open)
    if answer is None:
        return Grade(False, None)
    pred = parse(normalize_answer(answer), extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    if not pred:
        return Grade(False, None)
    gold = parse_gold(gold_answer)
    extracted = str(pred[1]) if len(pred) > 1 else str(pred[0])
    try:
        ok = bool(gold) and bool(verify(gold, pred)) and _exactly_equal(gold, pred)
    except Exception:  # math-verify can raise on exotic expressions; an unverifiable answer is wrong
        ok = False
    return Grade(ok, extracted)


# ---- multiple choice (GPQA) -------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"


def _letters(pattern: str, text: str, valid: str) -> set[str]:
    return {m.upper() for m in re.findall(pattern, text) if m.upper() in valid}


def extract_choice(answer: str, n_choices: int) -> set[str]:
    """The letters a final answer commits to, in order of explicitness: `\\boxed{C}` (also
    `\\boxed{\\text{C}}`, `\\boxed{(C)}`), then `Answer: C` / `answer is C` / `final answer: (C)`, then a
    lone `(C)`. The first form present decides; several distinct letters in it mean no single choice."""
    valid = LETTERS[:n_choices]
    boxed = [re.sub(r"\\text\w*", "", b) for b in re.findall(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}", answer)]
    if boxed:
        # `(B) 2.5 A`: the parenthesised letter is the choice; a unit letter after it (A for amperes,
        # V, C) is not a second one
        chosen = {c for b in boxed for c in _letters(r"\(\s*([A-Ja-j])\s*\)", b, valid)}
        return chosen or {c for b in boxed for c in _letters(r"(?<![A-Za-z])([A-Ja-j])(?![A-Za-z])", b, valid)}
    stated = _letters(r"(?i:answer)\s*(?:is|:)?\s*[:\-]?\s*\**\(?([A-J])\)?(?![A-Za-z])", answer, valid)
    if stated:
        return stated
    return _letters(r"\(([A-J])\)", answer, valid)


def grade_choice(response: str, gold_letter: str, n_choices: int, thinking_open: bool = False) -> Grade:
    """Right only when the final answer names exactly one letter and it is the gold one; several
    letters, or none, is wrong."""
    answer = answer_text(response, thinking_open)
    if answer is None:
        return Grade(False, None)
    found = extract_choice(answer, n_choices)
    if len(found) != 1:
        return Grade(False, ",".join(sorted(found)) or None)
    (letter,) = found
    return Grade(letter == gold_letter, letter)
