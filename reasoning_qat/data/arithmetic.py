"""Synthetic step-by-step arithmetic: the demo's reasoning task.

Each problem is "(a+b)*c" with single digits; the response thinks in two verifiable steps and ends
with a boxed answer, in the same chat/thinking format a Qwen3 reasoning model uses. The train/test
split is by problem: every test problem is unseen, but the arithmetic facts it needs appear in
training inside other problems, so a model that reasons step by step generalises to it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ArithProblem:
    """One demo problem (a+b)*c, worked in two steps."""
    a: int
    b: int
    c: int

    @property
    def problem(self) -> str:
        """The question as the prompt states it."""
        return f"What is ({self.a}+{self.b})*{self.c}?"

    @property
    def answer(self) -> str:
        """The gold answer as a string."""
        return str((self.a + self.b) * self.c)

    @property
    def response(self) -> str:
        """The reference reasoning trace: <think> with the steps, then the boxed answer."""
        s = self.a + self.b
        return f"<think>\n{self.a}+{self.b}={s}\n{s}*{self.c}={s * self.c}\n</think>\n\nThe answer is \\boxed{{{self.answer}}}."


def all_problems() -> list[ArithProblem]:
    """Every (a+b)*c of the arith task (810 problems), in a fixed order."""
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


# ---- the harder task of the GPU model organism: dependent multi-digit steps with carries ----------------

@dataclass(frozen=True)
class ChainProblem:
    """start, then 4-6 (or min_steps..max_steps) dependent steps of +/- a 2-3 digit number: "Start at 482. Add 359, subtract
    127, ...". The thinking works every step column by column, least significant digit first, with
    its carries or borrows (e.g. `482+359: 2+9=11 c1, 8+5+1=14 c1, 4+3+1=8 -> 841`), ~130-330
    characters (tokens of the character tokenizer) in all: an error in any column propagates to the answer."""

    start: int
    steps: tuple[tuple[str, int], ...]
    # columns: every column written out; compact: only each step's result ("482+359=841"), so the
    # carries are computed inside the network, not on the page (a harder, more precision-hungry task)
    trace: str = "columns"

    @property
    def problem(self) -> str:
        """The question as the prompt states it."""
        words = ", ".join(f"{'add' if op == '+' else 'subtract'} {n}" for op, n in self.steps)
        return f"Start at {self.start}, then {words}. What is the result?"

    def values(self) -> list[int]:
        """The running value after each step."""
        out, v = [], self.start
        for op, n in self.steps:
            v = v + n if op == "+" else v - n
            out.append(v)
        return out

    @property
    def answer(self) -> str:
        """The gold answer as a string."""
        return str(self.values()[-1])

    @property
    def response(self) -> str:
        """The reference reasoning trace: <think> with the steps, then the boxed answer."""
        lines, v = [], self.start
        for (op, n), nxt in zip(self.steps, self.values()):
            lines.append(f"{v}{op}{n}={nxt}" if self.trace == "compact" else f"{v}{op}{n}: {_columns(v, n, op)} -> {nxt}")
            v = nxt
        return "<think>\n" + "\n".join(lines) + "\n</think>\n\nThe answer is \\boxed{" + self.answer + "}."


_COLUMNS_STEP = re.compile(r"^\d+[+-]\d+: .*-> -?\d+$")
_COMPACT_STEP = re.compile(r"^\d+[+-]\d+=-?\d+$")


def trace_style(text: str) -> str:
    """Which chain-task trace style a response's thinking is written in: "columns" (every step worked
    column by column, `482+359: 2+9=11 c1, ... -> 841`), "compact" (`482+359=841`), "mixed" (steps of
    both) or "other" (no step line of either: no thinking, or something else). Reads the lines between
    `<think>` and `</think>` (to the end when the thinking is not closed); how the eval tells which
    generator's style a student writes after QAT on another style's traces."""
    think = text.split("<think>", 1)[-1].split("</think>", 1)[0]
    lines = [ln.strip() for ln in think.splitlines() if ln.strip()]
    columns = sum(bool(_COLUMNS_STEP.match(ln)) for ln in lines)
    compact = sum(bool(_COMPACT_STEP.match(ln)) for ln in lines)
    if columns and compact:
        return "mixed"
    return "columns" if columns else "compact" if compact else "other"


def _columns(a: int, b: int, op: str) -> str:
    """Column work for a+b or a-b (a >= b >= 0 for subtraction), carries/borrows shown as c1/b1."""
    da, db = str(a)[::-1], str(b)[::-1]
    parts, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        if op == "+":
            s = x + y + carry
            parts.append(f"{x}+{y}{'+1' if carry else ''}={s}{' c1' if s >= 10 else ''}")
            carry = int(s >= 10)
        else:
            s = x - y - carry
            parts.append(f"{x}-{y}{'-1' if carry else ''}={s + 10 if s < 0 else s}{' b1' if s < 0 else ''}")
            carry = int(s < 0)
    return ", ".join(parts)


def chain_problems(n: int, seed: int, min_steps: int = 4, max_steps: int = 6, trace: str = "columns") -> list[ChainProblem]:
    """n distinct problems; subtraction only where the running value stays >= the subtrahend, so
    every intermediate value is non-negative and the column method applies."""
    rnd, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        v = rnd.randint(100, 999)
        start, steps = v, []
        for _ in range(rnd.randint(min_steps, max_steps)):
            k = rnd.randint(10, 999)
            op = "-" if rnd.random() < 0.5 and v >= k else "+"
            v = v + k if op == "+" else v - k
            steps.append((op, k))
        p = ChainProblem(start, tuple(steps), trace)
        if p.problem not in seen:
            seen.add(p.problem)
            out.append(p)
    return out


def split_chain_problems(n: int, test_fraction: float, seed: int, min_steps: int = 4, max_steps: int = 6,
                         trace: str = "columns") -> tuple[list[ChainProblem], list[ChainProblem]]:
    """Train/test split by problem (the generator draws distinct problems)."""
    problems = chain_problems(n, seed, min_steps, max_steps, trace)
    n_test = int(n * test_fraction)
    return problems[n_test:], problems[:n_test]
