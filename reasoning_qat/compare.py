"""compare: one table (and a plot) of BF16 vs RTN vs GPTQ vs QAT vs QAT+RL per bit width.

The last stage of a run (its own manifest, resumable and stale like the others), and `rqat compare`
across runs."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .quant.formats import directory_size
from .run_layout import RunLayout, Variant

METHOD_ORDER = ["rtn", "gptq_generic", "gptq", "ptq_rl", "qat", "qat_rl"]
METHOD_LABEL = {"bf16": "BF16", "rtn": "RTN", "gptq": "GPTQ (domain calib)", "gptq_generic": "GPTQ (generic calib)",
                "qat": "KD-QAT", "qat_rl": "KD-QAT + RL", "ptq_rl": "RL from PTQ"}


def collect(run_dirs: list[str | Path], unfinished: bool = False) -> list[dict]:
    """One row per (run, variant, task) of the runs' finished eval stages. `unfinished`: a run whose
    eval stage has not finished contributes the variants it has finished (their metrics.json in the
    stage's partial directory; such rows carry "unfinished_eval": True), instead of an error."""
    rows = []
    for layout in map(RunLayout, run_dirs):
        ev = layout.manifest("eval")
        partial = ev is None and unfinished
        if ev is None and not partial:
            raise UserError(f"{layout.root}: no finished eval stage; run `rqat run RECIPE --stages eval` first")
        evaluated = _finished_variants(layout) if partial else ev.get("metrics", {})
        sizes, qat, rl, ptq = (layout.stage_metrics(s) for s in ("export", "qat", "rl", "ptq"))
        calib = layout.stage_metrics("calibrate")
        calib_domain = calib.get("domain", "reasoning")
        teacher_model = layout.teacher_model_dir()
        bf16_bytes = directory_size(teacher_model) if teacher_model.is_dir() else None
        for name, tasks in evaluated.items():
            v = Variant.parse(name)
            exported = sizes.get(name, {})
            # the packed checkpoint users serve, where there is one
            size = bf16_bytes if v.method == "bf16" else next(
                (exported[k] for k in ("compressed-tensors_bytes", "gptq_bytes", "dequantized_bytes") if k in exported), None)
            scheme = _scheme(ptq, v)
            for task, tm in tasks.items():
                rows.append({"run": layout.name, "task": task, "bits": v.bits, "method": v.method, "pass@1": tm["pass@1"],
                             "ci95": tm["ci95"], "size_bytes": size, "ce": tm.get("ce"),
                             "label": _label(v.method, qat.get(str(Variant(v.bits, "qat")), {}), calib_domain,
                                             rl.get(name, {}), calib) + scheme,
                             "scheme": scheme.strip(" ()"), **({"unfinished_eval": True} if partial else {})})
    for r in rows:
        base = [b for b in rows if b["run"] == r["run"] and b["task"] == r["task"] and b["method"] == "bf16"]
        r["recovery"] = r["pass@1"] / base[0]["pass@1"] if base and base[0]["pass@1"] > 0 else None
        # relative increase of the held-out cross-entropy over BF16's (demo tasks)
        r["ce_increase"] = r["ce"] / base[0]["ce"] - 1 if base and r["ce"] is not None and base[0].get("ce") else None
    key = {m: i for i, m in enumerate(["bf16", *METHOD_ORDER])}
    return sorted(rows, key=lambda r: (r["run"], r["task"], -r["bits"], key.get(r["method"], 99)))


def _finished_variants(layout: RunLayout) -> dict:
    """{variant: {task: metrics (+ its held-out CE)}} of the evaluations an unfinished eval stage completed."""
    out = {}
    partial = RunLayout(layout.root, {"eval": layout.partial("eval")})
    for v, tasks in partial.evaluated().items():
        for task, f in tasks.items():
            metrics, ce = json.loads(f.read_text()), partial.eval_ce(v, task)
            out.setdefault(str(v), {})[task] = {
                "pass@1": metrics["pass@1"], "ci95": metrics["ci95"], **(json.loads(ce.read_text()) if ce.is_file() else {})}
    return out


def _scheme(ptq_metrics: dict, v) -> str:
    """' (Hadamard, A4 KV4)' for variants of a rotated / activation- or KV-quantized run, else ''."""
    if v.method == "bf16":
        return ""
    ptq_row = next((x for k, x in ptq_metrics.items() if k.startswith(f"w{v.bits}-")), {})
    parts = (["Hadamard"] if ptq_row.get("rotation") == "hadamard" else []) + \
        ([f"A{ptq_row['activations']}"] if ptq_row.get("activations") else []) + ([f"KV{ptq_row['kv_cache']}"] if ptq_row.get("kv_cache") else [])
    return f" ({', '.join(parts)})" if parts else ""


def _label(method: str, qat_metrics: dict, calib_domain: str = "reasoning", rl_metrics: dict | None = None,
           calib_metrics: dict | None = None) -> str:
    """Names variants by how they were made: the main GPTQ's calibration domain (and whose responses it
    was cut from), QAT's loss, init and data, the PTQ checkpoint RL started from."""
    label = METHOD_LABEL.get(method, method)
    if method == "ptq_rl" and (rl_metrics or {}).get("init"):
        return f"RL from {_label(Variant.parse(rl_metrics['init']).method, {}, calib_domain, None, calib_metrics)}"
    if method == "gptq" and calib_domain == "generic":
        label = METHOD_LABEL["gptq_generic"]
    elif method == "gptq" and (origin := _data_origin(calib_metrics or {})):
        label = label.removesuffix(")") + f", {', '.join(origin)})"
    if method in ("qat", "qat_rl") and qat_metrics:
        if qat_metrics.get("loss") == "ce":
            label = label.replace("KD-QAT", "CE-QAT")
        init = qat_metrics.get("init")
        origin = ([f"{init.upper()} init"] if init and init != "ptq" else []) + _data_origin(qat_metrics)
        if origin:
            label = label.replace(" + RL", "") + f" ({', '.join(origin)})" + (" + RL" if method == "qat_rl" else "")
    return label


def _data_origin(qat_metrics: dict) -> list[str]:
    """What the QAT student learned from, where not the default (online teacher on the dataset's responses)."""
    out = [f"cached top-{qat_metrics['cache_top_k']}"] if qat_metrics.get("teacher") == "cached" else []
    if qat_metrics.get("responses") == "teacher":
        out.append("teacher's responses")
    if qat_metrics.get("trace"):
        out.append(f"{qat_metrics['trace']} traces")
    return out


def to_markdown(rows: list[dict]) -> str:
    """The rows of `collect` as one markdown table (held-out CE columns when any row has one)."""
    with_ce = any(r.get("ce") is not None for r in rows)
    lines = ["| run | task | bits | method | pass@1 | ±95% CI | recovery (% of BF16) | size on disk (MB) |"
             + (" held-out CE | CE increase (%) |" if with_ce else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if with_ce else "")]
    for r in rows:
        rec = f"{100 * r['recovery']:.1f}" if r["recovery"] is not None else "-"
        size = f"{r['size_bytes'] / 2**20:.2f}" if r["size_bytes"] else "-"
        bits = "16" if r["method"] == "bf16" else str(r["bits"])
        line = f"| {r['run']} | {r['task']} | {bits} | {r['label']} | {r['pass@1']:.3f} | {r['ci95']:.3f} | {rec} | {size} |"
        if with_ce:
            ce, inc = r.get("ce"), r.get("ce_increase")
            line += f" {ce:.4f} |" if ce is not None else " - |"
            line += f" {100 * inc:+.2f} |" if inc is not None else " - |"
        lines.append(line)
    return "\n".join(lines)


def to_task_table(rows: list[dict]) -> str:
    """One line per (run, bits, method), one column per task plus the average over the tasks the
    variant has (the suite view: where the paper's table puts AIME, MATH-500, GSM8K, GPQA, LCB)."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    variants = list(dict.fromkeys((r["run"], r["bits"], r["method"], r["label"]) for r in rows))
    cell = {(r["run"], r["bits"], r["method"], r["task"]): r["pass@1"] for r in rows}
    lines = ["| run | bits | method | " + " | ".join(tasks) + " | average |", "|---|---|---|" + "---|" * (len(tasks) + 1)]
    for run, bits, method, label in variants:
        scores = [cell.get((run, bits, method, t)) for t in tasks]
        have = [x for x in scores if x is not None]
        avg = f"{sum(have) / len(have):.3f}" + ("" if len(have) == len(tasks) else f" ({len(have)}/{len(tasks)})") \
            if have else "-"
        shown = " | ".join(f"{x:.3f}" if x is not None else "-" for x in scores)
        lines.append(f"| {run} | {'16' if method == 'bf16' else bits} | {label} | {shown} | {avg} |")
    return "\n".join(lines)


def figure(rows: list[dict]):
    """The plot of `collect`'s rows as a matplotlib Figure: pass@1 against weight bits per method with its 95%
    CI as error bars, one panel per (run, task), BF16 as a dashed line with its CI as a band. Methods sit at
    small offsets around each bit width so that series at 3 and 4 bits do not hide each other, and the y-range
    spans the intervals shown (not 0-1), so the differences the table reports are visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({(r["run"], r["task"]) for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    present = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    width = 0.5 / max(len(present), 1)
    for ax, (run, task) in zip(axes[0], tasks):
        sub = [r for r in rows if r["run"] == run and r["task"] == task]
        lows, highs = [], []
        for i, method in enumerate(present):
            pts = sorted((r["bits"], r["pass@1"], r["ci95"], r["label"]) for r in sub if r["method"] == method)
            if pts:
                x = [b + (i - (len(present) - 1) / 2) * width for b, *_ in pts]
                ax.errorbar(x, [p for _, p, _, _ in pts], yerr=[c for _, _, c, _ in pts], marker="o", capsize=3,
                            label=pts[0][3])
                lows += [p - c for _, p, c, _ in pts]
                highs += [p + c for _, p, c, _ in pts]
        for r in sub:
            if r["method"] == "bf16":
                ax.axhline(r["pass@1"], color="black", linestyle="--", label="BF16")
                ax.axhspan(r["pass@1"] - r["ci95"], r["pass@1"] + r["ci95"], color="black", alpha=0.08)
                lows.append(r["pass@1"] - r["ci95"])
                highs.append(r["pass@1"] + r["ci95"])
        ax.set_xlabel("weight bits")
        ax.set_ylabel("pass@1 (95% CI)")
        ax.set_title(f"{run}: {task}")
        ax.set_xticks(sorted({r["bits"] for r in sub if r["method"] != "bf16"}))
        if lows:
            pad = max(0.02, 0.08 * (max(highs) - min(lows)))
            ax.set_ylim(max(0.0, min(lows) - pad), min(1.02, max(highs) + pad))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path: str | Path) -> None:
    """`figure(rows)` saved as a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dirs: list[str | Path], out_dir: str | Path, make_plot: bool = True) -> tuple[list[dict], str]:
    """compare.md, compare.json (and compare.png) of `run_dirs` in `out_dir`; returns (rows, markdown). Raises
    UserError for a run without a finished eval stage."""
    rows = collect(run_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows)
    if len({r["task"] for r in rows}) > 1:  # a suite: the per-task view first, the detailed table below
        md = "## pass@1 per task\n\n" + to_task_table(rows) + "\n\n## Detail\n\n" + md
    (out_dir / "compare.md").write_text(md + "\n")
    (out_dir / "compare.json").write_text(json.dumps(rows, indent=1))
    if make_plot:
        plot(rows, out_dir / "compare.png")
    return rows, md


def run(ctx) -> dict:
    """The compare stage: this run's table and plot."""
    from .stages.common import tensorboard_writer

    rows, _ = write_report([ctx.run_dir], ctx.out, ctx.recipe.compare.plot)
    if (writer := tensorboard_writer(ctx)) is not None:
        writer.add_figure("compare", figure(rows))  # the plot beside the training curves
        writer.close()
    return {"rows": len(rows)}
