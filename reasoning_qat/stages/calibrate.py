"""calibrate stage: the PTQ calibration set, domain-matched by default.

`reasoning` draws from the very data the QAT stage trains on (qat.data), formatted with the chat
template and thinking exactly as at inference; `generic` is plain text (the baseline). When the
ptq stage is asked for the `gptq_generic` baseline, the generic set is built as well.
"""

from __future__ import annotations

import hashlib

from safetensors.torch import save_file

from ..data.calibration import domain_calibration, generic_calibration
from ..pipeline import StageContext
from .common import load_teacher_tokenizer, reasoning_rows

CALIBRATION_FILE = "calibration.safetensors"


def run(ctx: StageContext) -> dict:
    r, c = ctx.recipe, ctx.recipe.calibration
    tok = load_teacher_tokenizer(ctx)
    sets = {}
    if c.domain == "reasoning":
        sets["main"] = domain_calibration(tok, reasoning_rows(ctx, r.qat.data), c.num_samples, c.seq_len, c.seed)
    if c.domain == "generic" or "gptq_generic" in r.ptq.baselines:
        sets["generic"] = generic_calibration(tok, c.generic_source, c.num_samples, c.seq_len, c.seed, c.generic_subset)
    if c.domain == "generic":
        sets["main"] = sets["generic"].clone()  # safetensors refuses two names for one tensor
    save_file({k: v.contiguous() for k, v in sets.items()}, str(ctx.out / CALIBRATION_FILE))
    return {
        name: {"shape": list(t.shape), "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]}
        for name, t in sets.items()
    } | {"domain": c.domain}
