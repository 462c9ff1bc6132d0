"""The benchmark suite: AIME (years combined), GPQA-Diamond (shuffled multiple choice), LiveCodeBench
(programs run in the sandbox), the `reasoning` suite and the per-task compare table. Every task
reads small fixture files written here (no hub)."""

import base64
import json
import pickle
import re
import zlib

import pytest

from reasoning_qat.evaluation.backends import Completion
from reasoning_qat.evaluation.grader import grade, grade_choice
from reasoning_qat.evaluation.runner import evaluate
from reasoning_qat.evaluation.sandbox import Limits, network_isolation, run_program
from reasoning_qat.evaluation.tasks import expand_tasks, load_task


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


class Scripted:
    """A stand-in for the model (the engines are tested elsewhere): answers each prompt with
    `answer(prompt, sample)`; records what it was asked."""

    def __init__(self, answer):
        from reasoning_qat.data.tokenizer import build_char_tokenizer

        self.tokenizer, self.answer, self.prompts = build_char_tokenizer(), answer, []

    def generate(self, prompts, k, temperature, top_p, top_k, max_new_tokens, seed=0, keys=None):
        self.prompts += prompts
        return [[Completion(self.answer(p, j), 10, False) for j in range(k)] for p in prompts]

    def close(self):
        pass


# ---- AIME ---------------------------------------------------------------------------------------------

def test_aime_combines_the_years_listed_and_grades_integers(tmp_path):
    aimo = [{"id": i, "problem": f"P{i}", "answer": str(100 + i), "url": f"https://x/{y}_AIME_I_Problems/Problem_{i}"}
            for i, y in enumerate([2022, 2022, 2023, 2024])]
    data = {"aime22": write_jsonl(tmp_path / "aimo.jsonl", aimo), "aime23": str(tmp_path / "aimo.jsonl"),
            "aime25": write_jsonl(tmp_path / "a25.jsonl", [{"problem": "Q", "answer": "204"}])}
    aime = load_task("aime", {"combine": ["aime22", "aime23", "aime25"]})
    rows = aime.load(data=data)
    # each year keeps its own rows (the 2022 task filters the AoPS url), ids name the year
    assert [r["id"] for r in rows] == ["aime22/0", "aime22/1", "aime23/2", "aime25/0"]
    assert [r["answer"] for r in rows] == ["100", "101", "102", "204"]
    assert load_task("aime").combine == ["aime22", "aime23", "aime24", "aime25"]
    assert load_task("aime").samples == 8 and load_task("aime").sampling.max_new_tokens == 38912
    assert grade("<think>so 204</think>\nThe answer is \\boxed{204}.", "204").correct
    assert grade("<think>x</think>\n\\boxed{0204}", "204").correct
    assert not grade("<think>x</think>\n\\boxed{205}", "204").correct
    # one local file holding every year replaces the combination
    whole = aime.load(data={"aime": str(tmp_path / "a25.jsonl")})
    assert [r["answer"] for r in whole] == ["204"]


# ---- GPQA-Diamond ------------------------------------------------------------------------------------

GPQA_ROWS = [{"Record ID": f"r{i}", "Question": f"Which is right in case {i}?", "Correct Answer": f"right {i}",
              "Incorrect Answer 1": f"wrong a{i}", "Incorrect Answer 2": f"wrong b{i}", "Incorrect Answer 3": f"wrong c{i}"}
             for i in range(40)]


def _letter_of(prompt, text):
    return re.search(r"([A-D])\) " + re.escape(text) + r"\n", prompt).group(1)


def _case(prompt):
    return int(re.search(r"case (\d+)", prompt).group(1))


