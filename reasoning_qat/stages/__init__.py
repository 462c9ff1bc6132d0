"""The pipeline's stages, in order. Each is a plain function of a StageContext (see pipeline.py)."""

from __future__ import annotations

from ..pipeline import Stage
from . import calibrate, evaluate, export, ptq, qat, rl, teacher

STAGES = [
    Stage("teacher", teacher.run, (), ("model", "seed"), help="the BF16 model (trains the demo teacher)"),
    Stage("calibrate", calibrate.run, ("teacher",), ("calibration", "qat.data", "ptq.baselines"),
          help="domain-matched calibration set"),
    Stage("ptq", ptq.run, ("teacher", "calibrate"), ("quant", "ptq"), help="RTN / GPTQ checkpoints"),
    Stage("qat", qat.run, ("teacher", "calibrate", "ptq"), ("quant", "qat", "seed", "ptq.method"),
          enabled=lambda r: r.qat.enabled, help="KD quantization-aware training"),
    Stage("rl", rl.run, ("teacher", "qat"), ("quant", "rl", "seed"), enabled=lambda r: r.rl.enabled,
          help="GRPO on the quantized student"),
    Stage("export", export.run, ("ptq", "qat", "rl"), ("export", "model.dtype", "ptq.act_order"),
          help="dequantized and GPTQ checkpoints"),
    Stage("eval", evaluate.run, ("teacher", "export"), ("eval",), help="pass@1 on the eval tasks"),
]

STAGE_NAMES = [s.name for s in STAGES]


def preflight(recipe) -> None:
    """Checks that need the architecture, done before any stage runs: every targeted layer's width
    must suit the quant scheme. Builds the model on the meta device (no weights). Skipped when the
    model's config cannot be read yet (e.g. a hub id while offline); the ptq stage checks again."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models import demo_config, load_config
    from ..quant import targets_from_recipe
    from ..recipe import RecipeError

    m = recipe.model
    try:
        if m.demo is not None:
            from ..data.tokenizer import build_char_tokenizer

            config = demo_config(m.demo, build_char_tokenizer())
        else:
            config = load_config(m.id, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except (OSError, ValueError):
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    for bits in recipe.quant.bits:
        try:
            targets_from_recipe(recipe.quant, bits).resolve(model)
        except ValueError as err:
            raise RecipeError(str(err)) from None
