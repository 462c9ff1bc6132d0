"""Where the export stage's time goes, per step, on one quantized Qwen3 architecture (random weights, RTN).

The export stage loads each variant's rqat checkpoint once per format and writes it (formats.py). This
times each part of that on its own. Before/after: run it on each checkout, e.g.

    python benchmarks/export_time.py [--arch qwen3-0.6b] [--layers 4] [--bits 4] --label after
    PYTHONPATH=/tmp/before BENCH_TAG=-before python benchmarks/export_time.py --label before

Writes benchmarks/results/export_time.{json,md}.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import ARCHS, qwen3, save
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor  # noqa: F401 (import before timing)

from reasoning_qat.quant import QuantScheme, QuantTargets, formats, swap_in_fake_quant


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen3-0.6b", choices=list(ARCHS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--label", default="current", help="a name for the code measured (run with PYTHONPATH at another checkout for before/after)")
    a = p.parse_args()
    ARCHS[a.arch] = {**ARCHS[a.arch], "num_hidden_layers": a.layers}
    model = qwen3(a.arch, torch.float32, device="cpu")
    swap_in_fake_quant(model, QuantTargets(QuantScheme(a.bits, 128)))
    tmp = Path(tempfile.mkdtemp())
    _, save_s = timed(lambda: formats.save_quantized_checkpoint(model, tmp / "ckpt"))
    m, load_s = timed(lambda: formats.load_quantized_checkpoint(tmp / "ckpt"))
    _, dq_s = timed(lambda: formats.export_dequantized(m, tmp / "dq", dtype=torch.bfloat16))
    m, load2_s = timed(lambda: formats.load_quantized_checkpoint(tmp / "ckpt"))
    _, ct_s = timed(lambda: formats.export_compressed_tensors(m, tmp / "ct", dtype=torch.bfloat16))
    rows = [{"code": a.label, "load_s": round((load_s + load2_s) / 2, 2), "dequantized_write_s": round(dq_s, 2),
             "compressed_tensors_write_s": round(ct_s, 2),
             "stage_s": round(load_s + dq_s + load2_s + ct_s, 2)}]  # the export stage: one load per format
    print(rows[0], flush=True)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    save("export_time", rows, {"arch": a.arch, "layers": a.layers, "bits": a.bits, "params_M": round(params, 1),
                               "rqat_checkpoint_write_s": round(save_s, 2),
                               "package": formats.__file__})


if __name__ == "__main__":
    main()
