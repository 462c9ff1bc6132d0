"""Eval task definitions: YAML files in `eval/tasks/` (or any path), typed here.

A task is one of three kinds, graded differently (runner.py): `math` (math-verify on the final
answer), `multiple_choice` (options shuffled per sample; one letter must be chosen) and `code`
(the program is run against the task's tests in a sandbox). A task may `combine` other tasks (AIME
over several years), and a YAML holding only `suite: [...]` names a set of tasks (`reasoning`).
"""

from __future__ import annotations

import random
from datetime import date, datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import SpecError, UserError


class Sampling(BaseModel):
    """A task's decoding: temperature, top-p, top-k, max_new_tokens (the paper's settings
    per benchmark)."""
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=-1)
    max_new_tokens: int = Field(32768, ge=1)


class CodeConfig(BaseModel):
    """Where a code task's tests live and how its programs run (sandbox.Limits)."""

    model_config = ConfigDict(extra="forbid")
    public_tests_field: str = "public_test_cases"
    private_tests_field: str | None = "private_test_cases"
    starter_field: str = "starter_code"
    metadata_field: str = "metadata"  # JSON with `func_name` for functional (LeetCode-style) tests
    starter_template: str = "{starter}"
    stdin_template: str = ""
    timeout_s: float = Field(6.0, gt=0)
    cpu_s: int = Field(5, ge=1)
    memory_mb: int = Field(1024, ge=64)
    workers: int | None = Field(None, ge=1)  # sandboxes at a time (default: the CPU count)


class Task(BaseModel):
    """An eval task file (eval/tasks/*.yaml): source, split, fields, prompt template, grading kind and
    sampling."""
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: Literal["math", "multiple_choice", "code"] = "math"
    source: str = ""  # hub id, local .jsonl, or "demo" (the run's generated test split); unused with `combine`
    subset: str | None = None  # hub configuration
    split: str = "test"
    data_files: list[str] | None = None  # hub repos of plain files (no loading script), e.g. LiveCodeBench's
    where: dict[str, str] = Field(default_factory=dict)  # keep rows whose field contains the text (AIME year)
    combine: list[str] = Field(default_factory=list)  # other tasks whose problems this one concatenates
    id_field: str | None = None
    problem_field: str = "problem"
    answer_field: str = "answer"  # math: the gold answer; multiple_choice: the correct option's text
    answer_after: str | None = None  # keep only the text after this marker (GSM8K's '####')
    distractor_fields: list[str] = Field(default_factory=list)  # multiple_choice: the wrong options' fields
    date_field: str | None = None  # with release_start/release_end: LiveCodeBench's release windows
    release_start: date | None = None
    release_end: date | None = None  # exclusive
    code: CodeConfig = Field(default_factory=CodeConfig)
    prompt_template: str = "{problem}"  # {problem}; multiple_choice also {choices}; code also {format}
    enable_thinking: bool = True
    samples: int = Field(1, ge=1)
    sampling: Sampling = Field(default_factory=Sampling)

    @model_validator(mode="after")
    def _window(self):
        if self.release_start and self.release_end and self.release_end <= self.release_start:
            raise ValueError(f"release_end {self.release_end} is not after release_start {self.release_start}: "
                             "the window holds no problem")
        return self

    def load(self, demo_dir: Path | None = None, limit: int | None = None, data: str | dict | None = None) -> list[dict]:
        """The task's problems. `data`: a local .jsonl or dataset directory replacing `source`, or a
        {task name: file} map (the recipe's eval.data) from which this task and its parts take theirs."""
        own = data.get(self.name) if isinstance(data, dict) else data
        if self.combine and not own:
            rows = []
            for part in self.combine:  # each year from its own source (or its own local file)
                task = load_task(part)
                rows += [{**r, "id": f"{task.name}/{r['id']}"} for r in task.load(demo_dir, None, data)]
            return rows[:limit] if limit else rows
        if not (own or self.source):
            raise UserError(f"task {self.name}: no source (and no combine)")
        fix = (f"for offline use give a local copy: eval.data: {{{self.name}: FILE.jsonl}} in a recipe, "
               f"or rqat eval --data FILE.jsonl")
        filtered = bool(self.where or self.release_start or self.release_end)
        # torch: imported when a task loads its rows, not when a task file is validated
        from ..data.qat_data import load_rows

        try:
            rows = load_rows(own or self.source, self.split, demo_dir, subset=None if own else self.subset,
                             offline_hint=fix, limit=None if filtered else limit, data_files=None if own else self.data_files)
        except SpecError as err:  # the task file's own source: named as the task's, not as a spec key
            raise UserError(f"task {self.name}: {err}") from None
        rows = [r for r in rows if self._keep(r)]
        return [self._problem(i, r) for i, r in enumerate(rows[:limit] if limit else rows)]

    def _keep(self, row: dict) -> bool:
        if any(text not in str(row.get(f, "")) for f, text in self.where.items()):
            return False
        if self.date_field and (self.release_start or self.release_end):
            day = _as_date(row.get(self.date_field), self.name)
            return (not self.release_start or day >= self.release_start) and (not self.release_end or day < self.release_end)
        return True

    def _problem(self, i: int, r: dict) -> dict:
        need = [self.problem_field] + ([self.answer_field] if self.kind != "code" else []) + self.distractor_fields
        if missing := [f for f in need if f not in r]:
            raise UserError(f"task {self.name}: row {i} lacks {missing} (has {sorted(r)[:12]})")
        pid = r.get(self.id_field) if self.id_field else r.get("index", r.get("unique_id", r.get("id", i)))
        out = {"id": pid if pid is not None else i, "problem": r[self.problem_field]}
        if self.kind == "code":
            from .code import decode_tests

            c = self.code
            tests = decode_tests(r.get(c.public_tests_field))
            if c.private_tests_field:
                tests += decode_tests(r.get(c.private_tests_field))
            meta = r.get(c.metadata_field) or {}
            meta = yaml.safe_load(meta) if isinstance(meta, str) else meta
            return {**out, "answer": "", "tests": tests, "starter": r.get(c.starter_field) or "",
                    "func_name": (meta or {}).get("func_name")}
        answer = str(r[self.answer_field])
        if self.answer_after and self.answer_after in answer:
            answer = answer.rsplit(self.answer_after, 1)[1].strip().replace(",", "")
        if self.kind == "multiple_choice":
            return {**out, "answer": answer.strip(), "distractors": [str(r[f]).strip() for f in self.distractor_fields]}
        return {**out, "answer": answer}

    def prompt(self, problem: dict | str, choices: list[str] | None = None) -> str:
        """The user message. multiple_choice: `choices` in the order of this sample's shuffle."""
        text = problem["problem"] if isinstance(problem, dict) else problem
        fields = {"problem": text.strip() if self.kind != "math" else text}
        if self.kind == "multiple_choice":
            from .grader import LETTERS  # math-verify: loaded to grade, not to validate a task file

            fields["choices"] = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices or []))
        if self.kind == "code":
            starter = problem.get("starter", "") if isinstance(problem, dict) else ""
            fields["format"] = (self.code.starter_template.format(starter=starter) if starter.strip()
                                else self.code.stdin_template)
        return self.prompt_template.format(**fields)

    def shuffled_choices(self, problem: dict, seed: int) -> tuple[list[str], str]:
        """The options of one sample in a seeded random order, and the gold letter in that order."""
        options = [problem["answer"], *problem["distractors"]]
        order = list(range(len(options)))
        random.Random(seed).shuffle(order)
        from .grader import LETTERS

        return [options[i] for i in order], LETTERS[order.index(0)]


