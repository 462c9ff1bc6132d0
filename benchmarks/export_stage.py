"""The real export stage (`rqat run ... --stages export`) against the ptq stage that made its input, in one
run, on a random-init Qwen3 architecture saved as a local model directory (character tokenizer).

Timed, each through `rqat run` in this process: the ptq stage (RTN, w4 g128, checkpoint written), the export
stage as it is (`formats.export_checkpoint`: both formats straight from the checkpoint's codes), and the
export stage with the previous path patched in (the checkpoint loaded as a fake-quant model and swapped out,
`export_formats(load_quantized_checkpoint(...))`). The teacher and calibrate stages run first, untimed.

    python benchmarks/export_stage.py [--arch qwen3-0.6b] [--layers 28]

Writes benchmarks/results/export_stage.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ARCHS, save, scratch_dir
from qat_stage import make_model_and_data

from reasoning_qat.cli import main as rqat
from reasoning_qat.quant import formats
from reasoning_qat.stages import export as export_stage


def recipe_text(model_dir: Path, data: Path) -> str:
    return f"""name: bench-export-stage
model: {{id: {model_dir}, dtype: bfloat16}}
quant: {{bits: [4], group_size: 128, symmetric: false}}
calibration: {{domain: reasoning, num_samples: 4, seq_len: 256}}
ptq: {{method: rtn, baselines: []}}
qat:
  enabled: false
  data: {{source: {data}, max_length: 512, overlength: truncate, prompt_field: prompt, response_field: response}}
rl: {{enabled: false}}
export: {{formats: [dequantized, compressed-tensors]}}
eval: {{tasks: [math500], backend: transformers}}
"""


def timed_stage(recipe: Path, root: Path, stage: str) -> float:
    t = time.perf_counter()
    if rqat(["run", str(recipe), "--run-root", str(root / "runs"), "--stages", stage, "--force"]) != 0:
        raise SystemExit(f"rqat run --stages {stage} failed")
    return time.perf_counter() - t


def previous_path(src, outs, tokenizer=None, dtype=None, act_order=False, trust_remote_code=False):
    """The export stage before 2026-12-03: a fake-quant load, then every format from it."""
    return formats.export_formats(formats.load_quantized_checkpoint(src, trust_remote_code=trust_remote_code),
                                  outs, tokenizer, dtype, act_order)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen3-0.6b", choices=list(ARCHS))
    p.add_argument("--layers", type=int, default=28)
    a = p.parse_args()
    ARCHS[a.arch] = {**ARCHS[a.arch], "num_hidden_layers": a.layers}
    root = scratch_dir("export_stage_")
    model_dir, data = make_model_and_data(a.arch, root, 256)
    recipe = root / "recipe.yaml"
    recipe.write_text(recipe_text(model_dir, data))
    if rqat(["run", str(recipe), "--run-root", str(root / "runs"), "--stages", "teacher,calibrate"]) != 0:
        raise SystemExit("teacher/calibrate failed")
    ptq_s = timed_stage(recipe, root, "ptq")
    timed_stage(recipe, root, "export")  # warm-up: first imports and the first save_pretrained
    now_s = timed_stage(recipe, root, "export")
    export_stage.export_checkpoint = previous_path
    before_s = timed_stage(recipe, root, "export")
    rows = [{"stage": "ptq (RTN + checkpoint write)", "seconds": round(ptq_s, 2), "of_ptq": 1.0},
            {"stage": "export, previous path (fake-quant load + swap-out)", "seconds": round(before_s, 2),
             "of_ptq": round(before_s / ptq_s, 2)},
            {"stage": "export, now (export_checkpoint)", "seconds": round(now_s, 2), "of_ptq": round(now_s / ptq_s, 2)}]
    for r in rows:
        print(r, flush=True)
    save("export_stage", rows, {"arch": a.arch, "layers": a.layers, "formats": ["dequantized", "compressed-tensors"],
                                "export_speedup": round(before_s / now_s, 2)})


if __name__ == "__main__":
    main()
