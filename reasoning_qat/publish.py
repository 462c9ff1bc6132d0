"""Publishing one variant of a finished run: a folder that loads as it is in its engine (compressed-tensors in
vLLM, the dequantized checkpoint in transformers), with a model card built and checked through
huggingface_hub's own `ModelCard` / `ModelCardData` (YAML metadata, the eval results in `model-index` form so
the hub shows them, the recipe that made the model, how to serve it, the run's lineage), and, with a repo id,
uploaded through `HfApi.create_repo` + `upload_folder` (token from the environment).

    rqat publish runs/qwen3-0.6b-w3g128 w3-qat --to out/qwen3-0.6b-w3g128 [--repo-id ORG/NAME]
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError
from .models import looks_like_path
from .run_layout import RunLayout, Variant

FORMATS = ("auto", "compressed-tensors", "dequantized")


def pick_format(layout: RunLayout, v: Variant, recipe, fmt: str = "auto") -> str:
    """The export to publish: `auto` takes the packed compressed-tensors export where vLLM serves the scheme
    packed, else the dequantized one. Raises UserError when the run has no such export."""
    from .serving import act_ordered_export, vllm_refuses_variant

    if fmt == "auto":
        ct = layout.export(v, "compressed-tensors")
        packed = ct.is_dir() and not vllm_refuses_variant(v.bits, recipe.quant.override_bits, recipe.quant.symmetric,
                                                          act_ordered_export(ct))
        fmt = "compressed-tensors" if packed else "dequantized"
    if not layout.export(v, fmt).is_dir():
        have = sorted(p.name for p in layout.export(v).iterdir()) if layout.export(v).is_dir() else []
        raise UserError(f"--format {fmt}: the run has no {fmt} export of {v} (exports: {', '.join(have) or 'none'}); "
                        "run the export stage with it in export.formats")
    return fmt


def _sampling(recipe, task_name: str) -> str:
    from .evaluation.tasks import load_task

    task = load_task(task_name, recipe.eval.task_options.get(task_name))
    s, e = task.sampling, recipe.eval
    temperature = s.temperature if e.temperature is None else e.temperature
    samples = e.samples if e.samples > 1 else task.samples
    return (f"temperature {temperature}, top-p {s.top_p}, top-k {s.top_k}, up to {e.max_new_tokens or s.max_new_tokens} "
            f"new tokens, {samples} sample(s) per problem")


def model_card(run_dir: str | Path, variant: str | Variant, fmt: str, repo_id: str | None = None):
    """The huggingface_hub ModelCard of one variant: metadata (base model, library, quantization tags, the
    eval results as model-index), then the recipe, the eval table beside BF16 and the PTQ baselines (pass@1
    with 95% CIs and the sampling), how to serve it, and the lineage (each stage's manifest fingerprint).
    Raises UserError when the run has not evaluated the variant."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .compare import collect
    from .pipeline import recipe_from_run

    layout, v = RunLayout(run_dir), variant if isinstance(variant, Variant) else Variant.parse(variant)
    recipe = recipe_from_run(run_dir)
    evals = layout.stage_metrics("eval")
    if str(v) not in evals:
        raise UserError(f"{run_dir}: {v} has no finished evaluation; run `rqat run RECIPE --stages eval` first")
    q, name = recipe.quant, repo_id.split("/")[-1] if repo_id else f"{recipe.name}-{v}"
    scheme = f"W{v.bits}{'G' + str(q.group_size) if q.group_size != -1 else ' per-channel'}" + \
        (f"A{q.activations.bits}" if q.activations else "") + (f"KV{q.kv_cache.bits}" if q.kv_cache else "")
    results = [EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type="pass@1",
                          metric_name="pass@1", metric_value=round(m["pass@1"], 4))
               for task, m in evals[str(v)].items()]
    # the demo teacher is this project's own (Apache-2.0); a quantized model keeps its base model's license
    license_ = {"license": "apache-2.0"} if recipe.model.id is None else {"license": "other", "license_name": "base-model-license"}
    if recipe.model.id is not None and not looks_like_path(recipe.model.id):  # a hub id: its page holds the license
        license_["license_link"] = f"https://huggingface.co/{recipe.model.id}"
    data = ModelCardData(
        model_name=name, base_model=recipe.model.id, library_name="transformers", pipeline_tag="text-generation",
        **license_,
        tags=["reasoning-qat", "quantized", f"{v.bits}-bit", scheme.lower(), fmt,
              *(["symmetric"] if q.symmetric else ["asymmetric"]), *([] if v.method in ("rtn", "gptq") else ["qat"])],
        eval_results=results)
    # the compare table's rows (its labels: calibration domain, KD or CE, init) of this variant, BF16 and the
    # PTQ baselines at the same bit width
    shown = [r for r in collect([run_dir]) if r["method"] == "bf16" or
             (r["bits"] == v.bits and r["method"] in (v.method, "rtn", "gptq", "gptq_generic"))]
    label = next(r["label"] for r in shown if r["method"] == v.method)
    rows = [f"| {r['label']} | {16 if r['method'] == 'bf16' else r['bits']} | {r['task']} | {r['pass@1']:.3f} ± "
            f"{r['ci95']:.3f} |" for r in shown]
    qat = layout.stage_metrics("qat").get(str(Variant(v.bits, "qat")), {})
    lineage = "\n".join(f"- {stage}: `{m['fingerprint']}` ({m.get('finished_at', '?')})" for stage in
                        ("teacher", "calibrate", "ptq", "qat", "rl", "export", "eval") if (m := layout.manifest(stage)))
    where = repo_id or "THIS_FOLDER"
    stored = {"dequantized": "full-size weights (the model's dtype) whose values lie on the quantization grid: any "
                             "engine loads them, they take the BF16 model's memory, and they compute the quantized "
                             "function exactly",
              "compressed-tensors": "packed integer weights with their scales (compressed-tensors' pack-quantized "
                                    "format): the memory of the bit width; vLLM serves it with its low-bit kernels",
              "gptq": "GPTQ v1 packed weights (symmetric 4/8-bit)"}[fmt]
    use = (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
           f'model = AutoModelForCausalLM.from_pretrained("{where}", dtype="{recipe.model.dtype}")\n'
           f'tokenizer = AutoTokenizer.from_pretrained("{where}")')
    text = f"""---
{data.to_yaml()}
---

# {name}

{f"`{recipe.model.id}`" if recipe.model.id else "The reasoning-qat demo teacher"} quantized to **{scheme}**
({'symmetric' if q.symmetric else 'asymmetric'}) by reasoning-qat: {label}, stored as `{fmt}`: {stored}.

License: {"Apache-2.0 (the reasoning-qat demo teacher)" if recipe.model.id is None else f"that of the base model, `{recipe.model.id}`"}.

## How it was made

- calibration: {recipe.calibration.domain} ({recipe.calibration.num_samples} x {recipe.calibration.seq_len} tokens)
- PTQ: {recipe.ptq.method}{' (act-order)' if recipe.ptq.act_order else ''}{', Hadamard rotation' if recipe.ptq.rotation != 'none' else ''}, the QAT initialisation: {recipe.qat.init}
- QAT: {f"{recipe.qat.kd.loss} from the BF16 teacher, {qat.get('steps', recipe.qat.max_steps)} steps x {recipe.qat.batch_size} sequences of up to {recipe.qat.data.max_length} tokens" if recipe.qat.enabled else 'none'}
- RL: {f'GRPO, {recipe.rl.max_steps} steps from {recipe.rl.init}' if recipe.rl.enabled else 'none'}

## Evaluation (pass@1, 95% CI)

| method | bits | task | pass@1 |
|---|---|---|---|
{chr(10).join(rows)}

Sampling: {'; '.join(f'{t}: {_sampling(recipe, t)}' for t in evals[str(v)])}.

## Use

Serve it (vLLM's OpenAI-compatible server):

```
vllm serve {where}
```

Or load it in Python:

```python
{use}
```

## Lineage (stage manifest fingerprints of run `{recipe.name}`)

{lineage}
"""
    return ModelCard(text)


