"""export stage: real checkpoints that inference engines load, for every quantized variant.

`<variant>/dequantized`: a plain transformers checkpoint of the quantized function (any engine,
any bit width). `<variant>/compressed-tensors`: packed `pack-quantized` weights, written through the
compressed-tensors library (vLLM's WNA16 kernels at 2/3/4/8 bits on GPUs; transformers loads it
too). `<variant>/gptq`: GPTQ v1, only for symmetric 4/8-bit recipes (the only GPTQ vLLM serves).
"""

from __future__ import annotations

from ..models import resolve_dtype
from ..pipeline import StageContext
from ..quant.formats import (
    directory_size,
    export_compressed_tensors,
    export_dequantized,
    export_gptq,
    load_quantized_checkpoint,
)
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
    dtype = resolve_dtype(r.model.dtype)
    writers = {
        "dequantized": lambda src, out, tok: export_dequantized(load_quantized_checkpoint(src), out, tok, dtype),
        "compressed-tensors": lambda src, out, tok: export_compressed_tensors(load_quantized_checkpoint(src), out, tok, dtype),
        "gptq": lambda src, out, tok: export_gptq(load_quantized_checkpoint(src), out, tok, act_order=r.ptq.act_order),
    }
    metrics = {}
    for name, src in quantized_variants(ctx).items():
        out = ctx.out / name
        if not exists_done(out):
            tok = _tokenizer(src)
            for fmt in r.export.formats:
                writers[fmt](src, out / fmt, tok)
            mark_done(out)
        metrics[name] = {f"{fmt}_bytes": directory_size(out / fmt) for fmt in r.export.formats}
    return metrics


def _tokenizer(src):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)
