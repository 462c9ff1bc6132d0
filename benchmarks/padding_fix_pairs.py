"""The W4A4KV4 padding fix on `table-t350d`'s teacher, paired per problem (issue 31; README of
benchmarks/results/organism-gpu, "W4A4KV4 re-measured after the padding fix"):

- each W4A4KV4 row after the fix - the same row before it (runs in table-t350d/runs and
  table-t350d/before-padding-fix/runs, the same seeds and problems);
- CPU - H200 on the first 300 problems, seed 0, Hadamard + RTN: the CPU's float32 eval (cpu-padding-fix/,
  before and after the fix) against the H200's bfloat16 (before, after) and float32 (after) evals.

    python benchmarks/padding_fix_pairs.py
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import organism_table as ot

TABLE = Path(__file__).resolve().parent / "results" / "organism-gpu" / "table-t350d"
COLUMN = (4, "Hadamard, A4, KV4")
ROWS = ["RTN", "GPTQ (generic calib)", "GPTQ (domain calib)", "KD-QAT [QAT 300 steps]",
        "KD-QAT (RTN init) [QAT 300 steps]", "CE-QAT [QAT 300 steps]"]


def correctness(folder: Path) -> dict:
    with gzip.open(folder / "correctness.json.gz", "rt") as f:
        return json.load(f)


def table(folder: Path) -> dict:
    return ot.build(sorted(folder.glob("runs/organism-gpu-t350d-a*")), correctness(folder), tag_steps=True)


def per_problem(rows: list) -> dict:
    """{problem id: mean correctness over its samples} from [[id, sample, correct], ...]."""
    by_id = defaultdict(list)
    for pid, _, correct in rows:
        by_id[pid].append(correct)
    return {pid: sum(v) / len(v) for pid, v in by_id.items()}


def cpu_run(name: str) -> dict:
    rows = json.loads((TABLE / "cpu-padding-fix" / f"{name}.correctness.json").read_text())
    return per_problem(next(iter(rows.values())) if isinstance(rows, dict) else rows)


def main() -> None:
    after, before = table(TABLE), table(TABLE / "before-padding-fix")
    print("W4A4KV4 (Hadamard), after the fix - before, paired over the problems, both seeds pooled:")
    for label in ROWS:
        print(f"- {label}: {ot.compare_rows(after.get((label, COLUMN)), before.get((label, COLUMN)))}")

    gpu, gpu_before = correctness(TABLE), correctness(TABLE / "before-padding-fix")
    runs = {
        "CPU float32, fixed": cpu_run("fixed"),
        "CPU float32, before the fix": cpu_run("unfixed"),
        "H200 bfloat16, fixed": per_problem(gpu["organism-gpu-t350d-aptq0/w4-rtn/demo_arith"]),
        "H200 float32, fixed": per_problem(gpu["organism-gpu-t350d-af32rtn0/w4-rtn/demo_arith"]),
        "H200 bfloat16, before the fix": per_problem(gpu_before["organism-gpu-t350d-aptq0-rtn/w4-rtn/demo_arith"]),
    }
    ids = sorted(runs["CPU float32, fixed"])  # the CPU runs evaluated the first 300 problems
    as_row = {name: {"mean": sum(s[i] for i in ids) / len(ids), "problems": {i: s[i] for i in ids}}
              for name, s in runs.items()}
    print(f"\nHadamard + RTN, seed 0, the first {len(ids)} problems:")
    for a, b in [("CPU float32, fixed", "H200 bfloat16, fixed"), ("CPU float32, fixed", "H200 float32, fixed"),
                 ("CPU float32, before the fix", "H200 bfloat16, before the fix"),
                 ("H200 bfloat16, fixed", "H200 bfloat16, before the fix")]:
        print(f"- {a} - {b}: {ot.compare_rows(as_row[a], as_row[b])}")


if __name__ == "__main__":
    main()
