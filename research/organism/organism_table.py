"""The GPU organism's table (issue 16): every variant of several runs (seeds, QAT/RL ablations that
share one teacher), one row per method, one column per scheme, mean over seeds with a 95% CI, and
the paper's four findings read off it.

  python research/organism/organism_table.py runs/organism-gpu-* [--correctness C1.json C2.json ...] --out FILE.md

Rows are named as `rqat compare` names them (BF16, RTN, GPTQ (generic calib), GPTQ (domain calib),
KD-QAT, KD-QAT (RTN init), CE-QAT, KD-QAT + RL, RL from RTN). The CI pools the seeds per problem:
each problem's score is its mean over seeds and samples, and the interval is 1.96 standard errors
over problems (from each eval's samples.jsonl, or the --correctness file gpu runs bring back);
without per-problem data it falls back to combining the runs' own intervals. The findings compare two
rows by their per-problem differences (every row is scored on the same held-out problems), which
separates smaller differences than two intervals side by side.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reasoning_qat.compare import collect
from reasoning_qat.pipeline import recipe_from_run
from reasoning_qat.recipe import load_recipe

BASE_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "organism-gpu.yaml"


@functools.cache
def base_recipe():
    """The organism's recipe, which every table run overrides (read once, not per row)."""
    return load_recipe(BASE_RECIPE)

ROW_ORDER = ["BF16", "RTN", "GPTQ (generic calib)", "GPTQ (domain calib)", "KD-QAT", "KD-QAT (RTN init)", "CE-QAT",
             "KD-QAT + RL", "RL from RTN", "RL from GPTQ (domain calib)"]


def per_problem(run_dir: Path, variant: str, task: str, correctness: dict) -> dict | None:
    """{problem id: [0/1 per sample]} of one evaluated variant, or None when not kept."""
    key = f"{run_dir.name}/{variant}/{task}"
    rows = correctness.get(key)
    if rows is None:
        f = run_dir / "eval" / variant / task / "samples.jsonl"
        if not f.is_file():
            return None
        rows = [[r["id"], r["sample"], int(r["correct"])] for r in map(json.loads, f.open())]
    return scores_by_problem(rows)


def scores_by_problem(rows: list) -> dict:
    """{problem id: [0/1 per sample]} from correctness rows [[problem id, sample, correct], ...]."""
    out = defaultdict(list)
    for pid, _, ok in rows:
        out[str(pid)].append(ok)
    return out


def per_problem_means(scores: list[dict]) -> dict:
    """{problem: its mean over all runs' samples}, over the problems every run scored."""
    problems = set.intersection(*(set(s) for s in scores))
    return {p: sum(sum(s[p]) for s in scores) / sum(len(s[p]) for s in scores) for p in sorted(problems)}


def mean_ci(vals: list[float]) -> tuple[float, float]:
    """Mean and 95% CI half-width (1.96 standard errors)."""
    n = len(vals)
    mean = sum(vals) / n
    var = sum((x - mean) ** 2 for x in vals) / max(n - 1, 1)
    return mean, 1.96 * math.sqrt(var / n)


def qat_losses(run_dir: Path, variant: str) -> tuple[float | None, float | None, int | None]:
    """(loss at step 0, loss at the last logged step, that step) of a QAT variant."""
    f = run_dir / "qat" / variant / "log_history.json"
    if not f.is_file():
        return None, None, None
    hist = [h for h in json.loads(f.read_text()) if "loss" in h]
    if not hist:
        return None, None, None
    return hist[0]["loss"], hist[-1]["loss"], hist[-1].get("step")


