"""The Python API beside the CLI (`import reasoning_qat as rq`): what `rqat run`, `rqat eval` and a loader
of a run's models do, as functions.

    run_dir = rq.run("recipes/demo.yaml", stages=["teacher", "calibrate", "ptq"], overrides={"quant.bits": [4]})
    model = rq.load(run_dir, "w4-gptq")            # computes the quantized function (QuantSpec installed)
    metrics = rq.evaluate(model_dir, "math500", data="math500.jsonl", limit=50)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .recipe import Recipe


def prepare(recipe: str | Path | Recipe, overrides: list[str] | dict | None = None,
            run_root: str | Path | None = None) -> tuple[Recipe, list[str]]:
    """The checked recipe (overrides applied, as `rqat run RECIPE KEY=VALUE`) and the preflight's serving
    notes. Nothing is created. Raises RecipeError (one line naming the field) on anything a stage would
    refuse later."""
    from .recipe import Recipe, apply_overrides, load_recipe, parse_recipe
    from .stages import preflight

    if isinstance(recipe, Recipe):
        if overrides:
            recipe = parse_recipe(apply_overrides(recipe.model_dump(mode="json"), overrides), "recipe")
    else:
        recipe = load_recipe(recipe, overrides)
    if run_root is not None:
        recipe = recipe.model_copy(update={"run_root": str(run_root)})
    return recipe, preflight(recipe)


def run(recipe: str | Path | Recipe, stages: list[str] | None = None, overrides: list[str] | dict | None = None,
        force: bool = False, run_root: str | Path | None = None, console=None, replace: bool = False) -> Path:
    """Run a recipe's missing or stale stages (`stages`: only these, as `--stages`), resuming what a crash
    left; returns the run directory. `overrides`: KEY=VALUE strings or a {dotted key: value} mapping,
    recorded in the run's recipe snapshot. A run directory whose finished stages this call would redo (a
    changed recipe, or `stages` naming them) is refused unless `replace` (or `force`) says so: a script
    never overwrites another run's results by accident. Raises RecipeError for a bad recipe (before
    anything is created), UserError for a run it would overwrite, StageFailed / UserError for a stage that
    refuses."""
    from .pipeline import Pipeline
    from .stages import STAGES

    recipe, _ = prepare(recipe, overrides, run_root)
    pipe = Pipeline(recipe, STAGES, console)
    if not (replace or force) and (done := pipe.finished_in(pipe.plan(stages))):
        raise UserError(f"{pipe.run_dir}: its finished {', '.join(done)} stage{'s' if len(done) > 1 else ''} would be "
                        "run again and replaced; give this run its own name (overrides={'name': ...}), or pass "
                        "replace=True")
    pipe.run(stages, force)
    return pipe.run_dir


def load(run_dir: str | Path, variant: str = "bf16", device: str | None = None, dtype=None):
    """The model of one variant of a run (`bf16`, `w4-gptq`, `w2-qat`, `w2-qat_rl`, ...): a transformers
    causal LM computing the variant's quantized function (FakeQuantLinear weights, its QuantSpec's
    rotations and activation/KV quantizers installed), or the BF16 teacher. Raises UserError for a
    variant the run does not have."""
    import torch

    from .errors import UserError
    from .models import best_device
    from .pipeline import recipe_from_run
    from .quant.formats import load_quantized_checkpoint
    from .run_layout import BF16, ModelSource, RunLayout, Variant

    recipe = recipe_from_run(run_dir)
    layout, v = RunLayout(run_dir), variant if isinstance(variant, Variant) else Variant.parse(variant)
    device = device or best_device()
    if v == BF16:
        return ModelSource.teacher(layout, recipe.model).model(dtype, device)
    path = layout.checkpoint(v)
    if not path.is_dir():
        raise UserError(f"{run_dir}: no {v} checkpoint ({path}); its stage has not run")
    return load_quantized_checkpoint(path, dtype or torch.float32, device, recipe.model.trust_remote_code,
                                     recipe.model.attn_implementation)


def evaluate(model: str | Path, task: str, out: str | Path | None = None, *, backend: str = "auto",
             data: str | None = None, limit: int | None = None, samples: int | None = None, seed: int = 0,
             demo_data: str | Path | None = None, **options) -> dict:
    """pass@1 of one model (a directory or hub id) on one task (a name in eval/tasks/ or a task .yaml), as
    `rqat eval`: metrics.json and samples.jsonl under `out` (default: beside the model, `default_eval_dir`). `data`:
    a local file replacing the task's hub source; `options`: batch_size, max_new_tokens, temperature,
    trust_remote_code, settings (EngineSettings). Returns the metrics (pass@1, ci95, ...). Raises UserError
    naming the argument at fault."""
    from .evaluation.runner import evaluate as run_eval
    from .evaluation.tasks import load_task

    with flag_names():
        t = load_task(task)
        out_dir = Path(out) if out else default_eval_dir(str(model)) / t.name
        return run_eval(str(model), t, out_dir, backend=backend, samples=samples, limit=limit, data=data, seed=seed,
                        demo_dir=Path(demo_data) if demo_data else None, **options)


FLAGS = {"tasks": "--task", "backend": "--backend", "max_model_len": "--max-model-len"}


@contextlib.contextmanager
def flag_names():
    """The library's SpecError (`backend: ...`) named as the flag the user typed (`--backend: ...`)."""
    from .errors import SpecError

    try:
        yield
    except SpecError as err:
        raise UserError(f"{FLAGS.get(err.field, err.field)}: {err.message}") from None


def default_eval_dir(model: str) -> Path:
    """Where `rqat eval` writes without --out: beside a local model (`.../w4-gptq/dequantized` ->
    `.../w4-gptq/dequantized-eval`: the variant's own folder, so two exports both called `dequantized` never
    share one), and for a hub id under the user's cache (`~/.cache/reasoning-qat/eval/org--name`): never into the
    working directory, which may be a source checkout."""
    path = Path(model).expanduser()
    if not path.exists():
        return Path.home() / ".cache" / "reasoning-qat" / "eval" / model.replace("/", "--")
    path = path.resolve()
    return path.with_name(f"{path.name}-eval")
