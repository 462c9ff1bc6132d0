"""calibrate stage: the PTQ calibration set, domain-matched by default.

`reasoning` draws from the very data the QAT stage trains on (qat.data), formatted with the chat
template and thinking exactly as at inference; `generic` is plain text (the baseline). When the
ptq stage is asked for the `gptq_generic` baseline, the generic set is built as well. With
`qat.data.responses: teacher` this stage first has the teacher write those responses
(resumable), so calibration and QAT share them.
"""

from __future__ import annotations

import hashlib

from safetensors.torch import save_file

from ..data.calibration import domain_calibration, generic_calibration
from ..pipeline import StageContext
from .common import TEACHER_DATA, load_teacher_tokenizer, reasoning_rows, source_rows, teacher_path

CALIBRATION_FILE = "calibration.safetensors"


def run(ctx: StageContext) -> dict:
    r, c = ctx.recipe, ctx.recipe.calibration
    tok = load_teacher_tokenizer(ctx)
    extra = {}
    if r.qat.data.responses == "teacher":
        rows = write_teacher_data(ctx)
        extra["teacher_data"] = {"rows": len(rows), "kept_by": r.qat.data.generation.keep}
    else:
        rows = reasoning_rows(ctx, r.qat.data)
    sets = {}
    if c.domain == "reasoning":
        sets["main"] = domain_calibration(tok, rows, c.num_samples, c.seq_len, c.seed)
    if c.domain == "generic" or "gptq_generic" in r.ptq.baselines:
        sets["generic"] = generic_calibration(tok, c.generic_source, c.num_samples, c.seq_len, c.seed, c.generic_subset)
    if c.domain == "generic":
        sets["main"] = sets["generic"].clone()  # safetensors refuses two names for one tensor
    save_file({k: v.contiguous() for k, v in sets.items()}, str(ctx.out / CALIBRATION_FILE))
    return {
        name: {"shape": list(t.shape), "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]}
        for name, t in sets.items()
    } | {"domain": c.domain} | extra


def write_teacher_data(ctx: StageContext) -> list[dict]:
    from ..data.teacher_responses import generate_teacher_responses
    from ..evaluation.backends import EngineSettings, make_backend

    r, data = ctx.recipe, ctx.recipe.qat.data
    g = data.generation
    engine = make_backend(g.backend, teacher_path(ctx), g.batch_size, r.model.trust_remote_code, r.seed,
                          EngineSettings.from_config(r.eval))
    try:
        return generate_teacher_responses(engine, source_rows(ctx, data, prompts_only=True), ctx.out / TEACHER_DATA, g, r.seed)
    finally:
        engine.close()