def steps_tag(run_dir: Path, method: str, bits: int) -> str:
    """' [QAT 30 steps, RL 100 steps]' for a QAT(+RL) variant: runs of another training budget get rows of their own."""
    from reasoning_qat.run_layout import RunLayout

    layout = RunLayout(run_dir)
    parts = []
    if method in ("qat", "qat_rl"):
        parts.append(f"QAT {layout.stage_metrics('qat').get(f'w{bits}-qat', {}).get('steps', '?')} steps")
    if method in ("qat_rl", "ptq_rl"):
        rl = layout.stage_metrics("rl").get(f"w{bits}-{method}", {})
        parts.append(f"RL {rl.get('steps', '?')} steps")
        # the RL rows' other settings where a run changed them from the organism's recipe
        latent_lr = recipe_from_run(run_dir).rl.latent_lr
        if latent_lr != base_recipe().rl.latent_lr:
            parts.append(f"RL latent lr {latent_lr:g}")
        if rl.get("attn_implementation") == "eager":
            parts.append("eager attention")
    return f" [{', '.join(parts)}]" if parts else ""


def eval_dtype_tag(run_dir: Path) -> str:
    """' [eval float32]' for a run evaluated in another dtype than the organism recipe's: another measurement of
    the same model, so a row of its own ('' without a recorded recipe)."""
    if not (run_dir / "recipe.yaml").exists():
        return ""
    dtype = recipe_from_run(run_dir).eval.dtype
    return f" [eval {dtype}]" if dtype != base_recipe().eval.dtype else ""


def build(run_dirs: list[Path], correctness: dict, tag_steps: bool = False) -> dict:
    """{(label, column): {"mean", "ci", "seeds", "loss0", "lossN", "stepN", "unfinished"}} for every row;
    column = (bits, scheme): scheme "" for weight-only, e.g. "Hadamard, A4, KV4"; BF16 is (16, "").
    `tag_steps`: QAT and RL rows carry their step counts in the label (a budget sweep's rows)."""
    groups = defaultdict(list)
    for r in collect(run_dirs, unfinished=True):
        label = r["label"].removesuffix(f" ({r['scheme']})") if r["scheme"] else r["label"]
        run_dir = next(d for d in run_dirs if d.name == r["run"])
        if tag_steps:
            label += steps_tag(run_dir, r["method"], r["bits"])
        label += eval_dtype_tag(run_dir)
        column = (16, "") if r["method"] == "bf16" else (r["bits"], r["scheme"])
        groups[(label, column, r["task"])].append(r)
    table = {}
    for (label, column, task), rows in groups.items():
        dirs = {r["run"]: next(d for d in run_dirs if d.name == r["run"]) for r in rows}
        variant = "bf16" if column[0] == 16 else f"w{column[0]}-{rows[0]['method']}"
        # one entry per distinct run (runs sharing a teacher all score BF16: the same model, once per seed)
        scores = [per_problem(dirs[r["run"]], variant, task, correctness) for r in rows]
        problems = None
        if all(s is not None for s in scores):
            problems = per_problem_means(scores)
            mean, ci = mean_ci(list(problems.values()))
        else:
            mean = sum(r["pass@1"] for r in rows) / len(rows)
            ci = math.sqrt(sum(r["ci95"] ** 2 for r in rows)) / len(rows)
        ces = [r["ce"] for r in rows if r.get("ce") is not None]
        entry = {"mean": mean, "ci": ci, "seeds": len(rows), "task": task, "problems": problems,
                 "unfinished": any(r.get("unfinished_eval") for r in rows),
                 "ce": sum(ces) / len(ces) if len(ces) == len(rows) else None}
        if rows[0]["method"] == "qat":
            losses = [qat_losses(dirs[r["run"]], variant) for r in rows]
            if all(x[0] is not None for x in losses):
                entry.update(loss0=sum(x[0] for x in losses) / len(losses), lossN=sum(x[1] for x in losses) / len(losses),
                             stepN=losses[0][2])
        table[(label, column)] = entry
    return table


def row_entries(table: dict, label: str, columns: list[tuple[int, str]]) -> list[dict | None]:
    """The row's entry in each column (BF16, one model, stands in every column)."""
    if (label, (16, "")) in table:
        return [table[(label, (16, ""))]] * len(columns)
    return [table.get((label, c)) for c in columns]


