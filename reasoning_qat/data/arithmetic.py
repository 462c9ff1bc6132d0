"""Synthetic step-by-step arithmetic: the demo's reasoning task.

Each problem is "(a+b)*c" with single digits; the response thinks in two verifiable steps and ends
with a boxed answer, in the same chat/thinking format a Qwen3 reasoning model uses. The train/test
split is by problem: every test problem is unseen, but the arithmetic facts it needs appear in
training inside other problems, so a model that reasons step by step generalises to it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ArithProblem:
    a: int
    b: int
    c: int

    @property
    def problem(self) -> str:
        return f"What is ({self.a}+{self.b})*{self.c}?"

    @property
    def answer(self) -> str:
        return str((self.a + self.b) * self.c)

    @property
    def response(self) -> str:
        s = self.a + self.b
        return f"<think>\n{self.a}+{self.b}={s}\n{s}*{self.c}={s * self.c}\n</think>\n\nThe answer is \\boxed{{{self.answer}}}."


def all_problems() -> list[ArithProblem]:
    return [ArithProblem(a, b, c) for a in range(10) for b in range(10) for c in range(1, 10)]


def split_problems(test_fraction: float = 0.2, seed: int = 0) -> tuple[list[ArithProblem], list[ArithProblem]]:
    """Deterministic train/test split by problem (no problem is in both)."""
    problems = all_problems()
    random.Random(seed).shuffle(problems)
    n_test = int(len(problems) * test_fraction)
    return problems[n_test:], problems[:n_test]


def to_records(problems: list[ArithProblem]) -> list[dict]:
    """Rows in the project's reasoning-data schema: prompt, response (with thinking), answer."""
    return [{"prompt": p.problem, "response": p.response, "answer": p.answer} for p in problems]
