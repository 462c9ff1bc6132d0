"""eval stage: every variant (BF16 teacher and each export) on every task in `eval.tasks`.

Quantized variants are evaluated from their dequantized exports, so every bit width runs the same
way on any engine. Finished (variant, task) pairs are kept across a crash.
"""

from __future__ import annotations

import json

from ..evaluation.runner import evaluate
from ..evaluation.tasks import load_task
from ..pipeline import StageContext
from .common import teacher_path
from .teacher import demo_data_dir


def run(ctx: StageContext) -> dict:
    r, e = ctx.recipe, ctx.recipe.eval
    tasks = [load_task(t) for t in e.tasks]
    models = {"bf16": teacher_path(ctx)}
    export_dir = ctx.input("export")
    for d in sorted(p for p in export_dir.iterdir() if (p / "dequantized").is_dir()):
        models[d.name] = str(d / "dequantized")
    metrics: dict = {}
    for name, path in models.items():
        for task in tasks:
            out = ctx.out / name / task.name
            if (out / "metrics.json").is_file():
                m = json.loads((out / "metrics.json").read_text())
            else:
                m = evaluate(path, task, out, backend=e.backend, samples=e.samples, limit=e.limit,
                             demo_dir=demo_data_dir(ctx.input("teacher")), batch_size=e.batch_size,
                             max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                             tensor_parallel_size=e.tensor_parallel_size,
                             trust_remote_code=r.model.trust_remote_code, seed=e.seed)
            metrics.setdefault(name, {})[task.name] = {k: m[k] for k in ("pass@1", "ci95", "truncation_rate",
                                                                          "mean_response_tokens", "problems")}
            print(f"  {name:>18} {task.name}: pass@1 {m['pass@1']:.3f} ± {m['ci95']:.3f}")
    return metrics
