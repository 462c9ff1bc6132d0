"""Issue 31 item 4: does the teacher's LR schedule and weight averaging change how much PTQ hurts it?

One row per teacher recipe (cosine, WSD, WSD + LAWA), pooled over its teacher seeds (each run trains its own
teacher: `organism_table_runs.sh` variants dcos/dwsd/dlawa). For each PTQ method of the runs (RTN, GPTQ):
the relative increase of held-out CE over the same run's BF16 teacher (mean over seeds, and each seed's) and
the pass@1 drop, paired per problem against that teacher and pooled over seeds (95% CI over problems).

  python research/organism/dynamics_table.py runs/organism-gpu-dyn350-* [--correctness C.json] --out FILE.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from organism_table import load_correctness, mean_ci, per_problem, run_arguments

from reasoning_qat.pipeline import recipe_from_run

TASK = "demo_arith"
METHODS = [("rtn", "RTN"), ("gptq", "GPTQ (domain calib)"), ("gptq_generic", "GPTQ (generic calib)")]


def teacher_kind(run_dir: Path) -> tuple[str, int, int, dict]:
    """(schedule label, training steps, teacher seed, teacher metrics) of one run."""
    m = json.loads((run_dir / "teacher" / "manifest.json").read_text())["metrics"]
    label = {"cosine": "cosine", "wsd": "WSD"}.get(m["schedule"], m["schedule"])
    if m.get("averaging", "none") != "none":
        label += f" + {m['averaging'].upper()}"
    demo = recipe_from_run(run_dir).model.demo
    return label, demo.train_steps, demo.seed, m


def read_ce(run_dir: Path, variant: str) -> float | None:
    f = run_dir / "eval" / variant / TASK / "ce.json"
    return json.loads(f.read_text())["ce"] if f.is_file() else None


def scores(runs: list, variant: str, correctness: dict) -> dict | None:
    """{"seed:problem": mean over samples} of one variant over a teacher recipe's runs (each teacher seed draws
    its own problems, so a problem is named with its seed), or None when a run has no per-problem data."""
    out = {}
    for seed, d, _ in runs:
        s = per_problem(d, variant, TASK, correctness)
        if s is None:
            return None
        out.update({f"{seed}:{p}": sum(v) / len(v) for p, v in s.items()})
    return out


def signed(values: list[float]) -> str:
    """Mean with its 95% CI, signed."""
    m, ci = mean_ci(values)
    return f"{m:+.3f} ± {ci:.3f}"


def paired(a: dict, b: dict) -> str:
    """Mean of a - b over the problems both hold, with its 95% CI."""
    return signed([a[p] - b[p] for p in a if p in b])


def build(run_dirs: list[Path], correctness: dict, bits: int) -> list[str]:
    kinds = {d: teacher_kind(d) for d in sorted(run_dirs) if (d / "eval" / "bf16" / TASK / "metrics.json").is_file()}
    # teachers of one schedule trained for several lengths (to meet another's validation loss) are rows of their own
    lengths = {steps for _, steps, _, _ in kinds.values()}
    groups, rank = defaultdict(list), {}
    for d, (schedule, steps, seed, m) in kinds.items():
        label = f"{schedule}, {steps} steps" if len(lengths) > 1 else schedule
        groups[label].append((seed, d, m))
        rank[label] = (schedule, steps)
    group = recipe_from_run(run_dirs[0]).quant.group_size  # the runs of one table share their group size
    methods = [(k, name) for k, name in METHODS
               if any((d / "eval" / f"w{bits}-{k}" / TASK).is_dir() for g in groups.values() for _, d, _ in g)]
    head = ["teacher", "seeds", "train loss", "BF16 pass@1", "held-out CE"]
    for _, name in methods:
        head += [f"W{bits}G{group} {name}: CE increase", "pass@1 drop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ["cosine", "WSD", "WSD + LAWA"]
    labels = sorted(groups, key=lambda s: (order.index(rank[s][0]) if rank[s][0] in order else len(order), rank[s]))
    drops = {}  # (label, method): {"seed:problem": BF16 - quantized}
    for label in labels:
        runs = sorted(groups[label])
        bf16 = scores(runs, "bf16", correctness)
        ce = [read_ce(d, "bf16") for _, d, _ in runs]
        acc, acc_ci = mean_ci(list(bf16.values())) if bf16 else (float("nan"), float("nan"))
        row = [label, ",".join(str(s) for s, _, _ in runs), " / ".join(f"{m['train_loss']:.4f}" for *_, m in runs),
               f"{acc:.3f} ± {acc_ci:.3f}", " / ".join(f"{c:.2e}" for c in ce if c is not None)]
        for k, _ in methods:
            q = [read_ce(d, f"w{bits}-{k}") for _, d, _ in runs]
            incs = [qc / bc - 1 for qc, bc in zip(q, ce) if qc is not None and bc]
            row.append((f"{sum(incs) / len(incs):+.1%} (" + " / ".join(f"{i:+.1%}" for i in incs) + ")") if incs else "-")
            quant = scores(runs, f"w{bits}-{k}", correctness)
            if quant is None or bf16 is None:
                row.append("-")
                continue
            drops[label, k] = {p: bf16[p] - quant[p] for p in bf16 if p in quant}
            row.append(signed(list(drops[label, k].values())))
        lines.append("| " + " | ".join(row) + " |")
    # the same teacher seed draws the same problems under every schedule, so drops pair across teachers
    pairs = [(b, a) for i, a in enumerate(labels) for b in labels[i + 1:]
             if all((a, k) in drops and (b, k) in drops for k, _ in methods)]
    if pairs:
        note = "pass@1 drop of one teacher minus another's (paired over the same problems; negative: the first is hurt less):"
        lines += ["", note, "", "| teachers | " + " | ".join(f"W{bits}G{group} {name}" for _, name in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        lines += [f"| {b} - {a} | " + " | ".join(paired(drops[b, k], drops[a, k]) for k, _ in methods) + " |"
                  for b, a in pairs]
    return lines


def main() -> int:
    ap = run_arguments(__doc__)
    ap.add_argument("--bits", type=int, default=3)
    a = ap.parse_args()
    correctness = load_correctness(a.correctness)
    lines = build(a.runs, correctness, a.bits)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
