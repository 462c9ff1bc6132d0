"""`rqat`: run a recipe, show a run's stages, evaluate a model, compare runs."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import UserError
from .recipe import RecipeError

EPILOG = """examples:
  rqat run recipes/demo.yaml                     run every missing or stale stage
  rqat run recipes/demo.yaml --stages qat,eval   re-run only these stages (inputs must exist)
  rqat run recipes/demo.yaml --force             re-run everything from scratch
  rqat run recipes/demo.yaml quant.bits=[2] qat.max_steps=50   override recipe keys (recorded in the run)
  rqat status runs/demo                          stage table of a run
  rqat eval runs/demo/export/w4-qat/dequantized --task demo_arith --demo-data runs/demo/teacher/data
  rqat compare runs/demo runs/qwen3-0.6b-w4g128  one table and plot across runs
  rqat publish runs/demo w4-qat --to out/demo-w4  the export with its model card (--repo-id ORG/NAME uploads)
"""


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def cmd_run(a) -> int:
    """`rqat run RECIPE [KEY=VALUE ...]`: check the recipe (preflight), print the plan, run it. Exit 0;
    UserError -> 2."""
    from . import launch
    from .api import prepare

    rank = launch.set_aside() if launch.launched_by_user() else None  # torchrun / accelerate launch: launch.py
    started = time.time()
    # the schema, overrides and every file, directory, task and layer width the recipe names: checked before
    # anything is created, and before the heavy imports below (a schema error costs no torch import)
    recipe, notes = prepare(a.recipe, a.overrides, a.run_root)
    if rank not in (None, 0):  # only global rank 0 writes the run; the others train when it asks them to
        return 0 if a.dry_run else launch.follow(recipe.run_dir, started)
    if rank == 0 and not a.dry_run:
        recipe.run_dir.mkdir(parents=True, exist_ok=True)
        launch.start_session(recipe.run_dir)
        status = 1
        try:
            status = _run_pipeline(a, recipe, notes)
            return status
        except UserError:
            status = 2
            raise
        finally:
            launch.end_session(recipe.run_dir, status)
    return _run_pipeline(a, recipe, notes)


def _run_pipeline(a, recipe, notes) -> int:
    from .pipeline import Pipeline
    from .stages import STAGES

    console = _console()
    pipe = Pipeline(recipe, STAGES, console)
    only = [s.strip() for s in a.stages.split(",") if s.strip()] if a.stages else None
    plan = pipe.plan(only, a.force)
    console.print(f"run [bold]{recipe.name}[/] in {recipe.run_dir}: " + (", ".join(plan) if plan else "nothing to do (all stages done)"))
    for note in notes if "export" in plan else []:
        console.print(f"note: {note}", markup=False)
    if a.dry_run:
        return 0
    ran = pipe.run(only, a.force)
    if "compare" in ran or (not ran and pipe.layout.compare_table().is_file()):  # a finished run shows its table
        console.print(pipe.layout.compare_table().read_text())
        console.print(f"table and plot: {pipe.layout.compare()}")
    return 0


def cmd_status(a) -> int:
    """`rqat status RUN`: each stage's state, wall time and notes, and the run holding the lock if any."""
    from rich.table import Table

    from .pipeline import Pipeline, lock_holder, recipe_from_run
    from .stages import STAGES

    pipe = Pipeline(recipe_from_run(a.run), STAGES, run_dir=Path(a.run))
    table = Table(title=f"run {pipe.recipe.name} ({a.run})")
    for col in ("stage", "status", "wall time (s)", "finished"):
        table.add_column(col)
    colors = {"done": "green", "stale": "yellow", "partial": "red", "missing": "white", "disabled": "dim"}
    rows = pipe.status_rows()
    for row in rows:
        st = row["status"]
        table.add_row(row["stage"], f"[{colors[st]}]{st}[/]", f"{row['wall_time_s'] or '':}", row["finished_at"] or "")
    console = _console()
    console.print(table)
    for row in rows:
        if row["notes"]:
            console.print(f"{row['stage']}: {row['notes']}")
    if (pid := lock_holder(Path(a.run))) is not None:
        running = [r["stage"] for r in rows if r["status"] == "partial"]
        console.print(f"a run is in progress (rqat run, pid {pid})" + (f": {', '.join(running)} is being written now"
                                                                       if running else ""))
    return 0


