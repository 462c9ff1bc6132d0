"""Evaluate one model on one task: prompts, k samples, grading, pass@1 with a confidence interval."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..data.reasoning import generation_prompt, write_jsonl
from .backends import EngineSettings, make_backend
from .grader import grade
from .tasks import Task


def pass_at_1(per_problem: list[list[bool]]) -> tuple[float, float]:
    """Mean over problems of the fraction of correct samples, and the 95% CI half-width."""
    scores = [sum(s) / len(s) for s in per_problem]
    n = len(scores)
    mean = sum(scores) / n
    var = sum((x - mean) ** 2 for x in scores) / max(n - 1, 1)
    return mean, 1.96 * math.sqrt(var / n)


def evaluate(model_path: str, task: Task, out_dir: str | Path, *, backend: str = "auto", samples: int | None = None,
             limit: int | None = None, demo_dir: Path | None = None, batch_size: int = 64,
             max_new_tokens: int | None = None, temperature: float | None = None,
             settings: EngineSettings = EngineSettings(), trust_remote_code: bool = False, seed: int = 0,
             engine=None, data: str | None = None) -> dict:
    """Writes metrics.json and samples.jsonl into out_dir and returns the metrics.

    Sample j of problem p is drawn with a seed derived from (seed, p's id, j): independent across
    problems, and the same on a re-run. `data` replaces the task's source (a local file, offline)."""
    out_dir = Path(out_dir)
    problems = task.load(demo_dir, limit, data)
    k = samples or task.samples
    s = task.sampling
    temp = s.temperature if temperature is None else temperature
    max_new = max_new_tokens or s.max_new_tokens
    own_engine = engine is None
    engine = engine or make_backend(backend, model_path, batch_size, trust_remote_code, seed, settings)
    try:
        prompts = [generation_prompt(engine.tokenizer, task.prompt(p["problem"]), task.enable_thinking) for p in problems]
        started = time.time()
        completions = engine.generate(prompts, k if temp > 0 else 1, temp, s.top_p, s.top_k, max_new, seed,
                                      keys=[p["id"] for p in problems])
        elapsed = time.time() - started
    finally:
        if own_engine:
            engine.close()
    rows, per_problem = [], []
    for p, prompt, comps in zip(problems, prompts, completions):
        opened = prompt.rstrip().endswith("<think>")  # the template opened the thinking for the model
        grades = [grade(c.text, p["answer"], opened) for c in comps]
        per_problem.append([g.correct for g in grades])
        for j, (c, g) in enumerate(zip(comps, grades)):
            rows.append({"id": p["id"], "sample": j, "answer": p["answer"], "extracted": g.extracted,
                         "correct": g.correct, "truncated": c.truncated, "num_tokens": c.num_tokens, "response": c.text})
    acc, ci = pass_at_1(per_problem)
    n_tokens = sum(r["num_tokens"] for r in rows)
    metrics = {
        "task": task.name,
        "model": str(model_path),
        "backend": type(engine).__name__,
        "problems": len(problems),
        "samples_per_problem": len(completions[0]) if completions else 0,
        "pass@1": acc,
        "ci95": ci,
        "truncation_rate": sum(r["truncated"] for r in rows) / max(len(rows), 1),
        "mean_response_tokens": n_tokens / max(len(rows), 1),
        "tokens_per_s": n_tokens / max(elapsed, 1e-9),
        "temperature": temp,
        "max_new_tokens": max_new,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "samples.jsonl", rows)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
