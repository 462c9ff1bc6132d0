"""Math-aware answer checking through math-verify.

The final answer is read from the text after `</think>` when the model closed its thinking (so a
`\\boxed{}` tried out inside the thinking does not count), else from the whole response.
"""

from __future__ import annotations

from dataclasses import dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None


def final_segment(response: str) -> str:
    return response.rsplit("</think>", 1)[1] if "</think>" in response else response


def parse_gold(answer: str):
    answer = answer.strip()
    if "\\boxed" not in answer:
        answer = f"\\boxed{{{answer}}}"
    gold = parse(answer, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    if not gold:
        gold = parse(f"${answer}$")
    return gold


def grade(response: str, gold_answer: str) -> Grade:
    pred = parse(final_segment(response), extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    if not pred:
        return Grade(False, None)
    gold = parse_gold(gold_answer)
    extracted = str(pred[1]) if len(pred) > 1 else str(pred[0])
    try:
        ok = bool(gold) and bool(verify(gold, pred))
    except Exception:  # math-verify can raise on exotic expressions; an unverifiable answer is wrong
        ok = False
    return Grade(ok, extracted)
