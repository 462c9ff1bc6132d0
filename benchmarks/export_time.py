"""Where the export stage's time goes, on one quantized Qwen3 architecture (random weights, RTN), against the
ptq stage's own work on the same model.

The export stage loads each variant's rqat checkpoint and writes each format (formats.py). This times, in one
run: one load per format with each format's own writer (the stage before `export_formats`), one load for all
formats (`export_formats`), both formats straight from the checkpoint's codes (`export_checkpoint`, the stage
now), and the ptq stage's RTN of the same model plus its checkpoint write.
Earlier before/after runs: run it on each checkout, e.g.

    python benchmarks/export_time.py [--arch qwen3-0.6b] [--layers 4] [--bits 4] [--profile] --label after
    PYTHONPATH=/tmp/before BENCH_TAG=-before python benchmarks/export_time.py --label before

Writes benchmarks/results/export_time.{json,md}.
"""

import argparse
import time

import torch
from common import ARCHS, qwen3, save, scratch_dir
from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor  # noqa: F401 (import before timing)

from reasoning_qat.quant import QuantScheme, QuantTargets, formats, swap_in_fake_quant
from reasoning_qat.quant.ptq import rtn_quantize_model


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen3-0.6b", choices=list(ARCHS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="also print cProfile's top entries of both export paths")
    p.add_argument("--label", default="current", help="a name for the code measured (run with PYTHONPATH at another checkout for before/after)")
    a = p.parse_args()
    ARCHS[a.arch] = {**ARCHS[a.arch], "num_hidden_layers": a.layers}
    model = qwen3(a.arch, torch.float32, device="cpu")
    targets = QuantTargets(QuantScheme(a.bits, 128))
    _, rtn_s = timed(lambda: rtn_quantize_model(model, targets.resolve(model)))
    swap_in_fake_quant(model, targets)
    tmp = scratch_dir("export_time_")
    _, save_s = timed(lambda: formats.save_quantized_checkpoint(model, tmp / "ckpt"))
    # warm-up, untimed: the first save_pretrained and the first packing pay one-time import and setup costs
    formats.export_compressed_tensors(formats.load_quantized_checkpoint(tmp / "ckpt"), tmp / "warm-ct")
    formats.export_dequantized(formats.load_quantized_checkpoint(tmp / "ckpt"), tmp / "warm-dq")
    m, load_s = timed(lambda: formats.load_quantized_checkpoint(tmp / "ckpt"))
    _, dq_s = timed(lambda: formats.export_dequantized(m, tmp / "dq", dtype=torch.bfloat16))
    m, load2_s = timed(lambda: formats.load_quantized_checkpoint(tmp / "ckpt"))
    _, ct_s = timed(lambda: formats.export_compressed_tensors(m, tmp / "ct", dtype=torch.bfloat16))
    rows = [{"code": a.label, "how": "one load per format", "load_s": round((load_s + load2_s) / 2, 2),
             "dequantized_write_s": round(dq_s, 2), "compressed_tensors_write_s": round(ct_s, 2),
             "stage_s": round(load_s + dq_s + load2_s + ct_s, 2)}]
    has_formats = hasattr(formats, "export_formats")
    if has_formats:
        m, load3_s = timed(lambda: formats.load_quantized_checkpoint(tmp / "ckpt"))
        _, both_s = timed(lambda: formats.export_formats(m, {"dequantized": tmp / "dq2", "compressed-tensors": tmp / "ct2"},
                                                         dtype=torch.bfloat16))
        rows.append({"code": a.label, "how": "one load for all formats (export_formats)", "load_s": round(load3_s, 2),
                     "dequantized_write_s": "", "compressed_tensors_write_s": "", "stage_s": round(load3_s + both_s, 2)})
    if hasattr(formats, "export_checkpoint"):  # the stage since 2026-12-03: no fake-quant model at all
        _, direct_s = timed(lambda: formats.export_checkpoint(tmp / "ckpt", {"dequantized": tmp / "dq3",
                                                                             "compressed-tensors": tmp / "ct3"}))
        rows.append({"code": a.label, "how": "straight from the checkpoint (export_checkpoint)", "load_s": "",
                     "dequantized_write_s": "", "compressed_tensors_write_s": "", "stage_s": round(direct_s, 2)})
    for r in rows:
        print(r, flush=True)
    if a.profile:
        import cProfile
        import pstats

        paths = [("export_formats(load_quantized_checkpoint(...))", lambda: formats.export_formats(
            formats.load_quantized_checkpoint(tmp / "ckpt"), {"dequantized": tmp / "p1", "compressed-tensors": tmp / "p2"}))]
        if hasattr(formats, "export_checkpoint"):  # absent at the commits before 2026-12-03
            paths.append(("export_checkpoint(...)", lambda: formats.export_checkpoint(
                tmp / "ckpt", {"dequantized": tmp / "p3", "compressed-tensors": tmp / "p4"})))
        for label, fn in paths:
            prof = cProfile.Profile()
            prof.runcall(fn)
            print(f"== {label}")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(15)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    save("export_time", rows, {"arch": a.arch, "layers": a.layers, "bits": a.bits, "params_M": round(params, 1),
                               "ptq_rtn_s": round(rtn_s, 2), "rqat_checkpoint_write_s": round(save_s, 2),
                               "ptq_rtn_and_write_s": round(rtn_s + save_s, 2),
                               "package": formats.__file__})


if __name__ == "__main__":
    main()
