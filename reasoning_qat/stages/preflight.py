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


# Rows a preflight reads of a local .jsonl: all of a file up to this size (a cheap pass), else the first ones.
_FULL_CHECK_BYTES = 64 << 20
_FIRST_ROWS = 10_000


def _check_rows(field: str, data, needs: list[tuple[str, str]]) -> None:
    """A local QAT / RL source that cannot serve is refused before any stage: a directory that `save_to_disk` did
    not write, a .jsonl line that is not a JSON object, or a row without a field the recipe names (`needs`: the
    recipe keys and the column names they give). A .jsonl is read whole up to 64 MB, else its first 10,000 rows
    (and `max_samples` rows at most: the rest is never read)."""
    import json
    from pathlib import Path

    from ..data import is_saved_dataset
    from ..models import looks_like_path
    from ..recipe import RecipeError

    source = data.source
    if source == "demo" or not looks_like_path(source):
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not is_saved_dataset(path):
            raise RecipeError(f"{field}: {source!r} is a directory that datasets' save_to_disk did not write (no "
                              "dataset_info.json or dataset_dict.json); give a .jsonl file or a save_to_disk directory")
        return
    if not source.endswith(".jsonl"):
        return
    limit = data.max_samples or (None if path.stat().st_size <= _FULL_CHECK_BYTES else _FIRST_ROWS)
    rows = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecipeError(f"{field}: {source}:{lineno} is not valid JSON ({err.msg}, column {err.colno}); "
                                  "fix that line (one JSON object per line)") from None
            if not isinstance(row, dict):
                raise RecipeError(f"{field}: {source}:{lineno} is a JSON {type(row).__name__}, not an object "
                                  "(one {\"field\": value} object per line)")
            for key, column in needs:
                if column not in row:
                    raise RecipeError(f"{field.removesuffix('source')}{key}: {source}:{lineno} has no field "
                                      f"{column!r} (its fields: {', '.join(sorted(row)) or 'none'}); set "
                                      f"{field.removesuffix('source')}{key} to one of them")
            rows += 1
            if limit and rows >= limit:
                break
    if rows == 0:
        raise RecipeError(f"{field}: {source} holds no rows; give a .jsonl with one JSON object per line")


# transformers' `report_to` integrations and the module each needs (transformers.integrations.INTEGRATION_TO_CALLBACK)
_REPORTERS = {"azure_ml": "azureml.core", "clearml": "clearml", "codecarbon": "codecarbon", "comet_ml": "comet_ml",
              "dagshub": "dagshub", "dvclive": "dvclive", "flyte": "flytekit", "kubeflow": "kubeflow",
              "mlflow": "mlflow", "neptune": "neptune", "swanlab": "swanlab", "tensorboard": "tensorboard",
              "trackio": "trackio", "wandb": "wandb"}


def _check_report_to(field: str, names: list[str]) -> None:
    """A `report_to` name transformers does not know, or whose package is not installed, is refused here (the
    Trainer would raise it only once the teacher or the QAT student is loaded). Torch-free: find_spec only."""
    import difflib
    import importlib.util

    from ..recipe import RecipeError

    for name in names:
        if name in ("none", "all"):
            continue
        if name not in _REPORTERS:
            close = difflib.get_close_matches(name, list(_REPORTERS), n=1)
            raise RecipeError(f"{field}: {name!r} is not a transformers report_to integration"
                              + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" (known: {', '.join(sorted(_REPORTERS))})")
        module = _REPORTERS[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a dotted module whose parent package is missing
            found = False
        if not found and not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            raise RecipeError(f"{field}: {name} needs the {module.split('.')[0]} package, which is not installed "
                              f"(pip install {module.split('.')[0]}); or drop {name!r} from {field}")


def _visible_cuda_gpus() -> int:
    """NVIDIA GPUs this process may use, without importing torch: the driver's /proc entries, narrowed by
    CUDA_VISIBLE_DEVICES."""
    import os
    from pathlib import Path

    gpus = Path("/proc/driver/nvidia/gpus")
    n = len(list(gpus.iterdir())) if gpus.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]))
    return n


def _check_distributed(recipe) -> None:
    from ..recipe import RecipeError

    q = recipe.qat
    if q.enabled and q.distributed == "fsdp2" and _visible_cuda_gpus() == 0:
        raise RecipeError("qat.distributed: fsdp2 shards over CUDA GPUs, and this machine has none visible; use ddp "
                          "(gloo on CPU) or run on a GPU machine")


def _check_gguf(ref: str | None) -> None:
    """transformers reads a .gguf file through the `gguf` package; without it the teacher stage would end in
    transformers' ImportError traceback."""
    import importlib.util

    from ..recipe import RecipeError

    if not (ref and ref.endswith(".gguf")):
        return
    try:
        missing = importlib.util.find_spec("gguf") is None
    except (ValueError, ImportError):  # present in sys.modules as None: marked unimportable
        missing = True
    if missing:
        raise RecipeError(f"model.id: {ref} is a GGUF file, which transformers reads through the gguf package; "
                          "pip install gguf")


def _check_generic_text(recipe) -> None:
    """A local generic-text file that holds no text, where generic calibration uses it, is refused here."""
    from pathlib import Path

    from ..recipe import RecipeError

    c = recipe.calibration
    path = Path(c.generic_source).expanduser()
    used = c.domain == "generic" or "gptq_generic" in (recipe.ptq.method, *recipe.ptq.baselines)
    if used and path.is_file():
        with open(path, encoding="utf-8", errors="replace") as f:
            if not f.read(1 << 20).strip():
                raise RecipeError(f"calibration.generic_source: {c.generic_source} holds no text; give a file of "
                                  "plain text (or builtin)")


