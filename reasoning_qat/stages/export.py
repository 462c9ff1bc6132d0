"""export stage: real checkpoints that inference engines load, for every quantized variant.

`<variant>/dequantized`: a plain transformers checkpoint of the quantized function (any engine,
any bit width). `<variant>/gptq`: GPTQ v1 packed weights (vLLM serves 4/8-bit; transformers with
GPTQModel loads all widths).
"""

from __future__ import annotations

import torch

from ..pipeline import StageContext
from ..quant.formats import directory_size, export_dequantized, export_gptq, load_quantized_checkpoint
from .common import exists_done, mark_done, ptq_methods, variant


def quantized_variants(ctx: StageContext) -> dict[str, object]:
    """Variant name -> its rqat checkpoint directory, from whichever stages ran."""
    r, found = ctx.recipe, {}
    for bits in r.quant.bits:
        for m in ptq_methods(r):
            found[variant(bits, m)] = ctx.input("ptq") / variant(bits, m)
        if "qat" in ctx.inputs:
            found[variant(bits, "qat")] = ctx.input("qat") / variant(bits, "qat") / "model"
        if "rl" in ctx.inputs:
            found[variant(bits, "qat_rl")] = ctx.input("rl") / variant(bits, "qat_rl") / "model"
    return found


def run(ctx: StageContext) -> dict:
    r = ctx.recipe
    dtype = torch.bfloat16 if r.model.dtype == "bfloat16" else torch.float16 if r.model.dtype == "float16" else torch.float32
    metrics = {}
    for name, src in quantized_variants(ctx).items():
        out = ctx.out / name
        if not exists_done(out):
            if "gptq" in r.export.formats:
                export_gptq(load_quantized_checkpoint(src), out / "gptq", _tokenizer(src), act_order=r.ptq.act_order)
            if "dequantized" in r.export.formats:
                export_dequantized(load_quantized_checkpoint(src), out / "dequantized", _tokenizer(src), dtype)
            mark_done(out)
        metrics[name] = {f"{fmt}_bytes": directory_size(out / fmt) for fmt in r.export.formats}
    return metrics


def _tokenizer(src):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)
