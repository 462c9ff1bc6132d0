"""GPTQ wall time and peak GPU memory on the Qwen3-0.6B / 1.7B architectures (random weights),
128 x 2048 calibration tokens, w4 g128, sequential layer by layer.

python benchmarks/gptq_time.py [--archs qwen3-0.6b qwen3-1.7b] [--samples 128] [--seq-len 2048]
"""

import argparse
import time

import torch
from common import ARCHS, qwen3, save, sync

from reasoning_qat.quant import QuantScheme, QuantTargets
from reasoning_qat.quant.ptq import gptq_quantize_model, rtn_quantize_model


def run(arch, samples, seq_len, bits=4):
    model = qwen3(arch, torch.float32)
    plan = QuantTargets(QuantScheme(bits, 128)).resolve(model)
    calib = torch.randint(0, ARCHS[arch]["vocab_size"], (samples, seq_len))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sync()
    t = time.perf_counter()
    _, errors = gptq_quantize_model(model, plan, calib, device="cuda", batch_size=8, progress=False)
    sync()
    gptq_s = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    t = time.perf_counter()
    rtn_quantize_model(model, plan)
    sync()
    rtn_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return {"arch": arch, "params_M": params / 1e6, "layers_quantized": len(plan), "calib_tokens": samples * seq_len,
            "gptq_s": gptq_s, "rtn_s": rtn_s, "gptq_over_rtn_time": gptq_s / rtn_s,
            "peak_gib_above_model": peak, "mean_layer_error": sum(errors.values()) / len(errors)}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    a = p.parse_args()
    save("gptq_time", [run(x, a.samples, a.seq_len) for x in a.archs])
