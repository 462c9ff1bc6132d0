"""What a symmetric weight grid costs (issue 28, item 4): symmetric minus asymmetric pass@1 on the GPU
organism, paired over the same held-out problems, per bit width and method, per seed and over both.

Input: the per-problem correctness file a GPU call brings back (`research/organism/bg.sh`: keys
`organism-gpu-{sym,asym}-s{seed}/w{bits}-{method}/demo_arith`, values [problem, sample, correct]).
The interval is 1.96 standard errors of the per-problem differences (each problem's score is its mean
over samples, and over seeds for the pooled row).

  python research/organism/organism_symmetric.py research/organism/symmetric/correctness.json.gz
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def per_problem(rows) -> dict[int, float]:
    scores = defaultdict(list)
    for problem, _sample, correct in rows:
        scores[problem].append(correct)
    return {p: sum(v) / len(v) for p, v in scores.items()}


def mean_ci(diffs: list[float]) -> tuple[float, float]:
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def main(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    seeds = sorted({k.split("/")[0].rsplit("-s", 1)[1] for k in data})
    lines = ["| bits | method | seed | asymmetric | symmetric | symmetric - asymmetric (95% CI, paired) |",
             "|---|---|---|---|---|---|"]
    for bits in (3, 2):
        for method, label in (("gptq", "GPTQ (domain calib)"), ("qat", "KD-QAT from GPTQ")):
            pooled = {"asym": defaultdict(list), "sym": defaultdict(list)}
            for seed in [*seeds, "both"]:
                if seed == "both":
                    score = {g: {p: sum(v) / len(v) for p, v in pooled[g].items()} for g in pooled}
                else:
                    score = {g: per_problem(data[f"organism-gpu-{g}-s{seed}/w{bits}-{method}/demo_arith"])
                             for g in ("asym", "sym")}
                    for g in score:
                        for p, v in score[g].items():
                            pooled[g][p].append(v)
                problems = sorted(score["sym"])
                assert problems == sorted(score["asym"]), "the two schemes were scored on different problems"
                mean, ci = mean_ci([score["sym"][p] - score["asym"][p] for p in problems])
                acc = {g: sum(score[g].values()) / len(problems) for g in score}
                lines.append(f"| W{bits}G128 | {label} | {seed} | {acc['asym']:.3f} | {acc['sym']:.3f} | "
                             f"{mean:+.3f} ± {ci:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    table = main(sys.argv[1])
    print(table)
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(table + "\n")
