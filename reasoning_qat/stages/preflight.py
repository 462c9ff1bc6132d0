"""Everything checkable before any stage runs, torch-free where it can be, so that a bad recipe fails in
one line and creates nothing (tests/test_errors.py). What it checks against the library (layer widths
against the quant scheme) goes through the same specs the stages build (stages/specs.py)."""

from __future__ import annotations

from .specs import recipe_keys


def _with_parts(task, data: dict) -> list:
    """A task and, when it combines others (AIME years) and has no local file of its own, its parts."""
    from ..evaluation.tasks import load_task

    if not task.combine or task.name in data:
        return [task]
    return [task] + [p for part in task.combine for p in _with_parts(load_task(part), data)]


def _check_local(field: str, ref: str | None, kinds: str = "file or directory") -> None:
    from pathlib import Path

    from ..models import looks_like_path
    from ..recipe import RecipeError

    if ref and ref not in ("demo", "builtin") and looks_like_path(ref) and not Path(ref).expanduser().exists():
        raise RecipeError(f"{field}: no such {kinds} {ref!r} (a hub id looks like 'org/name')")


def _check_verifiable(field: str, data) -> None:
    """`select: verified` without the dataset's own flags grades each trace against answer_field: a
    local .jsonl whose first row has no such field cannot be graded (found here, not after the teacher)."""
    import json
    from pathlib import Path

    from ..recipe import RecipeError

    if data.select != "verified" or data.verified_field or data.complete_field or not data.source.endswith(".jsonl"):
        return
    with open(Path(data.source).expanduser()) as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return  # the calibrate stage names the bad line
    if data.answer_field not in row:
        raise RecipeError(f"{field}.select: verified grades each trace against {data.answer_field!r}, which "
                          f"{data.source} does not have (fields: {', '.join(sorted(row))}); set {field}.answer_field, "
                          f"name the dataset's own verified_field / complete_field, or use select: first")


def _check_attention(name: str | None) -> None:
    """A kernel that needs a package (flash-attn 2/3) or a torch (flex attention) this machine lacks is refused
    here, not when the teacher loads mid-run."""
    from ..recipe import RecipeError

    needs = {"flash_attention_2": ("is_flash_attn_2_available", "the flash-attn package and a CUDA GPU"),
             "flash_attention_3": ("is_flash_attn_3_available", "the flash-attn 3 (hopper) package and a CUDA GPU"),
             "flex_attention": ("is_torch_flex_attn_available", "torch's flex attention")}
    if name not in needs:
        return
    from transformers import utils

    check, what = needs[name]
    if not getattr(utils, check)():
        raise RecipeError(f"model.attn_implementation: {name} needs {what}, which this machine lacks; "
                          "use sdpa (or leave it unset)")


def _check_run_root(run_root: str) -> None:
    from pathlib import Path

    from ..recipe import RecipeError

    for parent in (Path(run_root), *Path(run_root).parents):
        if parent.exists():
            if not parent.is_dir():
                raise RecipeError(f"run_root: {run_root!r} lies under {str(parent)!r}, which is a file, not a directory; "
                                  "choose another run_root (or --run-root)")
            return


def preflight(recipe) -> list[str]:
    """Everything checkable before any stage runs, so that a bad recipe fails in one line and creates
    nothing: every file, directory and eval task the recipe names, and every targeted layer's width
    against the quant scheme (the model is built on the meta device, no weights). A model whose
    config cannot be had (a hub id not cached while the hub is off) is refused here (models.resolve_model).
    Returns notes on what an engine will not serve as exported (`serving_notes`). Raises RecipeError."""

    from ..recipe import RecipeError

    model_cfg = recipe.model
    _check_local("model.id", model_cfg.id, "local model directory")
    _check_attention(model_cfg.attn_implementation)
    _check_run_root(recipe.run_root)
    for field, data in (("qat.data.source", recipe.qat.data), ("rl.data.source", recipe.rl.data)):
        if data.source == "demo" and model_cfg.demo is None and (field.startswith("qat") or recipe.rl.enabled):
            raise RecipeError(f"{field}: 'demo' needs the demo teacher (model.demo); give a .jsonl file or a hub dataset id")
        if field.startswith("qat") or recipe.rl.enabled:
            _check_local(field, data.source)
            _check_verifiable(field.removesuffix(".source"), data)
    _check_local("calibration.generic_source", recipe.calibration.generic_source)
    with recipe_keys("eval"):  # a task's SpecError (`tasks`, `task_options.NAME`) named as the recipe writes it
        _check_tasks(recipe)
    _check_model_shapes(recipe)
    return serving_notes(recipe)


