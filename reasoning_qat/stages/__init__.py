"""The pipeline's stages, in order. Each is a plain function of a StageContext (see pipeline.py)."""

from __future__ import annotations

import importlib

from ..pipeline import Stage


def _run_of(module: str):
    """The stage's `run`, imported when the stage runs: listing the stages (`rqat status`, `--dry-run`,
    the recipe checks) then imports no torch, transformers or TRL."""

    def run(ctx):
        return importlib.import_module(module, __name__).run(ctx)

    run.__qualname__ = f"{module.lstrip('.')}.run"
    return run


def _teacher_keys(recipe) -> tuple[str, ...]:
    """A demo teacher with its own seed does not depend on the run's: seeds share one teacher."""
    demo = recipe.model.demo
    return ("model",) if demo is not None and demo.seed is not None else ("model", "seed")


def _calibrate_keys(recipe) -> tuple[str, ...]:
    """A cached teacher is written by the calibrate stage: its settings then belong to the stage's inputs."""
    keys = ("calibration", "qat.data", "ptq.baselines")
    kd = recipe.qat.kd
    cached = recipe.qat.enabled and kd.teacher == "cached"
    return keys + (("qat.kd.teacher", "qat.kd.cache_top_k", "qat.kd.cache_backend", "qat.kd.temperature")
                   if cached else ())


def _rl_deps(recipe) -> tuple[str, ...]:
    return ("teacher", "ptq") if recipe.rl.init == "ptq" else ("teacher", "qat")


def _rl_keys(recipe) -> tuple[str, ...]:
    return ("quant", "rl", "seed") + (("ptq.method",) if recipe.rl.init == "ptq" else ())


STAGES = [
    Stage("teacher", _run_of(".teacher"), (), _teacher_keys, help="the BF16 model (trains the demo teacher)"),
    Stage("calibrate", _run_of(".calibrate"), ("teacher",), _calibrate_keys,
          help="domain-matched calibration set (and the cached teacher)"),
    Stage("ptq", _run_of(".ptq"), ("teacher", "calibrate"), ("quant", "ptq"), help="RTN / GPTQ checkpoints"),
    Stage("qat", _run_of(".qat"), ("teacher", "calibrate", "ptq"), ("quant", "qat", "seed", "ptq.method"),
          enabled=lambda r: r.qat.enabled, help="KD quantization-aware training"),
    Stage("rl", _run_of(".rl"), _rl_deps, _rl_keys, enabled=lambda r: r.rl.enabled,
          help="GRPO on the quantized student"),
    Stage("export", _run_of(".export"), ("ptq", "qat", "rl"), ("export", "model.dtype", "ptq.act_order"),
          help="dequantized and GPTQ checkpoints"),
    Stage("eval", _run_of(".evaluate"), ("teacher", "export"), ("eval",), help="pass@1 on the eval tasks"),
    Stage("compare", _run_of("..compare"), ("eval",), ("compare",), help="one table and plot of every variant"),
]

from .preflight import preflight, serving_notes  # re-exported: the CLI's entry points

__all__ = ["STAGES", "preflight", "serving_notes"]