def publish(run_dir: str | Path, variant: str, to: str | Path, fmt: str = "auto", repo_id: str | None = None,
            private: bool = True) -> Path:
    """Write the variant's export and its model card into `to` (atomically: a `.partial` folder renamed into
    place), and upload it to `repo_id` when given. Refuses before writing anything when an upload is asked
    for while the hub is off, when `to` exists, or when the run lacks the export or the evaluation."""
    from huggingface_hub import constants

    from .pipeline import recipe_from_run

    to = Path(to)
    if repo_id and constants.HF_HUB_OFFLINE:  # as models.resolve_model reads it
        raise UserError(f"--repo-id {repo_id}: the hub is off (HF_HUB_OFFLINE); publish to a folder with --to alone, "
                        "then upload it where the hub can be reached")
    if to.exists():
        raise UserError(f"--to {to}: already exists; choose a new folder (nothing was written)")
    layout, v = RunLayout(run_dir), Variant.parse(variant)
    fmt = pick_format(layout, v, recipe_from_run(run_dir), fmt)
    card = model_card(run_dir, v, fmt, repo_id)
    partial = to.with_name(f".{to.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(layout.export(v, fmt), partial)
    card.save(partial / "README.md")
    partial.rename(to)
    if repo_id:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(to), commit_message=f"reasoning-qat: {v} ({fmt})")
    return to
