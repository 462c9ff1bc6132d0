"""GPTQ wall time and peak GPU memory on the Qwen3 architectures (random weights), 128 x 2048 calibration
tokens, w4 g128, sequential layer by layer.

--offload: the model stays in CPU memory and each decoder layer visits the GPU (what the ptq stage does, issue
29 item 4); `peak_gib` is then the whole GPU peak, model included.

python benchmarks/gptq_time.py [--archs qwen3-0.6b qwen3-1.7b] [--samples 128] [--seq-len 2048] [--offload]
"""

import argparse
import time

import torch
from common import ARCHS, qwen3, save, sync

from reasoning_qat.quant import QuantScheme, QuantTargets
from reasoning_qat.quant.ptq import gptq_quantize_model, rtn_quantize_model


def run(arch, samples, seq_len, bits=4, offload=False, layers=None):
    model = qwen3(arch, torch.float32, layers=layers)  # built on the GPU (fast), then moved to the CPU when offloading
    if offload:
        model = model.to("cpu")
        torch.cuda.empty_cache()
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
    rtn_quantize_model(model, plan, "cuda")
    sync()
    rtn_s = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    model_layers = model.config.num_hidden_layers
    del model
    torch.cuda.empty_cache()
    return {"arch": arch, "layers": model_layers, "params_M": params / 1e6, "layers_quantized": len(plan), "calib_tokens": samples * seq_len,
            "gptq_s": gptq_s, "rtn_s": rtn_s, "gptq_over_rtn_time": gptq_s / rtn_s,
            "peak_gib_above_model": peak, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "model_gib_fp32": params * 4 / 2**30, "offload": offload,
            "mean_layer_error": sum(errors.values()) / len(errors)}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--layers", type=int, help="only the first N decoder layers (time scales with N; the peak does not)")
    a = p.parse_args()
    rows = []
    for x in a.archs:  # each result printed as it comes: an 8B run can outlast a device call
        rows.append(run(x, a.samples, a.seq_len, offload=a.offload, layers=a.layers))
        print(rows[-1], flush=True)
    save("gptq_time" + ("-offload" if a.offload else "") + (f"-{a.layers}layers" if a.layers else ""), rows)
