"""The pipeline's stages, in order. Each is a plain function of a StageContext (see pipeline.py)."""

from __future__ import annotations

from ..pipeline import Stage
from . import calibrate, evaluate, export, ptq, qat, rl, teacher

STAGES = [
    Stage("teacher", teacher.run, (), ("model", "seed"), help="the BF16 model (trains the demo teacher)"),
    Stage("calibrate", calibrate.run, ("teacher",), ("calibration", "qat.data", "ptq.baselines"),
          help="domain-matched calibration set"),
    Stage("ptq", ptq.run, ("teacher", "calibrate"), ("quant", "ptq"), help="RTN / GPTQ checkpoints"),
    Stage("qat", qat.run, ("teacher", "ptq"), ("quant", "qat", "seed", "ptq.method"),
          enabled=lambda r: r.qat.enabled, help="KD quantization-aware training"),
    Stage("rl", rl.run, ("teacher", "qat"), ("quant", "rl", "seed"), enabled=lambda r: r.rl.enabled,
          help="GRPO on the quantized student"),
    Stage("export", export.run, ("ptq", "qat", "rl"), ("export", "model.dtype", "ptq.act_order"),
          help="dequantized and GPTQ checkpoints"),
    Stage("eval", evaluate.run, ("teacher", "export"), ("eval",), help="pass@1 on the eval tasks"),
]

STAGE_NAMES = [s.name for s in STAGES]