@pytest.mark.parametrize("form", ["\\boxed{%s}", "Answer: %s", "the answer is (%s)", "\\boxed{\\text{%s}}"])
def test_gpqa_shuffles_per_sample_and_reads_the_letter(tmp_path, form):
    data = write_jsonl(tmp_path / "gpqa.jsonl", GPQA_ROWS)
    task = load_task("gpqa_diamond")

    def knows(prompt, j):  # a model that always picks the right option, wherever the shuffle put it
        i = _case(prompt)
        return "<think>hmm</think>\n" + form % _letter_of(prompt, f"right {i}")

    engine = Scripted(knows)
    m = evaluate("model", task, tmp_path / "out", engine=engine, data=data, samples=4)
    assert m["pass@1"] == 1.0 and m["problems"] == 40 and m["samples_per_problem"] == 4
    # the right option sat under every letter, and the 4 samples of one question saw different orders
    letters = [_letter_of(p, f"right {_case(p)}") for p in engine.prompts]
    assert set(letters) == set("ABCD")
    assert len({letters[j] for j in range(4)} | {letters[4 + j] for j in range(4)}) > 1
    again = Scripted(knows)
    evaluate("model", task, tmp_path / "out2", engine=again, data=data, samples=4)
    assert again.prompts == engine.prompts  # seeded: the same shuffles on a re-run


def test_gpqa_letter_carries_no_prior(tmp_path):
    data = write_jsonl(tmp_path / "gpqa.jsonl", GPQA_ROWS)
    m = evaluate("model", load_task("gpqa_diamond"), tmp_path / "out", engine=Scripted(lambda p, j: "</think>\\boxed{A}"),
                 data=data, samples=4)
    assert 0.1 < m["pass@1"] < 0.45  # always "A": right about a quarter of the time, not always or never


@pytest.mark.parametrize("response, ok", [
    ("<think>A?</think>\nAnswer: C", True),
    ("<think>x</think>\n\\boxed{A} or maybe \\boxed{C}", False),  # several letters
    ("<think>x</think>\nI cannot decide.", False),  # none
    ("<think>thinking about \\boxed{C} but never finishing", False),  # thinking not closed
    ("<think>x</think>\n(A) is tempting but (C) is correct", False),  # two letters in the weakest form
    ("<think>x</think>\nFinal answer: **C**", True),
])
def test_gpqa_grader_forms(response, ok):
    assert grade_choice(response, "C", 4).correct is ok


# ---- LiveCodeBench and the sandbox -----------------------------------------------------------------

def _compressed(tests):
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


LCB_ROWS = [
    {"question_id": "add", "question_content": "Read two integers and print their sum.", "contest_date": "2024-09-01T00:00:00",
     "starter_code": "", "metadata": "{}",
     "public_test_cases": json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]),
     "private_test_cases": _compressed([{"input": "10 -4\n", "output": "6\n", "testtype": "stdin"},
                                        {"input": "100 200\n", "output": "300\n", "testtype": "stdin"}])},
    {"question_id": "twice", "question_content": "Return twice the sum of nums.", "contest_date": "2024-10-05T00:00:00",
     "starter_code": "class Solution:\n    def twice(self, nums: List[int]) -> int:\n        ",
     "metadata": json.dumps({"func_name": "twice"}),
     "public_test_cases": json.dumps([{"input": "[1, 2]", "output": "6", "testtype": "functional"}]),
     "private_test_cases": json.dumps([{"input": "[5]", "output": "10", "testtype": "functional"}])},
    {"question_id": "old", "question_content": "An old problem.", "contest_date": "2023-01-01T00:00:00",
     "starter_code": "", "metadata": "{}", "public_test_cases": "[]", "private_test_cases": "[]"},
]

GOOD = {"add": "a, b = map(int, input().split())\nprint(a + b)",
        "twice": "class Solution:\n    def twice(self, nums: List[int]) -> int:\n        return 2 * sum(nums)"}
WRONG = {"add": "a, b = map(int, input().split())\nprint(a - b)", "twice": "class Solution:\n    def twice(self, nums):\n        return 0"}
HOSTILE = {
    "read outside": "print(open('/etc/passwd').read())",
    "list outside": "import os\nprint(os.listdir('/'))",
    "socket": "import socket\nsocket.create_connection(('10.255.255.1', 80), timeout=1)",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "memory": "x = []\nwhile True:\n    x.append(bytearray(10**8))",
    "busy loop": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(60)",
    "flood": "while True:\n    print('x' * 10**6)",
    "ctypes": "import ctypes\nctypes.CDLL(None).fork()",
    "write outside": "open('/tmp/rqat_escaped', 'w').write('x')",
}


def _lcb(tmp_path):
    return write_jsonl(tmp_path / "lcb.jsonl", LCB_ROWS)


