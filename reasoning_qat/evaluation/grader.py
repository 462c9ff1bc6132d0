"""Math-aware answer checking through math-verify.

The final answer is read from the text after the last `</think>` (so a `\\boxed{}` tried out inside
the thinking does not count). A response whose thinking was opened and never closed (cut off by the
token budget) has no final answer and is wrong, whatever number its thinking reached. A response
with no thinking at all is graded on its whole text.
"""

from __future__ import annotations

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
