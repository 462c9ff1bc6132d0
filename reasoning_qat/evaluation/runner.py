"""Evaluate one model on one task: prompts, k samples, grading, pass@1 with a confidence interval.

Math tasks send each prompt once for k samples. Multiple-choice tasks shuffle the options of every
sample with its own seed (so the letter carries no prior), so each sample is a prompt of its own.
Code tasks run each extracted program against the problem's tests in the sandbox."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

from ..data.arithmetic import trace_style
from ..data.reasoning import generation_prompt, write_jsonl
from ..data.thinking import prompt_opens_thinking
from .backends import EngineSettings, make_backend, request_seed
from .grader import grade, grade_choice
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
             engine=None, data: str | dict | None = None) -> dict:
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
    k = k if temp > 0 else 1
    engine = engine or make_backend(backend, model_path, batch_size, trust_remote_code, seed, settings)
    chat = lambda text: generation_prompt(engine.tokenizer, text, task.enable_thinking)
    golds: list[list[str]] = []
    try:
        started = time.time()
        if task.kind == "multiple_choice":  # one prompt per (problem, sample): its own shuffle of the options
            prompts, flat = [], []
            for p in problems:
                shuffles = [task.shuffled_choices(p, request_seed(seed, f"choices/{p['id']}", j)) for j in range(k)]
                golds.append([gold for _, gold in shuffles])
                prompts.append(chat(task.prompt(p, shuffles[0][0])))
                flat += [chat(task.prompt(p, choices)) for choices, _ in shuffles]
            out = engine.generate(flat, 1, temp, s.top_p, s.top_k, max_new, seed,
                                  keys=[f"{p['id']}/{j}" for p in problems for j in range(k)])
            completions = [[c for (c,) in out[i * k : (i + 1) * k]] for i in range(len(problems))]
        else:
            prompts = [chat(task.prompt(p)) for p in problems]
            completions = engine.generate(prompts, k, temp, s.top_p, s.top_k, max_new, seed,
                                          keys=[p["id"] for p in problems])
        elapsed = time.time() - started
    finally:
        if own_engine:
            engine.close()
    grades, extra = _grade(task, problems, prompts, completions, golds)
    rows, per_problem = [], []
    for i, (p, comps) in enumerate(zip(problems, completions)):
        per_problem.append([g.correct for g in grades[i]])
        for j, (c, g) in enumerate(zip(comps, grades[i])):
            gold = golds[i][j] if golds else p["answer"]
            rows.append({"id": p["id"], "sample": j, "answer": gold, "extracted": g.extracted,
                         "correct": g.correct, "truncated": c.truncated, "num_tokens": c.num_tokens, "response": c.text,
                         **({"failure": g.failure, "tests_passed": g.passed, "tests": g.total} if task.kind == "code" else {})})
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
        **extra,
        **_trace_styles(task, rows),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "samples.jsonl", rows)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def _trace_styles(task: Task, rows: list[dict]) -> dict:
    """The demo's chain task: how many responses use each trace style (`data.arithmetic.trace_style`), so
    a student trained on another generator's traces shows whose style it writes; {} for other tasks."""
    if task.source != "demo":
        return {}
    styles = Counter(trace_style(r["response"]) for r in rows)
    return {"trace_styles": dict(sorted(styles.items()))} if set(styles) - {"other"} else {}


def _grade(task: Task, problems, prompts, completions, golds) -> tuple[list[list], dict]:
    """Per problem, per sample grades; plus task-kind metrics (the sandbox's isolation for code)."""
    opened = [prompt_opens_thinking(pr) for pr in prompts]  # the template opened the thinking itself
    if task.kind == "math":
        return [[grade(c.text, p["answer"], o) for c in comps] for p, comps, o in zip(problems, completions, opened)], {}
    if task.kind == "multiple_choice":
        n = [1 + len(p["distractors"]) for p in problems]
        return [[grade_choice(c.text, g, m, o) for c, g in zip(comps, gs)]
                for comps, gs, m, o in zip(completions, golds, n, opened)], {}
    import os

    from .code import grade_many
    from .sandbox import Limits, network_isolation

    c = task.code
    limits = Limits(timeout_s=c.timeout_s, cpu_s=c.cpu_s, memory_mb=c.memory_mb)
    jobs = [(comp.text, p["tests"], p["func_name"], o) for p, comps, o in zip(problems, completions, opened) for comp in comps]
    flat = grade_many(jobs, limits, c.workers or os.cpu_count() or 1)
    out, i = [], 0
    for comps in completions:
        out.append(flat[i : i + len(comps)])
        i += len(comps)
    sandbox = {"network_isolation": network_isolation(), "timeout_s": limits.timeout_s, "cpu_s": limits.cpu_s,
               "memory_mb": limits.memory_mb, "file_mb": limits.file_mb, "audit_hook": True}
    return out, {"sandbox": sandbox}
