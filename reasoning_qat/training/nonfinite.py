"""Non-finite steps: skipped (with a record on disk of where the NaN/inf was), a run stopped after several
in a row, and SDPA's cuDNN kernels switched off where their backward returns NaN query gradients."""

from __future__ import annotations

import contextlib
from pathlib import Path


def skip_nonfinite_steps(optimizer, stats: dict, limit: int = 3, what: str = "training", names: dict | None = None,
                         losses: list | None = None, probes: dict | None = None, before_clipping: dict | None = None,
                         on_skip=None, batches: list | None = None):
    """Make `optimizer.step` skip a step whose gradients hold a NaN or inf (the gradients are
    dropped, the weights and the optimizer's moments stay as they were) instead of writing NaN into
    the weights: a GRPO step can end with NaN gradients (the GPU organism's RL from W3 RTN, seed 1,
    step 16), and the next rollout's sampling then dies on a device-side assert.
    `stats["skipped_nonfinite_steps"]` counts the skips and `stats["nonfinite_steps"]` says what each
    held: the optimizer step (1-based), how many parameters had a non-finite gradient, the first few
    by name (`names`: {id(parameter): name}), whether NaN, inf or both, and where it entered
    (`_where_nonfinite`). `losses`: a list the trainer appends each micro-batch's loss to (a float or a
    0-d tensor, read only when a step is skipped, so the hot path waits on no device); every step takes and
    empties it, and a skipped step's record says whether they were finite (`loss_finite`:
    False means the NaN was already in the forward) and lists them (`micro_batch_losses`, "nan"/"inf"
    as strings). `probes`: {name: list} the trainer appends whether a gradient it watches was finite to (a bool
    or a 0-d bool tensor per backward, e.g. the gradient reaching the LM head's output); every step empties
    them, and a skipped step's record has `<name>_finite` (None when no backward reached the probe).
    `before_clipping`: the dict `watch_gradients_before_clipping` fills; where given, the record's parameters
    are those whose gradient was non-finite before gradient clipping (after it, every one is). `on_skip`: called
    with each skipped step's record as soon as it is made (the rl stage writes it to disk: a run cut off before
    its end keeps it). `batches`: a list the trainer appends one dict per micro-batch to (its shape, e.g. the padded
    sequence length; values may be 0-d tensors, read only when a step is skipped); every step empties it, and a
    skipped step's record lists them (`micro_batches`). `limit` in a row raise TrainingDiverged."""
    import math

    import torch

    from ..errors import TrainingDiverged

    stats.setdefault("skipped_nonfinite_steps", 0)
    in_a_row = calls = 0

    def drain(items: list) -> list:
        """This step's entries; the trainer's list starts empty for the next step."""
        out = [*items]
        items.clear()
        return out
    step = optimizer.step

    def guarded(*args, **kwargs):
        nonlocal in_a_row, calls
        calls += 1
        step_losses = None if losses is None else drain(losses)
        step_probes = {k: drain(v) for k, v in (probes or {}).items()}
        step_batches = None if batches is None else drain(batches)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        # the parameters that were non-finite before clipping, where clipping ran this step: it took the norm
        # already, and clipping a finite gradient leaves it finite, so the norm is not taken again
        seen = (before_clipping or {}).pop("nonfinite", None)
        nonfinite = bool(seen) if seen is not None else bool(
            params and not torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params])))
        if params and nonfinite:
            bad = [p for p in params if (id(p) in seen if seen is not None else not torch.isfinite(p.grad).all())]
            stats["skipped_nonfinite_steps"] += 1
            forward = {}
            if step_losses is not None:
                values = [float(x) for x in step_losses]
                forward = {"loss_finite": all(math.isfinite(x) for x in values),
                           "micro_batch_losses": [x if math.isfinite(x) else str(x) for x in values]}
            record = {
                "step": calls, "parameters": len(bad), **forward,
                **{f"{k}_finite": all(bool(x) for x in v) if v else None for k, v in step_probes.items()},
                **({"micro_batches": [{k: v.item() if hasattr(v, "item") else v for k, v in b.items()}
                                      for b in step_batches]} if step_batches is not None else {}),
                "first": [(names or {}).get(id(p), f"#{i}") for i, p in enumerate(bad[:6])],
                **_where_nonfinite(names or {}, {id(p) for p in params}, {id(p) for p in bad}),
                "nan": any(bool(torch.isnan(p.grad).any()) for p in bad),
                "inf": any(bool(torch.isinf(p.grad).any()) for p in bad)}
            stats.setdefault("nonfinite_steps", []).append(record)
            if on_skip is not None:
                on_skip(record)
            in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            if in_a_row >= limit:
                raise TrainingDiverged(f"{what}: {limit} steps in a row had NaN/inf gradients; the weights were "
                                       "left as they were (last checkpoint kept): lower the learning rates or "
                                       "start from a better init")
            return None
        in_a_row = 0
        return step(*args, **kwargs)

    optimizer.step = guarded
    return optimizer


