"""calibrate stage: the QAT training set, and the PTQ calibration set drawn from it (domain-matched).

The QAT set is built once here (data/qat_data.py: lazy source, trace selection, tokenization by
the chat template, length policy) and saved as `qat_data/`; the qat stage trains on that copy, and
`reasoning` calibration windows are cut from the very same token sequences, so PTQ sees the domain
and format QAT trains on. `generic` is plain text (the baseline); it is also built when the ptq
stage is asked for the `gptq_generic` baseline. With `qat.data.responses: teacher` this stage first
has the teacher write the responses (resumable); with `qat.kd.teacher: cached` it last stores the teacher's
top-k log-probabilities on the QAT set (`teacher_topk/`, data/teacher_cache.py).
"""

from __future__ import annotations

import hashlib

from safetensors.torch import save_file

from ..data.calibration import domain_calibration, generic_calibration
from ..data.qat_data import save_tokenized, select_traces, tokenize_traces
from ..pipeline import StageContext
from .common import load_teacher_tokenizer, open_source, qat_data_origin, source_rows, teacher_source
from .specs import engine_settings, generation_spec, recipe_keys, trace_spec


def run(ctx: StageContext) -> dict:
    """The calibrate stage: the QAT set (teacher-written first when asked) and the calibration windows."""
    r, c = ctx.recipe, ctx.recipe.calibration
    tok = load_teacher_tokenizer(ctx)
    extra = {}
    qat_data, stats = build_qat_data(ctx, tok)
    save_tokenized(qat_data, ctx.layout.qat_data())
    extra["qat_data"] = stats
    sets = {}
    if c.domain == "reasoning":
        sets["main"] = domain_calibration(qat_data, c.num_samples, c.seq_len, c.seed)
    if c.domain == "generic" or "gptq_generic" in r.ptq.baselines:
        with recipe_keys("calibration"):
            sets["generic"] = generic_calibration(tok, c.generic_source, c.num_samples, c.seq_len, c.seed, c.generic_subset)
    if c.domain == "generic":
        sets["main"] = sets["generic"].clone()  # safetensors refuses two names for one tensor
    save_file({k: v.contiguous() for k, v in sets.items()}, str(ctx.layout.calibration_file()))
    if r.qat.enabled and r.qat.kd.teacher == "cached":
        extra["teacher_cache"] = write_cached_teacher(ctx, qat_data)
    return {
        name: {"shape": list(t.shape), "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]}
        for name, t in sets.items()
    } | {"domain": c.domain, **(qat_data_origin(r) if c.domain == "reasoning" else {})} | extra


def write_cached_teacher(ctx: StageContext, qat_data) -> dict:
    """The teacher's top-k log-probabilities on every QAT response token (`qat.kd.teacher: cached`), written
    once here so the qat stage loads no teacher; resumable by shard. Returns the cache's manifest."""
    import torch

    from ..data.teacher_cache import write_teacher_cache
    from ..models import best_device

    r, kd = ctx.recipe, ctx.recipe.qat.kd
    device = best_device()
    src = teacher_source(ctx)
    backend = kd.cache_backend
    if backend == "auto":
        from ..evaluation.backends import vllm_problem

        backend = "vllm" if "cuda" in device and kd.temperature == 1.0 and vllm_problem() is None else "transformers"
    with recipe_keys("qat.kd", rename={"backend": "cache_backend"}):  # the engine's errors name the key that chose it
        if backend == "vllm":
            from ..evaluation.backends import VLLMBackend

            teacher = VLLMBackend(src.id, src.trust_remote_code, r.seed, engine_settings(r), max_logprobs=kd.cache_top_k)
        else:
            teacher = src.model(torch.bfloat16 if "cuda" in device else torch.float32, device).eval()
        try:
            return write_teacher_cache(teacher, qat_data, ctx.layout.teacher_cache(), kd.cache_top_k, kd.temperature,
                                       batch_size=r.qat.batch_size if backend == "transformers" else 1024,
                                       chunk_size=kd.chunk_size, info={"engine": backend, "device": device})
        finally:
            if hasattr(teacher, "close"):
                teacher.close()
            del teacher


def build_qat_data(ctx: StageContext, tok):
    """The tokenized QAT set and its statistics (kept, dropped and why, truncated, lengths)."""
    from datasets import Dataset

    data = ctx.recipe.qat.data
    spec, timing = trace_spec(data), {}
    if data.responses == "teacher":
        rows = write_teacher_data(ctx, timing)
        traces = Dataset.from_list([{"prompt": x["prompt"], "response": x["response"], "answer": x.get("answer"),
                                     "status": "kept"} for x in rows])
    else:
        ds = open_source(ctx, data)
        with recipe_keys("qat.data"):
            traces = select_traces(ds, spec, tokenizer=tok)
    with recipe_keys("qat.data"):
        tokenized, stats = tokenize_traces(traces, tok, spec)
    if data.responses == "teacher":
        stats["teacher_responses"] = {"rows": len(rows), "kept_by": data.generation.keep, **timing}
    return tokenized, stats


def write_teacher_data(ctx: StageContext, timing: dict | None = None) -> list[dict]:
    """Have the teacher write the QAT responses (resumable); `timing` receives the engine, tokens and seconds."""
    from ..data.teacher_responses import generate_teacher_responses
    from ..evaluation.backends import make_backend

    r, data = ctx.recipe, ctx.recipe.qat.data
    g = data.generation
    src = teacher_source(ctx)
    with recipe_keys("qat.data.generation"):  # the engine's errors name the key that chose it
        engine = make_backend(g.backend, src.id, g.batch_size, src.trust_remote_code, r.seed, engine_settings(r))
    if timing is not None:
        timing["engine"] = type(engine).__name__
    try:
        rows = source_rows(ctx, data, engine.tokenizer, prompts_only=True)
        with recipe_keys("qat.data"):
            return generate_teacher_responses(engine, rows, ctx.layout.teacher_responses(), generation_spec(data), r.seed,
                                              timing)
    finally:
        engine.close()
