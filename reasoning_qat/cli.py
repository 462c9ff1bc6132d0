"""`rqat`: run a recipe, show a run's stages, evaluate a model, compare runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .pipeline import StageFailed
from .recipe import RecipeError

EPILOG = """examples:
  rqat run recipes/demo.yaml                     run every missing or stale stage
  rqat run recipes/demo.yaml --stages qat,eval   re-run only these stages (inputs must exist)
  rqat run recipes/demo.yaml --force             re-run everything from scratch
  rqat status runs/demo                          stage table of a run
  rqat eval runs/demo/export/w4-qat/dequantized --task demo_arith --demo-data runs/demo/teacher/data
  rqat compare runs/demo runs/qwen3-0.6b-w4g128  one table and plot across runs
"""


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def cmd_run(a) -> int:
    from .pipeline import Pipeline
    from .recipe import load_recipe
    from .stages import STAGES, preflight

    recipe = load_recipe(a.recipe)
    if a.run_root:
        recipe = recipe.model_copy(update={"run_root": a.run_root})
    console = _console()
    pipe = Pipeline(recipe, STAGES, console)
    only = [s.strip() for s in a.stages.split(",") if s.strip()] if a.stages else None
    plan = pipe.plan(only, a.force)
    preflight(recipe)
    console.print(f"run [bold]{recipe.name}[/] in {recipe.run_dir}: " + (", ".join(plan) if plan else "nothing to do (all stages done)"))
    if a.dry_run:
        return 0
    pipe.run(only, a.force)
    if (pipe.stage_dir("eval") / "manifest.json").is_file() and "eval" in plan:
        from .compare import write_report

        _, md = write_report([recipe.run_dir], recipe.run_dir / "compare", recipe.compare.plot)
        console.print(md)
        console.print(f"table and plot: {recipe.run_dir / 'compare'}")
    return 0


def cmd_status(a) -> int:
    from rich.table import Table

    from .pipeline import Pipeline, recipe_from_run
    from .stages import STAGES

    recipe = recipe_from_run(a.run)
    recipe = recipe.model_copy(update={"run_root": str(Path(a.run).parent)})
    pipe = Pipeline(recipe, STAGES)
    table = Table(title=f"run {recipe.name} ({a.run})")
    for col in ("stage", "status", "wall time (s)", "finished"):
        table.add_column(col)
    colors = {"done": "green", "stale": "yellow", "partial": "red", "missing": "white", "disabled": "dim"}
    for row in pipe.status_rows():
        st = row["status"]
        table.add_row(row["stage"], f"[{colors[st]}]{st}[/]", f"{row['wall_time_s'] or '':}", row["finished_at"] or "")
    _console().print(table)
    return 0


def cmd_eval(a) -> int:
    import json

    from .evaluation.runner import evaluate
    from .evaluation.tasks import load_task

    if not Path(a.model).exists() and "/" not in a.model:
        raise RecipeError(f"model: {a.model!r} is neither a local directory nor a hub id")
    out = Path(a.out or Path("eval") / "results" / Path(a.model).name)
    task = load_task(a.task)
    m = evaluate(a.model, task, out / task.name, backend=a.backend, samples=a.samples, limit=a.limit,
                 demo_dir=Path(a.demo_data) if a.demo_data else None, batch_size=a.batch_size,
                 max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                 tensor_parallel_size=a.tensor_parallel_size, trust_remote_code=a.trust_remote_code, seed=a.seed)
    print(json.dumps(m, indent=1))
    return 0


def cmd_compare(a) -> int:
    from .compare import write_report

    out = Path(a.out) if a.out else Path(a.runs[0]) / "compare"
    _, md = write_report(a.runs, out, not a.no_plot)
    print(md)
    print(f"\nwritten: {out / 'compare.md'}, {out / 'compare.json'}" + ("" if a.no_plot else f", {out / 'compare.png'}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rqat", description="Low-bit reasoning models: calibrate, GPTQ, KD-QAT, RL, export, eval.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe's missing or stale stages")
    r.add_argument("recipe", help="recipe YAML (see recipes/)")
    r.add_argument("--stages", help="comma-separated stages to (re-)run: teacher,calibrate,ptq,qat,rl,export,eval")
    r.add_argument("--force", action="store_true", help="re-run the chosen stages from scratch, discarding partial work")
    r.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    r.add_argument("--run-root", help="directory holding runs (default: the recipe's run_root, 'runs')")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("status", help="stage table of a run directory")
    s.add_argument("run", help="run directory, e.g. runs/demo")
    s.set_defaults(fn=cmd_status)

    e = sub.add_parser("eval", help="evaluate one model (directory or hub id) on one task")
    e.add_argument("model")
    e.add_argument("--task", required=True, help="task name in eval/tasks/ or a task .yaml")
    e.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    e.add_argument("--samples", type=int, help="k samples per problem (default: the task's)")
    e.add_argument("--limit", type=int, help="first N problems only")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--max-new-tokens", type=int)
    e.add_argument("--temperature", type=float)
    e.add_argument("--tensor-parallel-size", type=int, default=1)
    e.add_argument("--demo-data", help="for task source 'demo': the directory with test.jsonl")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="output directory (default: eval/results/<model name>)")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("compare", help="table and plot across runs")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("--out", help="output directory (default: <first run>/compare)")
    c.add_argument("--no-plot", action="store_true")
    c.set_defaults(fn=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (RecipeError, ValueError, FileNotFoundError, FloatingPointError, StageFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
