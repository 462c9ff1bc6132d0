"""Math-aware answer checking through math-verify.

The final answer is read from the text after the last `</think>` (so a `\\boxed{}` tried out inside
the thinking does not count). A response whose thinking was opened and never closed (cut off by the
token budget) has no final answer and is wrong, whatever number its thinking reached. A response
with no thinking at all is graded on its whole text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None


def final_segment(response: str, thinking_open: bool = False) -> str | None:
    """The answer part of a response, or None when its thinking never closed. `thinking_open`: the
    prompt itself opened the thinking (templates that end the generation prompt with `<think>`)."""
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if thinking_open or "<think>" in response:
        return None
    return response


def parse_gold(answer: str):
    answer = answer.strip()
    if "\\boxed" not in answer:
        answer = f"\\boxed{{{answer}}}"
    gold = parse(answer, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    if not gold:
        gold = parse(f"${answer}$")
    return gold


def grade(response: str, gold_answer: str, thinking_open: bool = False) -> Grade:
    answer = final_segment(response, thinking_open)
    if answer is None:
        return Grade(False, None)
    pred = parse(answer, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    if not pred:
        return Grade(False, None)
    gold = parse_gold(gold_answer)
    extracted = str(pred[1]) if len(pred) > 1 else str(pred[0])
    try:
        ok = bool(gold) and bool(verify(gold, pred))
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
    boxed = re.findall(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}", answer)
    if boxed:
        return {c for b in boxed for c in _letters(r"(?<![A-Za-z])([A-Ja-j])(?![A-Za-z])", re.sub(r"\\text\w*", "", b), valid)}
    stated = _letters(r"(?i:answer)\s*(?:is|:)?\s*[:\-]?\s*\**\(?([A-J])\)?(?![A-Za-z])", answer, valid)
    if stated:
        return stated
    return _letters(r"\(([A-J])\)", answer, valid)


def grade_choice(response: str, gold_letter: str, n_choices: int, thinking_open: bool = False) -> Grade:
    """Right only when the final answer names exactly one letter and it is the gold one; several
    letters, or none, is wrong."""
    answer = final_segment(response, thinking_open)
    if answer is None:
        return Grade(False, None)
    found = extract_choice(answer, n_choices)
    if len(found) != 1:
        return Grade(False, ",".join(sorted(found)) or None)
    (letter,) = found
    return Grade(letter == gold_letter, letter)