def _has_chat_template(ref: str) -> bool | None:
    """Whether the model `ref` names ships a chat template: a GGUF file's `tokenizer.chat_template` metadata, a
    local directory's chat_template.jinja / chat_template.json / tokenizer_config.json; None where this cannot
    be told without asking the hub."""
    import json
    from pathlib import Path

    path = Path(ref).expanduser()
    if ref.endswith(".gguf") and path.is_file():
        # numpy only; it reads every metadata field: ~4 s at 49k tokens, ~13 s at 262k
        from gguf import GGUFReader

        return "tokenizer.chat_template" in GGUFReader(str(path)).fields
    if not path.is_dir():
        return None
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return None


def _check_chat_template(ref: str | None) -> None:
    """Every stage formats text through the model's chat template (QAT data, calibration windows, eval
    prompts): a base model without one (Gemma-3-270M's GGUF) is refused here, not in the calibrate stage."""
    from ..recipe import RecipeError

    if ref and _has_chat_template(ref) is False:
        raise RecipeError(f"model.id: {ref} has no chat template (a base model?), and every stage formats its "
                          "prompts through one; use the instruction-tuned model, or a model directory whose "
                          "tokenizer ships a chat template")


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
    _check_gguf(model_cfg.id)
    _check_chat_template(model_cfg.id)
    _check_attention(model_cfg.attn_implementation)
    _check_run_root(recipe.run_root)
    _check_report_to("report_to", recipe.report_to)
    _check_report_to("qat.report_to", recipe.qat.report_to)
    _check_distributed(recipe)
    for field, data in (("qat.data.source", recipe.qat.data), ("rl.data.source", recipe.rl.data)):
        if data.source == "demo" and model_cfg.demo is None and (field.startswith("qat") or recipe.rl.enabled):
            raise RecipeError(f"{field}: 'demo' needs the demo teacher (model.demo); give a .jsonl file or a hub dataset id")
        if field.startswith("qat") or recipe.rl.enabled:  # qat.data also feeds the domain calibration
            _check_local(field, data.source)
            _check_rows(field, data, _needed_fields(field, data))
            _check_verifiable(field.removesuffix(".source"), data)
    _check_local("calibration.generic_source", recipe.calibration.generic_source)
    _check_generic_text(recipe)
    with recipe_keys("eval"):  # a task's SpecError (`tasks`, `task_options.NAME`) named as the recipe writes it
        _check_tasks(recipe)
    _check_model_shapes(recipe)
    return serving_notes(recipe)


def _needed_fields(field: str, data) -> list[tuple[str, str]]:
    """(recipe key, column) pairs every row of a QAT / RL source must have."""
    needs = [("prompt_field", data.prompt_field)]
    if field.startswith("qat") and data.responses == "dataset":
        needs.append(("response_field", data.response_field))
    if field.startswith("rl"):
        needs.append(("answer_field", data.answer_field))  # the graded reward
    elif data.responses == "teacher" and data.generation.keep == "correct":
        needs.append(("answer_field", data.answer_field))
    return needs


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
    from ..errors import SpecError
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
    _check_sizes(recipe, config)
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
            except SpecError as err:
                raise RecipeError(f"ptq.rotation: the model's {field} is {n}; {err.message}") from None


def _check_sizes(recipe, config) -> None:
    """Sizes the model cannot take: calibration windows longer than its context, a cached teacher keeping more
    tokens per position than its vocabulary has. Fields a config does not give are not checked."""
    from ..architecture import config_int
    from ..recipe import RecipeError

    def field(key):
        try:
            return config_int(config, key)
        except ValueError:
            return None

    context = field("max_position_embeddings")
    if context and recipe.calibration.seq_len > context:
        raise RecipeError(f"calibration.seq_len: {recipe.calibration.seq_len} tokens is over the model's context of "
                          f"{context} (max_position_embeddings); use at most {context}")
    vocab = field("vocab_size")
    kd = recipe.qat.kd
    if recipe.qat.enabled and kd.teacher == "cached" and vocab and kd.cache_top_k > vocab:
        raise RecipeError(f"qat.kd.cache_top_k: {kd.cache_top_k} is more tokens than the model's vocabulary of "
                          f"{vocab}; use at most {vocab} (or teacher: online)")


def serving_notes(recipe) -> list[str]:
    """One line for each export an engine installed here will not run as written (not an error: the export is
    valid); `rqat run` prints them under its plan when the plan exports. Engines that are not installed get no
    note: a machine without vLLM hears nothing of what vLLM serves."""
    import importlib.metadata
    import importlib.util

    from ..serving import vllm_refuses_packed

    if "compressed-tensors" not in recipe.export.formats:
        return []
    q = recipe.quant
    bits = sorted(set(q.bits) | q.override_bits)
    notes = [f"export.formats: the {b}-bit compressed-tensors export is written, but {why}"
             for b in bits if (why := vllm_refuses_packed(b, q.symmetric, recipe.ptq.gptq_act_order))] \
        if importlib.util.find_spec("vllm") else []
    try:
        ct = tuple(int(x) for x in importlib.metadata.version("compressed-tensors").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        ct = None
    if 3 in bits and ct is not None and ct < (0, 18):
        notes.append("export.formats: 3-bit compressed-tensors is written in the format's dense layout (what vLLM and "
                     "compressed-tensors >= 0.18 read); transformers with compressed-tensors 0.17 cannot run it: use "
                     "the dequantized export there")
    return notes
