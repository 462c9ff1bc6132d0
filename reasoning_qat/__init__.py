"""reasoning-qat: low-bit reasoning models that keep their accuracy (calibrate, GPTQ, KD-QAT, RL, export, eval).

`run`, `load` and `evaluate` (reasoning_qat/api.py) are imported on first use, so `import reasoning_qat`
stays free of torch and transformers.
"""

__all__ = ["evaluate", "load", "run"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