def cmd_eval(a) -> int:
    """`rqat eval MODEL --task T`: one model on one task; metrics printed and written under --out."""
    from .api import flag_names
    from .models import resolve_model

    resolve_model(a.model, "model", a.trust_remote_code)  # one line, before any engine starts
    with flag_names():
        return _eval(a)


def _eval(a) -> int:
    import json

    from .evaluation.backends import EngineSettings
    from .evaluation.runner import evaluate
    from .evaluation.tasks import load_task

    task = load_task(a.task)
    if task.source == "demo" and not (a.demo_data or a.data):
        raise RecipeError(f"--task {task.name} evaluates a demo run's test split: give --demo-data RUN/teacher/data "
                          "(or --data FILE.jsonl)")
    temperature = task.sampling.temperature if a.temperature is None else a.temperature
    if a.samples and a.samples > 1 and temperature == 0:
        raise RecipeError(f"--samples {a.samples}: {task.name} decodes greedily (temperature 0), so every sample would be "
                          "the same; add --temperature (e.g. 0.6) or drop --samples")
    from .api import default_eval_dir

    out = Path(a.out) if a.out else default_eval_dir(a.model)
    settings = EngineSettings(tensor_parallel_size=a.tensor_parallel_size, gpu_memory_utilization=a.gpu_memory_utilization,
                              dtype=a.dtype, enforce_eager=a.enforce_eager, max_model_len=a.max_model_len)
    metrics = evaluate(a.model, task, out / task.name, backend=a.backend, samples=a.samples, limit=a.limit,
                 demo_dir=Path(a.demo_data) if a.demo_data else None, batch_size=a.batch_size,
                 max_new_tokens=a.max_new_tokens, temperature=a.temperature, settings=settings, data=a.data,
                 trust_remote_code=a.trust_remote_code, seed=a.seed)
    print(json.dumps(metrics, indent=1))
    print(f"results: {out / task.name}")
    return 0


def cmd_compare(a) -> int:
    """`rqat compare RUN ...`: one table (markdown, json) and plot across runs."""
    from .compare import write_report

    # not <run>/compare: that is the run's own compare stage, which `rqat run` writes and checks
    names = "+".join(Path(r).resolve().name for r in a.runs)
    out = Path(a.out) if a.out else Path(a.runs[0]).resolve().parent / f"compare-{names}"
    _, md = write_report(a.runs, out, not a.no_plot)
    print(md)
    print(f"\nwritten: {out / 'compare.md'}, {out / 'compare.json'}" + ("" if a.no_plot else f", {out / 'compare.png'}"))
    return 0


def cmd_publish(a) -> int:
    """`rqat publish RUN VARIANT --to DIR [--repo-id ORG/NAME]`: the export and its model card in a folder."""
    from .publish import publish

    out = publish(a.run, a.variant, a.to, a.format, a.repo_id, private=not a.public)
    print(f"published {a.variant} of {a.run} to {out}" + (f" and https://huggingface.co/{a.repo_id}" if a.repo_id else ""))
    return 0


