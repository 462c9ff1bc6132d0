"""Helpers the stages share: the teacher model and the run's checkpoints as ModelSources, the QAT data, variants."""

from __future__ import annotations

import json
import shutil

from ..recipe import DataConfig, Recipe
from ..run_layout import ModelSource, finish
from .specs import data_prefix, recipe_keys, trace_spec


def teacher_source(ctx) -> ModelSource:
    """The BF16 teacher, with the recipe's loading options (revision, trust_remote_code, dtype)."""
    return ModelSource.teacher(ctx.layout, ctx.recipe.model)


def teacher_path(ctx) -> str:
    """The teacher's id or local path."""
    return teacher_source(ctx).id


def load_teacher(ctx, dtype=None, device: str | None = None):
    """The BF16 teacher model (dtype, device)."""
    return teacher_source(ctx).model(dtype, device)


def load_rotated_teacher(ctx, device: str):
    """The teacher in float32, rotated when `ptq.rotation: hadamard` (recipe's seed): what every ptq
    variant quantizes and what the QAT student starts from. The KD teacher itself stays unrotated."""
    import torch

    model = load_teacher(ctx, torch.float32, device)
    if ctx.recipe.ptq.rotation == "hadamard":
        from ..quant.rotation import rotate
        from .specs import recipe_keys

        with recipe_keys("ptq"):  # a width no Hadamard is built for: ptq.rotation
            rotate(model, ctx.recipe.ptq.rotation_seed)
    return model


def load_teacher_tokenizer(ctx):
    """The teacher's tokenizer."""
    return teacher_source(ctx).tokenizer()


def checkpoint_source(ctx, path) -> ModelSource:
    """One of the run's own checkpoints, loaded with the teacher's options (trust_remote_code)."""
    return teacher_source(ctx).at(path)


def open_source(ctx, data: DataConfig):
    """The raw dataset a recipe data section (`qat.data`, `rl.data`) names, lazily (data/qat_data.py)."""
    from ..data.qat_data import open_dataset

    with recipe_keys(data_prefix(ctx.recipe, data)):
        return open_dataset(data.source, data.split, data.subset, _demo_dir(ctx, data))


def _demo_dir(ctx, data: DataConfig):
    """The demo task's data: the teacher's own, or (`demo_trace` set to another style than the teacher's) the
    same chain problems re-written in that style, kept in the running stage's folder."""
    demo = ctx.recipe.model.demo
    if data.source != "demo" or data.demo_trace is None or demo is None or data.demo_trace == demo.trace:
        return ctx.layout.demo_data()
    from ..data.arithmetic import split_chain_problems, to_records
    from ..data.reasoning import write_jsonl

    seed = ctx.recipe.seed if demo.seed is None else demo.seed  # the teacher's problems, as the teacher stage draws them
    out = ctx.out / f"demo_{data.demo_trace}"
    for split, problems in zip(("train", "test"), split_chain_problems(
            demo.num_problems, demo.test_fraction, seed, demo.min_steps, demo.max_steps, data.demo_trace)):
        write_jsonl(out / f"{split}.jsonl", to_records(problems))
    return out


def source_rows(ctx, data: DataConfig, tokenizer, prompts_only: bool = False) -> list[dict]:
    """The rows a recipe data section names as {prompt, response, answer}: one trace each by `select`,
    graded in `tokenizer`'s chat format (response "" when prompts_only). For the small sets that are used as
    lists (RL prompts, the prompts the teacher answers); the QAT set itself stays a dataset
    (calibrate.build_qat_data). Raises RecipeError naming the section's key at fault."""
    from ..data.qat_data import select_traces

    ds = open_source(ctx, data)
    with recipe_keys(data_prefix(ctx.recipe, data)):
        rows = select_traces(ds, trace_spec(data), with_response=not prompts_only, tokenizer=tokenizer)
    return [{k: v for k, v in r.items() if v is not None and k != "status"} for r in rows if r["status"] == "kept"]


def qat_data_origin(recipe: Recipe) -> dict:
    """Whose responses the QAT set holds, and with it the domain calibration windows cut from it:
    `responses` (the dataset's or the teacher's own) and, for the demo's chain task, `trace` when the
    data are another generator's (a trace style other than the teacher's). Recorded in the calibrate
    and qat manifests; compare names the rows by it."""
    q, demo = recipe.qat, recipe.model.demo
    foreign = q.data.demo_trace if demo is not None and q.data.demo_trace not in (None, demo.trace) else None
    return {"responses": q.data.responses, **({"trace": foreign} if foreign else {})}


def rl_method(recipe: Recipe) -> str:
    """The rl stage's variant method: `qat_rl` (GRPO after QAT) or `ptq_rl` (straight from PTQ)."""
    return f"{recipe.rl.init}_rl"


def ptq_methods(recipe: Recipe) -> list[str]:
    """The ptq stage's outputs: the main method (QAT's init) first, then the baselines."""
    return list(dict.fromkeys([recipe.ptq.method, *recipe.ptq.baselines]))


def finish_training(ctx, stage: str, v, metrics: dict, log_history: list) -> None:
    """Record a finished training run (qat or rl stage) and mark the variant done."""
    out = ctx.layout.trained(v)
    ctx.layout.log_history(v).write_text(json.dumps(log_history, indent=1))
    # Optimizer states are several times the model; the finished stage keeps only the result.
    for ckpt in ctx.layout.trainer(v).glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    finish(out, ctx.layout.variant_metrics(stage, v), metrics)


def tensorboard_writer(ctx):
    """A torch SummaryWriter into the stage's tensorboard/ directory when the recipe reports to TensorBoard,
    else None. Raises UserError when TensorBoard is asked for but not installed."""
    if "tensorboard" not in ctx.recipe.report_to:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from ..errors import UserError

        raise UserError("report_to: tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(log_dir=str(ctx.layout.tensorboard(ctx.stage)))