def _program_answer(programs):
    def answer(prompt, j):
        qid = "twice" if "twice the sum" in prompt else "add"
        return f"<think>plan</think>\nHere it is:\n```python\n{programs[qid]}\n```"
    return answer


def test_livecodebench_runs_public_and_hidden_tests(tmp_path):
    task = load_task("livecodebench", {"release_start": "2024-08-01", "release_end": "2025-01-01"})
    problems = task.load(data=_lcb(tmp_path))
    assert [p["id"] for p in problems] == ["add", "twice"]  # the 2023 problem is outside the window
    assert len(problems[0]["tests"]) == 3 and problems[1]["func_name"] == "twice"  # public + decoded hidden tests
    good = evaluate("model", task, tmp_path / "good", engine=Scripted(_program_answer(GOOD)), data=_lcb(tmp_path), samples=2)
    assert good["pass@1"] == 1.0
    assert good["sandbox"]["network_isolation"] in ("netns", "userns+netns", "none")
    wrong = evaluate("model", task, tmp_path / "wrong", engine=Scripted(_program_answer(WRONG)), data=_lcb(tmp_path), samples=2)
    assert wrong["pass@1"] == 0.0
    rows = [json.loads(x) for x in (tmp_path / "wrong" / "samples.jsonl").read_text().splitlines()]
    assert all("wrong answer" in r["failure"] for r in rows)
    # the starter code reached the prompt of the functional problem
    starter = Scripted(_program_answer(GOOD))
    evaluate("model", task, tmp_path / "p", engine=starter, data=_lcb(tmp_path), samples=1)
    assert any("class Solution" in p for p in starter.prompts)


def test_hostile_programs_are_stopped_and_graded_wrong(tmp_path):
    """Each hostile program fails, the eval run finishes, and nothing escaped onto the machine."""
    task = load_task("livecodebench", {"code": {"timeout_s": 3, "cpu_s": 2, "memory_mb": 512}})
    problem = {"id": "add", "problem": "sum", "tests": json.loads(LCB_ROWS[0]["public_test_cases"]), "func_name": None,
               "starter": ""}
    from reasoning_qat.evaluation.code import grade_code

    limits = Limits(timeout_s=3, cpu_s=2, memory_mb=512)
    for name, program in HOSTILE.items():
        g = grade_code(f"</think>\n```python\n{program}\n```", problem["tests"], None, limits)
        assert not g.correct and g.failure, name
    assert not __import__("os").path.exists("/tmp/rqat_escaped")
    r = run_program(HOSTILE["read outside"], "", limits)
    assert "root:" not in r.stdout and "outside the program's directory" in r.stderr
    r = run_program(HOSTILE["sleep"], "", Limits(timeout_s=1))
    assert r.timed_out and r.wall_s < 5
    r = run_program(HOSTILE["flood"], "", Limits(timeout_s=3, file_mb=1))
    assert len(r.stdout) <= 1024 * 1024 and r.returncode != 0
    # and the eval as a whole still runs to its metrics with every sample graded wrong
    hostile = Scripted(lambda p, j: f"</think>\n```python\n{list(HOSTILE.values())[j % len(HOSTILE)]}\n```")
    m = evaluate("model", task, tmp_path / "h", engine=hostile, data=_lcb(tmp_path), samples=len(HOSTILE), limit=1)
    assert m["pass@1"] == 0.0 and m["samples_per_problem"] == len(HOSTILE)


def test_network_namespace_where_the_os_allows_it():
    """Without the audit hook (a program that got past it), the namespace still has no route out."""
    mode = network_isolation()
    if mode == "none":
        pytest.skip("this OS allows no network namespace (the metrics say so: network_isolation 'none')")
    import subprocess
    import sys

    from reasoning_qat.evaluation import sandbox

    probe = ("import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('1.1.1.1', 53))\n    print('connected')\n"
             "except OSError as e:\n    print('blocked', e.errno)")
    flags = {"netns": sandbox.CLONE_NEWNET, "userns+netns": sandbox.CLONE_NEWUSER | sandbox.CLONE_NEWNET}[mode]
    out = subprocess.run([sys.executable, "-I", "-c", sandbox._LAUNCHER, str(flags), "5", "1024", "16", "64",
                          "exec(compile(" + repr(probe) + ", 'p', 'exec'))"], capture_output=True, text=True, timeout=30, check=False)
    assert out.stdout.startswith("blocked"), out.stdout + out.stderr


