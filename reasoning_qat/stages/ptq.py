"""ptq stage: RTN and GPTQ checkpoints per bit width; the main method's result initialises QAT.

Outputs `ptq/w<bits>-<method>/` in the rqat quantized format; `gptq_generic` is GPTQ calibrated
on generic text (the domain-matching baseline). Per-layer reconstruction errors go in the manifest.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from ..models import best_device
from ..pipeline import StageContext
from ..quant import prepare
from ..quant.formats import save_quantized_checkpoint
from ..quant.ptq import gptq_quantize_model, rtn_quantize_model
from ..quant.runtime import install_quant_spec
from ..run_layout import Variant, finish, finished_metrics
from .common import load_rotated_teacher, load_teacher_tokenizer, ptq_methods
from .specs import quant_spec, recipe_keys


def run(ctx: StageContext) -> dict:
    """The ptq stage: RTN/GPTQ checkpoints per bit width and method; per-layer errors in ptq_errors.json."""
    r = ctx.recipe
    device = best_device()
    calib = load_file(str(ctx.layout.calibration_file()))
    tok = load_teacher_tokenizer(ctx)
    metrics = {}
    for bits in r.quant.bits:
        spec = quant_spec(r, bits)
        for method in ptq_methods(r):
            v = Variant(bits, method)
            name, out = str(v), ctx.layout.ptq(v)
            if (done := finished_metrics(out, ctx.layout.variant_metrics("ptq", v))) is not None:
                metrics[name] = done["summary"]  # finished before a crash: keep it
                continue
            # The model stays in CPU memory and each layer visits the GPU (quant/ptq.py), so a model larger than
            # the GPU quantizes; the Hadamard rotation (W4A4) still runs on the GPU, with the whole model there.
            home = device if r.ptq.rotation != "none" else "cpu"
            model = load_rotated_teacher(ctx, home)
            if "cuda" in device:
                torch.cuda.reset_peak_memory_stats()
            with recipe_keys("quant"):
                plan = spec.weights.resolve(model)
            ranks: dict[str, float] = {}  # GPTQ's input participation ratio per layer
            dead: dict[str, int] = {}  # input columns the calibration never activated (kept at RTN)
            if method == "rtn":
                qws, errors = rtn_quantize_model(model, plan, device)
            else:
                ids = calib["generic" if method == "gptq_generic" else "main"]
                install_quant_spec(model, spec)  # GPTQ calibrates on what the quantized model will compute
                with recipe_keys("quant"), recipe_keys("ptq", only={"damp"}):
                    qws, errors = gptq_quantize_model(
                        model, plan, ids, damp=r.ptq.damp, block_size=r.ptq.block_size, act_order=r.ptq.act_order,
                        true_sequential=r.ptq.true_sequential, device=device, input_ranks=ranks, dead_columns=dead,
                    )
                # how much of each layer's input width the calibration data uses, on average
                fraction = sum(ranks[n] / model.get_submodule(n).in_features for n in ranks) / max(len(ranks), 1)
                model = load_rotated_teacher(ctx, home)  # GPTQ overwrote weights in place
            prepare(model, spec, qws)  # the checkpoint carries its spec (quant_spec.json beside the weights)
            save_quantized_checkpoint(model, out, tok, {"method": method, "bits": bits})
            summary = {"mean_layer_error": sum(errors.values()) / len(errors), "max_layer_error": max(errors.values()),
                       "error_kind": "weight" if method == "rtn" else "output", "rotation": r.ptq.rotation,
                       "activations": r.quant.activations.bits if r.quant.activations else None,
                       "kv_cache": r.quant.kv_cache.bits if r.quant.kv_cache else None,
                       "model_device": home, "compute_device": device,
                       "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if "cuda" in device else None}
            if ranks:
                summary["mean_input_rank_fraction"] = fraction
                summary["dead_input_columns"] = sum(dead.values())
            finish(out, ctx.layout.variant_metrics("ptq", v), {
                "summary": summary, "layers": errors,
                **({"input_participation_ratio": ranks, "dead_input_columns": dead} if ranks else {})})
            metrics[name] = summary
            del model
    return metrics
