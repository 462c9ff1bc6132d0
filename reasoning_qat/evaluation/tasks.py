"""Eval task definitions: YAML files in `eval/tasks/` (or any path), typed here."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.reasoning import load_rows
from ..errors import UserError
from ..recipe import RecipeError


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=-1)
    max_new_tokens: int = Field(32768, ge=1)


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    source: str  # hub id, local .jsonl, or "demo" (the run's generated test split)
    split: str = "test"
    problem_field: str = "problem"
    answer_field: str = "answer"
    answer_after: str | None = None  # keep only the text after this marker (GSM8K's '####')
    prompt_template: str = "{problem}"
    enable_thinking: bool = True
    samples: int = Field(1, ge=1)
    sampling: Sampling = Field(default_factory=Sampling)

    def load(self, demo_dir: Path | None = None, limit: int | None = None, data: str | None = None) -> list[dict]:
        """The task's problems; `data` (a local .jsonl or dataset directory) replaces `source`."""
        source = data or self.source
        fix = (f"for offline use give a local copy: eval.data: {{{self.name}: FILE.jsonl}} in the recipe, "
               f"or rqat eval --data FILE.jsonl")
        rows = load_rows(source, self.split, demo_dir, field=f"task {self.name}: source", offline_hint=fix, limit=limit)
        out = []
        for i, r in enumerate(rows):
            if self.problem_field not in r or self.answer_field not in r:
                raise UserError(f"task {self.name}: row {i} lacks {self.problem_field!r} or {self.answer_field!r}")
            answer = str(r[self.answer_field])
            if self.answer_after and self.answer_after in answer:
                answer = answer.rsplit(self.answer_after, 1)[1].strip().replace(",", "")
            out.append({"id": r.get("index", r.get("unique_id", i)), "problem": r[self.problem_field], "answer": answer})
        return out

    def prompt(self, problem: str) -> str:
        return self.prompt_template.format(problem=problem)


def task_dirs() -> list[Path]:
    here = Path(__file__).resolve()
    return [Path.cwd() / "eval" / "tasks", here.parents[2] / "eval" / "tasks"]


def load_task(name_or_path: str) -> Task:
    path = Path(name_or_path)
    if not path.suffix:
        found = [d / f"{name_or_path}.yaml" for d in task_dirs() if (d / f"{name_or_path}.yaml").is_file()]
        if not found:
            known = sorted({p.stem for d in task_dirs() if d.is_dir() for p in d.glob("*.yaml")})
            raise RecipeError(f"eval.tasks: unknown task {name_or_path!r} (known: {', '.join(known)}; or give a .yaml path)")
        path = found[0]
    if not path.is_file():
        raise RecipeError(f"eval.tasks: no such task file {name_or_path!r}")
    try:
        return Task.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as err:
        e = err.errors()[0]
        raise RecipeError(f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