def _as_date(value, task: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return datetime.fromisoformat(str(value).replace("Z", "")).date()
    except ValueError:
        raise UserError(f"task {task}: cannot read the release date {value!r}") from None


def task_dirs() -> list[Path]:
    """Where task names are looked up: ./eval/tasks, then the package's eval/tasks."""
    here = Path(__file__).resolve()
    return [Path.cwd() / "eval" / "tasks", here.parents[2] / "eval" / "tasks"]


def _task_file(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        found = [d / f"{name_or_path}.yaml" for d in task_dirs() if (d / f"{name_or_path}.yaml").is_file()]
        if not found:
            known = sorted({p.stem for d in task_dirs() if d.is_dir() for p in d.glob("*.yaml")})
            raise SpecError("tasks", f"unknown task {name_or_path!r} (known: {', '.join(known)}; or give a .yaml path)")
        path = found[0]
    if not path.is_file():
        raise SpecError("tasks", f"no such task file {name_or_path!r}")
    return path


def expand_tasks(names: list[str]) -> list[str]:
    """Task names with suites (a YAML of only `suite: [...]`, e.g. `reasoning`) replaced by their
    members, each name once, in order."""
    out: list[str] = []
    for name in names:
        spec = yaml.safe_load(_task_file(name).read_text()) or {}
        members = expand_tasks(spec["suite"]) if isinstance(spec, dict) and "suite" in spec else [name]
        out += [m for m in members if m not in out]
    return out


def load_task(name_or_path: str, overrides: dict | None = None) -> Task:
    """A task by name (eval/tasks/NAME.yaml) or path; `overrides` replace fields (a recipe's
    eval.task_options.NAME, e.g. AIME years or a LiveCodeBench release window). Raises SpecError naming
    `tasks`, or `task_options.NAME.FIELD` when an override is bad; UserError naming the task file when the
    file itself is."""
    path = _task_file(name_or_path)
    spec = yaml.safe_load(path.read_text()) or {}
    if isinstance(spec, dict) and "suite" in spec:
        raise SpecError("tasks", f"{name_or_path!r} is a suite of {spec['suite']}; expand it first (expand_tasks)")
    try:
        return Task.model_validate({**spec, **(overrides or {})})
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(map(str, e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if overrides and (not e["loc"] or e["loc"][0] in overrides):  # the user's value, not the task file's
            raise SpecError(f"task_options.{spec.get('name', name_or_path)}{'.' + loc if loc else ''}",
                            msg + (f" (got {e['input']!r})" if e["loc"] and not isinstance(e.get("input"), dict) else "")) from None
        raise UserError(f"{path}: {loc}: {msg}") from None