@contextlib.contextmanager
def sdpa_cudnn(enabled: bool):
    """Let PyTorch's SDPA pick its cuDNN kernels (`enabled`) or not while a training stage runs, and put the
    flag back as it was afterwards (`torch.backends.cuda.enable_cudnn_sdp`, process-wide; no effect on CPU).

    Why off by default (recipe `model.cudnn_sdpa: false`): on H100/H200 with torch >= 2.11, where cuDNN is
    SDPA's default backend, its backward returns NaN in the query gradient (forward, key and value gradients
    finite) when an explicit mask is passed, the padded sequence length is 64 mod 128 and a query row's
    logsumexp is below -88.7, which a fully masked row is (the pad positions of a left-padded prompt: a GRPO
    micro-batch of prompts of different lengths has them). The padded half of the last 128-wide key tile is
    scored 0 instead of -inf, so exp(0 - lse) overflows. pytorch/pytorch#196678, huggingface/trl#7181; the kernel fix is
    NVIDIA/cudnn-frontend#628. With cuDNN off, SDPA runs flash or memory-efficient attention: the same function."""
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def append_record(path, record: dict) -> None:
    """Append `record` to the JSON-lines file `path` and force it to disk (flush + fsync), so it survives
    the process being killed right after; `read_records` skips a last line cut off half-way."""
    import json
    import os

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(path) -> list[dict]:
    """The records `append_record` wrote to `path` ([] when there is no file); a line that is not JSON
    (a write cut off by a crash) is skipped."""
    import json

    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def watch_gradients_before_clipping(accelerator, seen: dict) -> None:
    """Note which parameters hold a non-finite gradient before `accelerator.clip_grad_norm_` (the call
    transformers' Trainer clips with), as `seen["nonfinite"]` (a set of parameter ids, empty while the norm is
    finite). Clipping multiplies every gradient by max_norm / total norm, which is NaN as soon as one gradient
    is, so afterwards every parameter's gradient is NaN and `skip_nonfinite_steps` (given `seen` as
    `before_clipping`) could no longer say where the NaN entered. The norm taken here replaces the guard's own
    check of the step, so a step still takes two gradient norms (this and the clipping's)."""
    import torch

    clip = accelerator.clip_grad_norm_

    def watched(parameters, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        finite = not parameters or torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in parameters]))
        seen["nonfinite"] = set() if finite else {id(p) for p in parameters if not torch.isfinite(p.grad).all()}
        return clip(parameters, *args, **kwargs)

    accelerator.clip_grad_norm_ = watched


def _where_nonfinite(names: dict, with_grad: set, bad: set) -> dict:
    """Where a non-finite gradient entered the backward, which runs from the loss down: the
    parameters above the decoder layers (final norm, head) whose gradient is non-finite
    (`above_layers`; empty when it entered inside the layers), the highest decoder layer holding
    one (`deepest_layer`), and that layer's parameters split into non-finite and finite (e.g. q/k/v
    projections and the input norm non-finite with o_proj and the MLP finite: it entered in that
    layer's attention backward). Names are those of `model.named_parameters()`."""
    import re

    def layer(name):
        m = re.search(r"layers\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    bad_names = [n for pid, n in names.items() if pid in bad]
    layers = [layer(n) for n in bad_names if layer(n) is not None]
    out = {"above_layers": [n for n in bad_names if layer(n) is None and "embed" not in n],
           "deepest_layer": max(layers) if layers else None}
    if layers:
        prefix = re.compile(rf".*layers\.{out['deepest_layer']}\.")
        inside = [(prefix.sub("", n), pid in bad) for pid, n in names.items()
                  if pid in with_grad and layer(n) == out["deepest_layer"]]
        out["deepest_layer_nonfinite"] = [n for n, b in inside if b]
        out["deepest_layer_finite"] = [n for n, b in inside if not b]
    return out
