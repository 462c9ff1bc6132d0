"""export stage: real checkpoints that inference engines load, for every quantized variant.

`<variant>/dequantized`: a plain transformers checkpoint of the quantized function (any engine,
any bit width). `<variant>/compressed-tensors`: packed `pack-quantized` weights in the format's dense
layout (vLLM's WNA16 kernels on GPUs: see serving.py; transformers loads it too, 3-bit with
compressed-tensors >= 0.18). `<variant>/gptq`: GPTQ v1, only for symmetric 4/8-bit recipes (the only GPTQ vLLM serves).
"""

from __future__ import annotations

from ..models import resolve_dtype
from ..pipeline import StageContext
from ..quant.formats import directory_size, export_checkpoint
from ..run_layout import Variant, finish, finished_metrics
from .common import checkpoint_source, ptq_methods, rl_method
from .specs import recipe_keys


def quantized_variants(ctx: StageContext) -> list[Variant]:
    """Every quantized variant the stages that ran produced."""
    r, found = ctx.recipe, []
    for bits in r.quant.bits:
        found += [Variant(bits, m) for m in ptq_methods(r)]
        found += [Variant(bits, m) for m, stage in (("qat", "qat"), (rl_method(r), "rl")) if stage in ctx.inputs]
    return found


def run(ctx: StageContext) -> dict:
    """The export stage: each quantized variant in each of export.formats; sizes in the manifest."""
    r = ctx.recipe
    dtype = resolve_dtype(r.model.dtype)
    trust = r.model.trust_remote_code
    metrics = {}
    for v in quantized_variants(ctx):
        out, src = ctx.layout.export(v), ctx.layout.checkpoint(v)
        if finished_metrics(out) is None:
            tok = checkpoint_source(ctx, src).tokenizer()
            with recipe_keys("export"):  # a format that cannot hold this scheme: export.formats
                export_checkpoint(src, {fmt: out / fmt for fmt in r.export.formats}, tok, dtype, r.ptq.act_order,
                                  trust_remote_code=trust)
            finish(out)
        metrics[str(v)] = {f"{fmt}_bytes": directory_size(out / fmt) for fmt in r.export.formats}
    return metrics
