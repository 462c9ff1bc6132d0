"""The W4A4KV4 padding fix on `table-t350d`'s teacher, paired per problem (issue 31; README of
research/organism, "W4A4KV4 re-measured after the padding fix"):

- each W4A4KV4 row after the fix - the same row before it (runs in table-t350d/runs and
  table-t350d/before-padding-fix/runs, the same seeds and problems);
- CPU - H200 on the first 300 problems, seed 0, Hadamard + RTN: the CPU's float32 eval (cpu-padding-fix/,
  before and after the fix) against the H200's bfloat16 (before, after) and float32 (after) evals.

    python research/organism/padding_fix_pairs.py
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import organism_table as ot

TABLE = Path(__file__).resolve().parent / "results" / "organism-gpu" / "table-t350d"
BEFORE_FIX = TABLE / "before-padding-fix"
COLUMN = (4, "Hadamard, A4, KV4")
ROWS = ["RTN", "GPTQ (generic calib)", "GPTQ (domain calib)", "KD-QAT [QAT 300 steps]",
        "KD-QAT (RTN init) [QAT 300 steps]", "CE-QAT [QAT 300 steps]"]


@functools.cache
def correctness(folder: Path) -> dict:
    with gzip.open(folder / "correctness.json.gz", "rt") as f:
        return json.load(f)


def table(folder: Path) -> dict:
    return ot.build(sorted(folder.glob("runs/organism-gpu-t350d-a*")), correctness(folder), tag_steps=True)


def cpu_run(name: str) -> dict:
    """{problem id: [0/1 per sample]} of a CPU run (its correctness file holds the rows alone)."""
    return ot.scores_by_problem(json.loads((TABLE / "cpu-padding-fix" / f"{name}.correctness.json").read_text()))


def gpu_run(folder: Path, run: str, variant: str) -> dict:
    return ot.per_problem(folder / "runs" / run, variant, "demo_arith", correctness(folder))


def main() -> None:
    after, before = table(TABLE), table(BEFORE_FIX)
    print("W4A4KV4 (Hadamard), after the fix - before, paired over the problems, both seeds pooled:")
    for label in ROWS:
        print(f"- {label}: {ot.compare_rows(after.get((label, COLUMN)), before.get((label, COLUMN)))}")

    runs = {
        "CPU float32, fixed": cpu_run("fixed"),
        "CPU float32, before the fix": cpu_run("unfixed"),
        "H200 bfloat16, fixed": gpu_run(TABLE, "organism-gpu-t350d-aptq0", "w4-rtn"),
        "H200 float32, fixed": gpu_run(TABLE, "organism-gpu-t350d-af32rtn0", "w4-rtn"),
        "H200 bfloat16, before the fix": gpu_run(BEFORE_FIX, "organism-gpu-t350d-aptq0-rtn", "w4-rtn"),
    }
    ids = sorted(runs["CPU float32, fixed"])  # the CPU runs evaluated the first 300 problems
    as_row = {}
    for name, scores in runs.items():
        problems = ot.per_problem_means([{i: scores[i] for i in ids}])
        as_row[name] = {"mean": sum(problems.values()) / len(problems), "problems": problems}
    print(f"\nHadamard + RTN, seed 0, the first {len(ids)} problems:")
    for a, b in [("CPU float32, fixed", "H200 bfloat16, fixed"), ("CPU float32, fixed", "H200 float32, fixed"),
                 ("CPU float32, before the fix", "H200 bfloat16, before the fix"),
                 ("H200 bfloat16, fixed", "H200 bfloat16, before the fix")]:
        print(f"- {a} - {b}: {ot.compare_rows(as_row[a], as_row[b])}")


if __name__ == "__main__":
    main()