def cmd_analyze(a) -> int:
    """`rqat analyze TARGET`: per-layer quantization damage (KL with one layer quantized) and its predictors."""
    from .analysis import analyze_target

    report, out = analyze_target(a.target, bits=a.bits, group_size=a.group_size, method=a.method, samples=a.samples,
                                 kl_samples=a.kl_samples, seq_len=a.seq_len, calib_source=a.calib, promote=a.promote,
                                 promote_bits=a.promote_bits, out=a.out, trust_remote_code=a.trust_remote_code,
                                 plot=not a.no_plot)
    print(f"w{report['bits']} {report['method']}: KL to the teacher with every layer quantized {report['full_model_kl']:.4g}")
    print("most damaging layers (KL with only that layer quantized):")
    for name in report["ranking"][:10]:
        row = next(r for r in report["layers"] if r["name"] == name)
        print(f"  {row['kl']:10.4g}  {name}")
    rho = report["predictors_spearman_vs_kl"]
    print("how well each statistic ranks the damage (Spearman): " + ", ".join(f"{k} {v:.2f}" for k, v in rho.items()))
    print(f"written: {out / 'analysis.json'}, {out / 'overrides.yaml'}" + ("" if a.no_plot else f", {out / 'analysis.png'}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every `rqat` subcommand."""
    p = argparse.ArgumentParser(prog="rqat", description="Low-bit reasoning models: calibrate, GPTQ, KD-QAT, RL, export, eval.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    sub = p.add_subparsers(dest="command", required=True)

    from .recipe_reference import key_list

    r = sub.add_parser("run", help="run a recipe's missing or stale stages", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="recipe keys an override may set (README: Recipe reference):\n" + key_list())
    r.add_argument("recipe", help="recipe YAML (see recipes/)")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe keys to override, dotted, values in YAML (e.g. quant.bits=[2,3] qat.kd.loss=ce)")
    r.add_argument("--stages", help="comma-separated stages to (re-)run: teacher,calibrate,ptq,qat,rl,export,eval,compare")
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
    e.add_argument("--data", help="local .jsonl (or dataset directory) replacing the task's hub source (offline use)")
    e.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs per model")
    e.add_argument("--gpu-memory-utilization", type=float,
                   help="vLLM: share of GPU memory (CPU build: of the node's RAM); default 0.9 on a GPU, 0.3 on CPU")
    e.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on a GPU, float32 on CPU")
    e.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs / compilation")
    e.add_argument("--max-model-len", type=int, help="vLLM: context length (default: the model's)")
    e.add_argument("--demo-data", help="for task source 'demo': the directory with test.jsonl")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="output directory (default: beside a local model, MODEL-eval; a hub id: ~/.cache/reasoning-qat/eval/ORG--NAME)")
    e.set_defaults(fn=cmd_eval)

    an = sub.add_parser("analyze", help="per-layer quantization diagnostics and a mixed-precision suggestion")
    an.add_argument("target", help="run directory (uses its teacher, calibration set and ptq results) or a model dir / hub id")
    an.add_argument("--bits", type=int, choices=[2, 3, 4, 8], help="bit width (default: the run's first; 4 for a model)")
    an.add_argument("--group-size", type=int, choices=[-1, 32, 64, 128], help="group size (default: the run's; 128)")
    an.add_argument("--method", default="auto", choices=["auto", "ptq", "rtn"],
                    help="whose quantized weights: the run's ptq result, or round-to-nearest (auto: ptq when there is one)")
    an.add_argument("--samples", type=int, help="calibration sequences for the error measurements (default: all / 32)")
    an.add_argument("--kl-samples", type=int, default=16, help="sequences for the per-layer KL (one forward per layer each)")
    an.add_argument("--seq-len", type=int, default=512, help="calibration length for a model target")
    an.add_argument("--calib", help="for a model target: a prompt/response .jsonl (domain) or text source (default: builtin)")
    an.add_argument("--promote", type=int, help="layers to suggest at higher precision (default: the top 10%%)")
    an.add_argument("--promote-bits", type=int, choices=[3, 4, 8], help="their bit width (default: 4, or 8 from 4 bits)")
    an.add_argument("--out", help="output directory (default: <run>/analysis/w<bits>-<method>)")
    an.add_argument("--trust-remote-code", action="store_true")
    an.add_argument("--no-plot", action="store_true")
    an.set_defaults(fn=cmd_analyze)

    pb = sub.add_parser("publish", help="a variant's export with its model card, as a folder (and a hub repo)")
    pb.add_argument("run", help="run directory, e.g. runs/demo")
    pb.add_argument("variant", help="e.g. w4-qat, w2-qat_rl, w4-gptq")
    pb.add_argument("--to", required=True, help="new folder to write (refused if it exists)")
    pb.add_argument("--format", default="auto", choices=["auto", "compressed-tensors", "dequantized"],
                    help="auto: compressed-tensors where vLLM serves the scheme packed, else dequantized")
    pb.add_argument("--repo-id", help="also upload to this hub repo (token from HF_TOKEN; refused while the hub is off)")
    pb.add_argument("--public", action="store_true", help="create the hub repo public (default: private)")
    pb.set_defaults(fn=cmd_publish)

    c = sub.add_parser("compare", help="table and plot across runs")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("--out", help="output directory (default: compare-<run names> beside the first run; a run's own "
                                 "compare/ stage is left to `rqat run`)")
    c.add_argument("--no-plot", action="store_true")
    c.set_defaults(fn=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: a UserError prints one line (`error: ...`) and returns 2; Ctrl-C returns 130."""
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():  # a log file: the libraries' \r-redrawn bars are noise there (our step lines stay)
        for var in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(var, "1")
    try:
        return args.fn(args)
    except UserError as err:  # bad input or a refused action: one line; anything else keeps its traceback
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