def _check_tasks(recipe) -> None:
    from ..evaluation.tasks import expand_tasks, load_task
    from ..recipe import RecipeError

    model_cfg, e = recipe.model, recipe.eval
    names = expand_tasks(e.tasks)  # unknown names and bad task files fail here
    if unknown := set(e.task_options) - set(names):
        raise RecipeError(f"eval.task_options: {sorted(unknown)} not among the tasks evaluated ({e.tasks})")
    evaluated = set()
    for name in names:
        top = load_task(name, e.task_options.get(name))
        evaluated |= {top.name, *(p.name for p in _with_parts(top, {}))}
        for task in _with_parts(top, e.data):
            _check_local(f"eval.data.{task.name}", e.data.get(task.name))
            if task.name not in e.data and not task.combine:
                _check_local(f"task {task.name}: source", task.source)
            if task.source == "demo" and model_cfg.demo is None and task.name not in e.data:
                raise RecipeError(f"eval.tasks: {task.name} evaluates the demo's test split, which needs model.demo")
    if unknown := sorted(set(e.data) - evaluated):
        raise RecipeError(f"eval.data: {unknown[0]!r} is not one of the tasks evaluated ({sorted(evaluated)})")


def _model_shapes(recipe):
    """(config, Linear shapes) of the recipe's model. For the dense decoder families these come from
    config.json alone (`architecture.linear_shapes`): no torch, no transformers. Other families are built
    on the meta device (no weights). A model that cannot be had is refused here (models.resolve_model)."""
    from ..architecture import linear_shapes
    from ..models import demo_config_dict, read_config_dict
    from ..recipe import RecipeError

    model_cfg = recipe.model
    with recipe_keys("model.demo"):
        config = demo_config_dict(model_cfg.demo) if model_cfg.demo is not None else \
            read_config_dict(model_cfg.id, "model.id", model_cfg.revision)
    try:
        shapes = linear_shapes(config) if config is not None and not model_cfg.trust_remote_code else None
    except ValueError as err:
        raise RecipeError(f"model.id: {err}") from None
    if shapes is not None:
        return config, shapes
    import torch
    from transformers import AutoModelForCausalLM

    from ..models import resolve_model
    from ..quant.ptq import linear_shapes_of

    config = resolve_model(model_cfg.id, "model.id", model_cfg.trust_remote_code, model_cfg.revision)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except (ValueError, TypeError, KeyError, AssertionError) as err:  # a config its own model class refuses
        raise RecipeError(f"model.id: transformers cannot build {type(config).__name__} from {model_cfg.id!r} "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    return config, linear_shapes_of(model)


def _check_model_shapes(recipe) -> None:
    """The checks that depend on the model's widths: every targeted layer's input width against its group
    size, GPTQ's reach (decoder layers only), the KV-cache group against head_dim, rotated widths against
    the Hadamard sizes built here. Torch-free for the dense decoder families
    (`test_errors.py::test_every_recipe_a_later_stage_rejects_is_refused_before_anything_is_created`)."""
    from ..architecture import config_int, head_dim
    from ..errors import UserError
    from ..quant.hadamard import hadamard_factors
    from ..recipe import RecipeError
    from .specs import quant_spec, recipe_keys

    config, shapes = _model_shapes(recipe)
    decoder = {s.name for s in shapes if s.layer is not None}
    gptq = {"gptq", "gptq_generic"} & {recipe.ptq.method, *recipe.ptq.baselines}
    for bits in recipe.quant.bits:
        with recipe_keys("quant"):
            plan = quant_spec(recipe, bits).weights.resolve_shapes(shapes)
        if gptq and (outside := sorted(set(plan) - decoder)):
            raise RecipeError(f"quant.ignore: GPTQ ({', '.join(sorted(gptq))}) quantizes decoder layers only, and "
                              f"{outside[0]} is outside them; add it to quant.ignore, or use RTN for it (ptq.method: rtn)")
    d = head_dim(config)
    kv = recipe.quant.kv_cache
    if kv is not None and kv.group_size != -1 and d % kv.group_size:
        raise RecipeError(f"quant.kv_cache.group_size: {kv.group_size} does not divide the model's head_dim {d}; "
                          f"use a divisor of {d} or -1 (the whole head)")
    if recipe.ptq.rotation == "hadamard":  # every width a Hadamard acts on must be one we build
        for field, n in (("hidden_size", config_int(config, "hidden_size")),
                         ("intermediate_size", config_int(config, "intermediate_size")), ("head_dim", d)):
            try:
                hadamard_factors(n)
            except UserError as err:
                raise RecipeError(f"ptq.rotation: the model's {field} is {n}; {err}") from None


def serving_notes(recipe) -> list[str]:
    """One line for each export an engine will not run as written (not an error: the export is valid);
    `rqat run` prints them under its plan when the plan exports."""
    from ..serving import vllm_refuses_packed

    if "compressed-tensors" not in recipe.export.formats:
        return []
    q = recipe.quant
    bits = sorted(set(q.bits) | q.override_bits)
    notes = [f"export.formats: the {b}-bit compressed-tensors export is written, but {why}"
             for b in bits if (why := vllm_refuses_packed(b, q.symmetric, recipe.ptq.gptq_act_order))]
    if 3 in bits:
        notes.append("export.formats: 3-bit compressed-tensors is written in the format's dense layout (what vLLM and "
                     "compressed-tensors >= 0.18 read); transformers with compressed-tensors 0.17 cannot run it: use "
                     "the dequantized export there")
    return notes
