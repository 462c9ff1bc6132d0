"""eval stage: every variant (BF16 teacher and each export) on every task in `eval.tasks`.

Quantized variants are evaluated from their compressed-tensors export under vLLM on a GPU (the
packed checkpoint users serve, through vLLM's low-bit kernels), and from their dequantized export
elsewhere (the same function; no CPU kernel runs packed weights), and from the dequantized export
where vLLM cannot serve the scheme packed (`serving.vllm_refuses_packed`: zero points or act-order at 2/3 bits).
`eval.export_format` overrides the choice. Finished (variant, task) pairs are kept across a crash.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..evaluation.backends import pick_backend
from ..evaluation.runner import evaluate
from ..evaluation.tasks import expand_tasks, load_task
from ..pipeline import StageContext
from ..run_layout import BF16, EVAL_SAMPLES, RunLayout, Variant, finished_metrics
from ..serving import act_ordered_export, vllm_refuses_variant
from .common import teacher_path, tensorboard_writer
from .specs import engine_settings, recipe_keys

ENGINE_NAMES = {"VLLMBackend": "vLLM", "TransformersBackend": "transformers"}


def run(ctx: StageContext) -> dict:
    """The eval stage: every variant on every task; finished (variant, task) pairs kept across a crash."""
    with recipe_keys("eval"):  # the library's errors (`backend`, `tasks`, `max_model_len`) as eval.* keys
        metrics = _run(ctx)
    if (writer := tensorboard_writer(ctx)) is not None:
        # pass@1 of each variant, and per method against the bit width (TensorBoard's x axis is the step)
        for name, tasks in metrics.items():
            v = Variant.parse(name)
            for task, m in tasks.items():
                writer.add_scalar(f"pass@1/{task}/{name}", m["pass@1"], 0)
                writer.add_scalar(f"pass@1_by_bits/{task}/{v.method}", m["pass@1"], v.bits)
        writer.close()
    return metrics


def _run(ctx: StageContext) -> dict:
    r, e = ctx.recipe, ctx.recipe.eval
    tasks = [load_task(t, e.task_options.get(t)) for t in expand_tasks(e.tasks)]  # suites (`reasoning`) expanded
    models = {BF16: teacher_path(ctx)}
    fmt = e.export_format
    if fmt == "auto":
        packed = "compressed-tensors" in r.export.formats and torch.cuda.is_available() and pick_backend(e.backend) == "vllm"
        fmt = "compressed-tensors" if packed else "dequantized"
    for v in ctx.layout.exported_variants():
        v_fmt = fmt
        if fmt == "compressed-tensors" and e.export_format == "auto" and (refused := vllm_refuses_variant(
                v.bits, r.quant.override_bits, r.quant.symmetric,
                act_ordered_export(ctx.layout.export(v, "compressed-tensors")))):
            v_fmt = "dequantized"  # what vLLM cannot serve packed is evaluated as the same function, dequantized
            print(f"  {v}: the dequantized export is evaluated ({refused})")
        if ctx.layout.export(v, v_fmt).is_dir():
            models[v] = str(ctx.layout.export(v, v_fmt))
    if e.methods is not None:
        models = {v: p for v, p in models.items() if v.method in e.methods}
    if e.backend == "auto":
        from ..evaluation.backends import auto_backend

        print("  backend auto: {} ({})".format(*auto_backend()), flush=True)
    metrics: dict = {}
    for v, path in models.items():
        name = str(v)
        for task in tasks:
            out = ctx.layout.eval(v, task.name)
            done = ctx.layout.eval_metrics(v, task.name)
            result = finished_metrics(out, done, marker=done)
            if result is None:
                result = evaluate(path, task, out, backend=e.backend, samples=e.samples, limit=e.limit,
                             demo_dir=ctx.layout.demo_data(), batch_size=e.batch_size,
                             max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                             settings=engine_settings(r), data=e.data,
                             trust_remote_code=r.model.trust_remote_code, seed=e.seed)
            metrics.setdefault(name, {})[task.name] = {k: result[k] for k in ("pass@1", "ci95", "truncation_rate",
                                                                          "mean_response_tokens", "problems", "backend",
                                                                          "sandbox") if k in result}
            if e.reference_ce and task.source == "demo" and ctx.layout.demo_data() is not None:
                metrics[name][task.name].update(_reference_ce(ctx, path, ctx.layout.eval_ce(v, task.name), task))
            what = "the teacher" if v == BF16 else "/".join(Path(path).parts[-2:])  # e.g. w4-gptq/dequantized
            print(f"  {name:>18} {task.name}: pass@1 {result['pass@1']:.3f} ± {result['ci95']:.3f}"
                  + (f", held-out CE {metrics[name][task.name]['ce']:.4f}" if "ce" in metrics[name][task.name] else "")
                  + f"  [{ENGINE_NAMES.get(result.get('backend'), result.get('backend'))} on {what}]", flush=True)
    print(f"  per-sample results: {RunLayout(ctx.run_dir).stage('eval')}/<variant>/<task>/{EVAL_SAMPLES}", flush=True)
    return metrics


def _reference_ce(ctx: StageContext, model_path: str, f, task) -> dict:
    """Cross-entropy of the task's held-out reference solutions (the demo test split), kept in
    ce.json beside the task's metrics so a resumed eval does not recompute it."""
    from ..data.reasoning import read_jsonl
    from ..evaluation.likelihood import reference_ce_of

    if f.is_file():
        return json.loads(f.read_text())
    e = ctx.recipe.eval
    rows = read_jsonl(ctx.layout.demo_split(task.split))
    # a teacher-forced forward gains nothing from generation's batch (1200 on the GPU organism), and
    # full-length activations of that many sequences ran out of memory beside other runs: 64 at a time
    ce = reference_ce_of(model_path, rows[: e.limit] if e.limit else rows, batch_size=min(e.batch_size, 64),
                        trust_remote_code=ctx.recipe.model.trust_remote_code)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(ce))
    return ce
