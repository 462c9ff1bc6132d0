"""Helpers the stages share: the teacher model and the run's checkpoints as ModelSources, the QAT data, variants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..recipe import DataConfig, Recipe
from ..run_layout import ModelSource, Variant


def teacher_source(ctx) -> ModelSource:
    """The BF16 teacher, with the recipe's loading options (revision, trust_remote_code, dtype)."""
    return ModelSource.teacher(ctx.layout, ctx.recipe.model)


def teacher_path(ctx) -> str:
    return teacher_source(ctx).id


def load_teacher(ctx, dtype=None, device: str | None = None):
    return teacher_source(ctx).model(dtype, device)


def load_rotated_teacher(ctx, device: str):
    """The teacher in float32, rotated when `ptq.rotation: hadamard` (recipe's seed): what every ptq
    variant quantizes and what the QAT student starts from. The KD teacher itself stays unrotated."""
    import torch

    model = load_teacher(ctx, torch.float32, device)
    if ctx.recipe.ptq.rotation == "hadamard":
        from ..quant.rotation import rotate

        rotate(model, ctx.recipe.ptq.rotation_seed)
    return model


def load_teacher_tokenizer(ctx):
    return teacher_source(ctx).tokenizer()


def checkpoint_source(ctx, path) -> ModelSource:
    """One of the run's own checkpoints, loaded with the teacher's options (trust_remote_code)."""
    return teacher_source(ctx).at(path)


def open_source(ctx, data: DataConfig, field: str = "qat.data.source"):
    """The raw dataset `data` names, lazily (see data/qat_data.py)."""
    from ..data.qat_data import open_dataset

    return open_dataset(data.source, data.split, data.subset, ctx.layout.demo_data(), field=field)


def source_rows(ctx, data: DataConfig, tokenizer, prompts_only: bool = False, field: str = "qat.data.source") -> list[dict]:
    """The rows `data` names as {prompt, response, answer}: one trace each by `data.select`, graded
    in `tokenizer`'s chat format (response "" when prompts_only). For the small sets that are used as
    lists (RL prompts, the prompts the teacher answers); the QAT set itself stays a dataset
    (calibrate.build_qat_data)."""
    from ..data.qat_data import select_traces

    rows = select_traces(open_source(ctx, data, field), data, with_response=not prompts_only, tokenizer=tokenizer,
                         field=field.removesuffix(".source"))
    return [{k: v for k, v in r.items() if v is not None and k != "status"} for r in rows if r["status"] == "kept"]


def variant(bits: int, method: str) -> Variant:
    return Variant(bits, method)


def rl_method(recipe: Recipe) -> str:
    """The rl stage's variant method: `qat_rl` (GRPO after QAT) or `ptq_rl` (straight from PTQ)."""
    return f"{recipe.rl.init}_rl"


def ptq_methods(recipe: Recipe) -> list[str]:
    """The ptq stage's outputs: the main method (QAT's init) first, then the baselines."""
    return list(dict.fromkeys([recipe.ptq.method, *recipe.ptq.baselines]))


def exists_done(path: Path) -> bool:
    return (path / ".done").is_file()


def mark_done(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / ".done").write_text("")


def finish_training(out: Path, metrics_file: str, metrics: dict, log_history: list) -> None:
    """Record a finished training run and mark it done (QAT and RL share this)."""
    (out / metrics_file).write_text(json.dumps(metrics, indent=1))
    (out / "log_history.json").write_text(json.dumps(log_history, indent=1))
    # Optimizer states are several times the model; the finished stage keeps only the result.
    for ckpt in (out / "trainer").glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    mark_done(out)