def cell(e: dict | None) -> str:
    return f"{e['mean']:.3f} ± {e['ci']:.3f}" + (" †" if e.get("unfinished") else "") if e else "-"


def unfinished_note(table: dict) -> str:
    """The table's footnote for † cells (runs whose eval stage was cut off), '' when there are none; it says
    whether their intervals are pooled per problem (their per-problem data came back) or combine the runs' own."""
    unfinished = [e for e in table.values() if e.get("unfinished")]
    if not unfinished:
        return ""
    how = ("the per-problem data came back, so the interval is pooled per problem as in the other rows"
           if all(e["problems"] is not None for e in unfinished) else
           "where no per-problem data came back, the interval combines the runs' own")
    return f"\n† from a run whose eval stage did not finish: the variants it did finish (the others are '-'); {how}.\n"


def compare_rows(a: dict | None, b: dict | None) -> str:
    """'a vs b: d (±c) → verdict'; separated when |d| exceeds c. Both rows scored on the same problems
    (per-problem data of both): c is the 95% CI of the per-problem differences (paired: the problem-to-
    problem spread both rows share cancels); otherwise the two rows' intervals combined."""
    if not a or not b:
        return "not measured"
    pa, pb = a.get("problems"), b.get("problems")
    common = sorted(set(pa) & set(pb)) if pa and pb else []
    if common:
        d, c = mean_ci([pa[p] - pb[p] for p in common])
        kind = f"paired over {len(common)} problems"
    else:
        d, c = a["mean"] - b["mean"], math.sqrt(a["ci"] ** 2 + b["ci"] ** 2)
        kind = "combined intervals"
    verdict = "holds" if d > c else ("reversed" if d < -c else "not separated")
    return f"{a['mean']:.3f} vs {b['mean']:.3f}: {d:+.3f} (±{c:.3f}, {kind}) → {verdict}"


def scheme(column: tuple[int, str], group_size: int) -> str:
    """W3G128; W4A4KV4G128 (Hadamard) for a column whose scheme quantizes activations / KV cache."""
    bits, extra = column
    parts = [p.strip() for p in extra.split(",") if p.strip()]
    name = f"W{bits}" + "".join(p for p in parts if p[0] in "AK")
    name += f"G{group_size}" if group_size > 0 else " per-channel"
    notes = [p for p in parts if p[0] not in "AK"]
    return name + (f" ({', '.join(notes)})" if notes else "")


def findings(table: dict, columns: list[tuple[int, str]], group_size: int = 128,
             pairs: list[tuple[str, str]] = ()) -> list[str]:
    """The paper's findings per column, then each of `pairs` (row A vs row B), paired per problem."""
    out = []
    for column in columns:
        def t(label, column=column):
            return table.get((label, column), table.get((label, (16, ""))))

        out.append(f"\n**{scheme(column, group_size)}**\n")
        out += [f"- {a} vs {b}: {compare_rows(t(a), t(b))}" for a, b in pairs if t(a) or t(b)]
        out.append(f"- KD beats CE (KD-QAT vs CE-QAT): {compare_rows(t('KD-QAT'), t('CE-QAT'))}")
        line = f"- PTQ init beats RTN init (KD-QAT vs KD-QAT (RTN init)): {compare_rows(t('KD-QAT'), t('KD-QAT (RTN init)'))}"
        a, b = t("KD-QAT"), t("KD-QAT (RTN init)")
        if a and b and "loss0" in a and "loss0" in b:
            line += (f"; KD loss at step 0 {a['loss0']:.4g} vs {b['loss0']:.4g}, at step {a['stepN']} "
                     f"{a['lossN']:.4g} vs {b['lossN']:.4g}")
        out.append(line)
        out.append(f"- domain calibration beats generic (GPTQ): {compare_rows(t('GPTQ (domain calib)'), t('GPTQ (generic calib)'))}")
        out.append(f"- domain GPTQ loses accuracy (BF16 vs GPTQ (domain calib)): {compare_rows(table.get(('BF16', (16, ''))), t('GPTQ (domain calib)'))}")
        out.append(f"- RL adds accuracy after the KD cold start (KD-QAT + RL vs KD-QAT): {compare_rows(t('KD-QAT + RL'), t('KD-QAT'))}")
        out.append(f"- RL from the collapsed PTQ start (RL from RTN vs RTN): {compare_rows(t('RL from RTN'), t('RTN'))}")
    # a rotated column beside the same scheme without the rotation: what the rotation alone does to RTN
    for column in columns:
        parts = [p.strip() for p in column[1].split(",")]
        plain = (column[0], ", ".join(p for p in parts if p != "Hadamard"))
        if "Hadamard" in parts and plain in columns:
            out.append(f"\n**{scheme(column, group_size)} vs {scheme(plain, group_size)}**\n")
            out.append(f"- the rotation helps RTN (RTN rotated vs not): "
                       f"{compare_rows(table.get(('RTN', column)), table.get(('RTN', plain)))}")
    return out


