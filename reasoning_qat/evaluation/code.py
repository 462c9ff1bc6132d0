"""Code-generation grading (LiveCodeBench): read the tests of a problem, take the program out of a
response, run it against every test in the sandbox (sandbox.py).

Test cases follow LiveCodeBench's format: `{"input", "output", "testtype"}` where `stdin` tests
feed the input to the program and compare its printed output, and `functional` tests (LeetCode
style, a `class Solution` method named by the row's metadata `func_name`) take one JSON value per
input line as the arguments and compare the JSON return value.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..data.thinking import answer_text
from .sandbox import Limits, run_program


class _StringsOnly(pickle.Unpickler):
    """LiveCodeBench ships its hidden tests as base64(zlib(pickle(json text))): unpickle plain
    strings and containers only; any class or callable in the stream is refused."""

    def find_class(self, module, name):
        """Refuse every global a pickle names (test data holds only strings, lists and dicts)."""
        raise pickle.UnpicklingError(f"refused: the test data names {module}.{name}")


def decode_tests(value) -> list[dict]:
    """Test cases from a JSON string, a list, or LiveCodeBench's compressed pickle of a JSON string."""
    if isinstance(value, list):
        return value
    if not value:
        return []
    text = value
    if not value.lstrip().startswith("["):
        raw = zlib.decompress(base64.b64decode(value))
        text = _StringsOnly(io.BytesIO(raw)).load()
        if isinstance(text, bytes):
            text = text.decode()
        if not isinstance(text, str):
            raise ValueError("hidden tests did not decode to JSON text")
    return json.loads(text)


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(response: str, thinking_open: bool = False) -> str | None:
    """The last fenced code block of the final answer (after the thinking); None without one."""
    answer = answer_text(response, thinking_open)
    if answer is None:
        return None
    blocks = _FENCE.findall(answer)
    return blocks[-1] if blocks else None


# Around a functional (LeetCode-style) solution: the imports LeetCode's judge provides (solutions use
# `List` or `deque` without importing them), and a call of the method on the JSON arguments.
_FUNCTIONAL_IMPORTS = ("from typing import *\nfrom collections import *\nfrom functools import *\n"
                       "from itertools import *\nfrom heapq import *\nfrom bisect import *\nimport math, string, re\n")
_FUNCTIONAL_DRIVER = """

import json as _json, sys as _sys
_args = [_json.loads(_line) for _line in _sys.stdin.read().splitlines() if _line.strip()]
_obj = Solution() if "Solution" in globals() else None
_fn = getattr(_obj, {name!r}) if _obj is not None else globals()[{name!r}]
print(_json.dumps(_fn(*_args)))
"""


def _same_output(got: str, expected: str) -> bool:
    """Whitespace-insensitive token comparison; numbers equal within 1e-6 (LiveCodeBench's checker
    also accepts float noise)."""
    a, b = got.strip().split(), expected.strip().split()
    if a == b:
        return True
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        try:
            if abs(float(x) - float(y)) > 1e-6:
                return False
        except ValueError:
            return False
    return True


@dataclass(frozen=True)
class CodeGrade:
    """The grade of one code answer: passed, the tests run and passed, and why it failed."""
    correct: bool
    extracted: str | None  # the program (first 2000 characters), or None
    passed: int  # tests passed before the first failure
    total: int
    failure: str | None  # why it failed: no program, wrong answer on test i, timeout, error


def run_tests(program: str, tests: list[dict], func_name: str | None, limits: Limits) -> tuple[int, str | None]:
    """(tests passed, failure) running in order and stopping at the first failure."""
    for i, t in enumerate(tests):
        functional = t.get("testtype") == "functional"
        code = _FUNCTIONAL_IMPORTS + program + _FUNCTIONAL_DRIVER.format(name=func_name) if functional else program
        r = run_program(code, t["input"], limits)
        if r.timed_out:
            return i, f"test {i}: timed out after {limits.timeout_s:g} s"
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            return i, f"test {i}: {last[:200]}"
        if functional:
            try:
                ok = json.loads(r.stdout.strip().splitlines()[-1]) == json.loads(t["output"])
            except (ValueError, IndexError):
                ok = False
        else:
            ok = _same_output(r.stdout, t["output"])
        if not ok:
            return i, f"test {i}: wrong answer"
    return len(tests), None


def grade_code(response: str, tests: list[dict], func_name: str | None, limits: Limits,
               thinking_open: bool = False) -> CodeGrade:
    """Run the program in a completion against a problem's tests in the sandbox (LiveCodeBench's stdin/stdout
    and functional tests); returns CodeGrade."""
    program = extract_program(response, thinking_open)
    if program is None:
        return CodeGrade(False, None, 0, len(tests), "no ```python block after the thinking")
    if not tests:
        return CodeGrade(False, program[:2000], 0, 0, "the problem has no tests")
    passed, failure = run_tests(program, tests, func_name, limits)
    return CodeGrade(failure is None, program[:2000], passed, len(tests), failure)


def grade_many(jobs: list[tuple[str, list[dict], str | None, bool]], limits: Limits, workers: int) -> list[CodeGrade]:
    """Grade (response, tests, func_name, thinking_open) jobs, `workers` sandboxes at a time."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda j: grade_code(j[0], j[1], j[2], limits, j[3]), jobs))