def test_hidden_tests_refuse_pickled_objects():
    from reasoning_qat.evaluation.code import decode_tests

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        decode_tests(evil)
    assert decode_tests(_compressed([{"input": "1", "output": "2", "testtype": "stdin"}]))[0]["output"] == "2"


# ---- the suite and the compare table ----------------------------------------------------------------

def test_reasoning_suite_expands_and_compare_has_a_column_per_task(tmp_path):
    from reasoning_qat.compare import to_task_table

    assert expand_tasks(["reasoning"]) == ["aime", "math500", "gsm8k", "gpqa_diamond", "livecodebench"]
    assert expand_tasks(["math500", "reasoning"])[0] == "math500" and len(expand_tasks(["math500", "reasoning"])) == 5
    with pytest.raises(Exception, match="suite"):
        load_task("reasoning")
    rows = [{"run": "r", "bits": b, "method": m, "label": m, "task": t, "pass@1": v}
            for (b, m, t, v) in [(16, "bf16", "aime", 0.5), (16, "bf16", "math500", 0.9), (4, "qat", "aime", 0.4),
                                 (4, "qat", "math500", 0.8), (4, "rtn", "aime", 0.1)]]
    table = to_task_table(rows).splitlines()
    assert table[0] == "| run | bits | method | aime | math500 | average |"
    assert "| r | 16 | bf16 | 0.500 | 0.900 | 0.700 |" in table
    assert "| r | 4 | qat | 0.400 | 0.800 | 0.600 |" in table
    assert "| r | 4 | rtn | 0.100 | - | 0.100 (1/2) |" in table


def test_recipe_preflight_checks_every_suite_task_source(tmp_path):
    from reasoning_qat.recipe import Recipe, RecipeError
    from reasoning_qat.stages import preflight

    base = {"name": "s", "model": {"demo": {"hidden_size": 32}}, "quant": {"group_size": -1}, "eval": {"tasks": ["reasoning"]}}
    # hub ids pass the offline preflight (they are resolved at eval time)
    preflight(Recipe.model_validate(base))
    bad = {**base, "eval": {"tasks": ["reasoning"], "data": {"aime24": str(tmp_path / "missing.jsonl")}}}
    with pytest.raises(RecipeError, match="eval.data.aime24"):
        preflight(Recipe.model_validate(bad))
    unknown = {**base, "eval": {"tasks": ["math500"], "task_options": {"aime": {"samples": 2}}}}
    with pytest.raises(RecipeError, match="task_options"):
        preflight(Recipe.model_validate(unknown))
    stray = {**base, "eval": {"tasks": ["math500"], "data": {"aime": "a.jsonl"}}}
    with pytest.raises(RecipeError, match="eval.data: 'aime' is not one of the tasks evaluated"):
        preflight(Recipe.model_validate(stray))
    # a year's file is accepted for the suite's combined AIME task
    year = {**base, "eval": {"tasks": ["reasoning"], "data": {"aime24": write_jsonl(tmp_path / "a.jsonl", [{"problem": "p", "answer": "1"}])}}}
    preflight(Recipe.model_validate(year))


def test_demo_eval_counts_the_trace_styles_students_write():
    """The eval's metrics of the demo task say whose trace style the responses use (a student
    trained on another generator's traces); other tasks, or demo responses with no step line, get none."""
    from reasoning_qat.data.arithmetic import chain_problems
    from reasoning_qat.evaluation.runner import _trace_styles
    from reasoning_qat.evaluation.tasks import load_task

    cols, compact = chain_problems(3, 0), chain_problems(2, 0, trace="compact")
    rows = [{"response": p.response} for p in cols + compact] + [{"response": "The answer is \\boxed{1}."}]
    assert _trace_styles(load_task("demo_arith"), rows) == {"trace_styles": {"columns": 3, "compact": 2, "other": 1}}
    assert _trace_styles(load_task("demo_arith"), rows[-1:]) == {}
    assert _trace_styles(load_task("math500"), rows) == {}
