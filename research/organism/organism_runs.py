"""Runs variants of one recipe side by side on one GPU and compares them: the GPU organism's table
(issue 16) is many small runs that share a teacher, and one small model leaves most of an H100 idle.

Each variant is the base recipe with dotted overrides, run as its own `rqat run` process (at most
--parallel at once; stages resume, so a variant cut off by --deadline goes on in the next call).
A variant with `--share NAME` waits for NAME's teacher and starts from a copy of it (the pipeline
accepts the copy only if the teacher's recipe hash matches, i.e. the model section and seed agree);
`--teacher-from RUN_DIR` gives every variant a copy of a teacher that is already there.

  python research/organism/organism_runs.py --base recipes/organism-gpu.yaml --out benchmarks/results/x \\
      --variant l4 model.demo.num_layers=4 --variant l2 model.demo.num_layers=2 --parallel 2

At the end (or the deadline) every run with a finished eval goes into one compare table (with the
teacher's size and training time beside it) in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` (value parsed as YAML) set into a nested dict copy: `rqat run`'s own overrides."""
    from reasoning_qat.recipe import apply_overrides as recipe_overrides

    return recipe_overrides(recipe, overrides)


def teacher_done(run_dir: Path) -> bool:
    return (run_dir / "teacher" / "manifest.json").is_file()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base recipe YAML")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME [KEY=VALUE ...]",
                    help="a variant: its name, then overrides; repeat for more")
    ap.add_argument("--share", nargs=2, action="append", default=[], metavar=("VARIANT", "FROM"),
                    help="VARIANT starts from a copy of FROM's teacher (waits for it)")
    ap.add_argument("--teacher-from", type=Path, default=None, metavar="RUN_DIR",
                    help="every variant without a teacher starts from a copy of RUN_DIR/teacher (e.g. one carried in)")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=None, help="seconds: stop what still runs (it resumes later)")
    ap.add_argument("--stages", default=None, help="passed to rqat run --stages")
    ap.add_argument("--out", required=True, help="directory for the compare table")
    a = ap.parse_args()
    started = time.time()

    base = yaml.safe_load(Path(a.base).read_text())
    share = dict(a.share)
    runs = {}
    recipe_dir = ROOT / "runs" / "_recipes"
    log_dir = ROOT / "runs" / "_logs"
    recipe_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for name, *overrides in a.variant:
        recipe = apply_overrides(base, overrides)
        recipe["name"] = f"{base['name']}-{name}"
        path = recipe_dir / f"{recipe['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        runs[name] = (path, Path(recipe.get("run_root", "runs")) / recipe["name"])
    for v, src in share.items():
        if v not in runs or src not in runs:
            raise SystemExit(f"--share {v} {src}: both must be variants")

    pending, active, finished = list(runs), {}, {}

    def stop_all(signum=None, frame=None):
        # each run has its own process group (so --deadline can stop it whole): take them along
        for proc, _ in active.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        if signum is not None:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop_all)
    try:
        _schedule(a, runs, share, pending, active, finished, started, log_dir)
    finally:
        stop_all()
    _report(a, runs)
    return 0


def _schedule(a, runs, share, pending, active, finished, started, log_dir: Path) -> None:
    while pending or active:
        for name, (proc, log) in list(active.items()):
            if proc.poll() is not None:
                finished[name] = proc.returncode
                log.close()
                del active[name]
                print(f"[{time.time() - started:6.0f}s] {name}: exit {proc.returncode}", flush=True)
        if a.deadline and time.time() - started > a.deadline:
            for name, (proc, log) in active.items():
                os.killpg(proc.pid, signal.SIGTERM)
                print(f"[deadline] {name}: stopped (resumes on the next call)", flush=True)
            for proc, _ in active.values():
                proc.wait()
            break
        for name in list(pending):
            if len(active) >= a.parallel:
                break
            path, run_dir = runs[name]
            src = share.get(name)
            if src and not teacher_done(runs[src][1]):
                if src in finished:  # its run ended without a teacher: this one trains its own
                    share.pop(name)
                continue
            origin = runs[src][1] if src else a.teacher_from
            if origin is not None and origin.resolve() != run_dir.resolve() and not (run_dir / "teacher").exists():
                if not teacher_done(origin):
                    raise SystemExit(f"--teacher-from {origin}: no finished teacher stage there")
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copytree(origin / "teacher", run_dir / "teacher")
            log = open(log_dir / f"{path.stem}.log", "a")  # noqa: SIM115 (closed when its run ends)
            cmd = ["rqat", "run", str(path)] + (["--stages", a.stages] if a.stages else [])
            active[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log)
            pending.remove(name)
            print(f"[{time.time() - started:6.0f}s] {name}: started", flush=True)
        time.sleep(2)


def _report(a, runs) -> None:
    from reasoning_qat.compare import write_report

    done = [runs[n][1] for n in runs if (runs[n][1] / "eval" / "manifest.json").is_file()]
    lines = ["| variant | teacher parameters | teacher training (s) | teacher train loss | schedule | averaging |",
             "|---|---|---|---|---|---|"]
    for name, (_, run_dir) in runs.items():
        m = run_dir / "teacher" / "manifest.json"
        if m.is_file():
            t = json.loads(m.read_text())
            tm = t["metrics"]
            lines.append(f"| {name} | {tm.get('parameters', '-')} | {t['wall_time_s']:.0f} | {tm.get('train_loss', '-')} | "
                         f"{tm.get('schedule', '-')} | {tm.get('averaging', '-')} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "teachers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if done:
        _, md = write_report(done, out)
        print(md)
    missing = [n for n in runs if runs[n][1] not in done]
    if missing:
        print(f"not finished: {', '.join(missing)}")


if __name__ == "__main__":
    raise SystemExit(main())