def run_arguments(doc: str) -> argparse.ArgumentParser:
    """The command line this script and dynamics_table.py share: run directories, --correctness, --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--correctness", type=Path, nargs="*", default=[],
                    help="per-problem correctness files brought back from GPU calls (bg.sh), merged")
    ap.add_argument("--out", type=Path)
    return ap


def load_correctness(files: list[Path]) -> dict:
    """{run/variant/task: [[problem id, sample, correct], ...]} merged from bg.sh's correctness files."""
    return {k: v for f in files for k, v in json.loads(f.read_text()).items()}


def main() -> int:
    ap = run_arguments(__doc__)
    ap.add_argument("--tag-steps", action="store_true", help="QAT/RL rows labelled with their step counts")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("ROW_A", "ROW_B"),
                    help="also compare these two rows (labels as the table prints them), paired per problem")
    a = ap.parse_args()
    correctness = load_correctness(a.correctness)
    table = build(a.runs, correctness, a.tag_steps)  # a run with nothing evaluated yet gives no rows
    if not table:
        raise SystemExit("organism_table: none of the runs has an evaluated variant yet (rqat run ... --stages eval)")
    columns = sorted({c for _, c in table if c[0] != 16}, key=lambda c: (c[1] != "", -c[0], c[1]))
    from reasoning_qat.pipeline import recipe_from_run

    group_size = recipe_from_run(a.runs[0]).quant.group_size  # the runs of one table share their group size
    labels = [lb for lb in ROW_ORDER if any((lb, c) in table for c in [(16, ""), *columns])]
    labels += sorted({lb for lb, _ in table} - set(labels))
    lines = ["| method | " + " | ".join(scheme(c, group_size) for c in columns) + " | runs (seeds) per cell |",
             "|---|" + "---|" * (len(columns) + 1)]
    for lb in labels:
        entries = row_entries(table, lb, columns)
        lines.append(f"| {lb} | " + " | ".join(map(cell, entries)) + f" | {max(e['seeds'] for e in entries if e)} |")
    md = "\n".join(lines) + "\n"
    # held-out cross-entropy (nats per response token, mean over the runs): damage pass@1 does not show yet
    if any(e.get("ce") is not None for e in table.values()):
        md += "\nHeld-out CE of the reference solutions (mean over the runs):\n\n| method | " + \
            " | ".join(scheme(c, group_size) for c in columns) + " |\n|---|" + "---|" * len(columns) + "\n"
        for lb in labels:
            md += f"| {lb} | " + " | ".join(f"{e['ce']:.3g}" if e and e.get("ce") is not None else "-"
                                            for e in row_entries(table, lb, columns)) + " |\n"
    md += unfinished_note(table)
    md += "\n".join(findings(table, columns, group_size, [tuple(x) for x in a.pair])) + "\n"
    print(md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
