"""Helpers shared by the trainers (teacher SFT, KD-QAT, GRPO)."""

from __future__ import annotations

import contextlib
from pathlib import Path

SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup", "wsd": "warmup_stable_decay"}


def schedule_args(schedule: str, steps: int, decay_ratio: float) -> dict:
    """TrainingArguments for a recipe's `schedule` (cosine, constant, wsd with its decay fraction)."""
    return {"lr_scheduler_type": SCHEDULES[schedule],
            "lr_scheduler_kwargs": {"num_decay_steps": max(1, int(decay_ratio * steps))} if schedule == "wsd" else {}}


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` in output_dir, or None (fresh start). Not
    transformers.trainer_utils.get_last_checkpoint: that one takes the highest-numbered directory even
    when a crash cut its saving short (no trainer_state.json), and resuming from it fails."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    # A crash while saving can leave a checkpoint without its trainer state: skip such ones.
    done = sorted((p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[-1]))
    return str(done[-1]) if done else None


def quiet_training_args(cls=None, **kwargs):
    """TrainingArguments with the project's defaults: no hub, no reporting unless asked, safetensors."""
    import torch
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    defaults = dict(
        report_to=[],
        save_total_limit=2,
        save_only_model=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # Log the loss the model computed: transformers' default logs the running mean in place of a NaN/inf
        # loss, which makes a NaN forward look like a finite loss with NaN gradients
        logging_nan_inf_filter=False,
        # Without CUDA, say so: Accelerate then sets up gloo data parallelism (MULTI_CPU) under
        # torchrun instead of leaving every rank to train and checkpoint on its own.
        use_cpu=not torch.cuda.is_available(),
    )
    defaults.update(kwargs)
    return cls(**defaults)


def grouped_optimizer(trainer, latent_lr: float | None, scale_lr: float | None):
    """The trainer's optimizer class with three learning rates: `args.learning_rate` for ordinary
    parameters, `latent_lr` for the latent weights of fake-quant layers and `scale_lr` for their
    scales and zeros. The latter two live in grid units (see FakeQuantLinear), so these rates mean
    grid steps per update (for a step size: grid steps at the grid's edge), at every bit width.
    None: the group trains at args.learning_rate."""
    from .quant.fake_quant import quant_parameters

    model, args = trainer.model, trainer.args
    latents, quantizers = quant_parameters(model)
    special = {id(p) for p in latents + quantizers}
    decay = set(trainer.get_decay_parameter_names(model))
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in special]
    groups = [
        {"params": [p for n, p in rest if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in rest if n not in decay], "weight_decay": 0.0},
        {"params": [p for p in latents if p.requires_grad], "weight_decay": args.weight_decay,
         "lr": latent_lr or args.learning_rate},
        {"params": [p for p in quantizers if p.requires_grad], "weight_decay": 0.0, "lr": scale_lr or args.learning_rate},
    ]
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls([g for g in groups if g["params"]], **kwargs)


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

    from .errors import TrainingDiverged

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


class WeightAveraging:
    """EMA or LAWA (average of the last k snapshots) of the trainable parameters, as a TrainerCallback.

    Its state is written next to each Trainer checkpoint, so a resumed run averages the same way.
    """

    FILE = "weight_averaging.safetensors"

    @classmethod
    def from_config(cls, cfg) -> WeightAveraging | None:
        """From a recipe section with `averaging`, `ema_decay`, `lawa_k`, `lawa_interval` (the qat
        section and the demo teacher's); None when it averages nothing."""
        return None if cfg.averaging == "none" else cls(cfg.averaging, cfg.ema_decay, cfg.lawa_k, cfg.lawa_interval)

    def __init__(self, mode: str, ema_decay: float = 0.999, lawa_k: int = 5, lawa_interval: int = 50):
        from transformers import TrainerCallback

        self.mode, self.decay, self.k, self.interval = mode, ema_decay, lawa_k, lawa_interval
        self.state: dict = {}
        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                outer.update(model, state.global_step)

            def on_save(self, args, state, control, **kw):
                outer.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        self.callback = _Callback()

    @staticmethod
    def _params(model):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def update(self, model, step: int) -> None:
        """Fold the current trainable parameters into the average (EMA every step; LAWA every lawa_interval
        steps)."""
        import torch
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        with torch.no_grad():
            params = self._params(model)
            if self.mode == "ema":
                if not self.state:
                    self.state = {n: p.detach().float().clone() for n, p in params.items()}
                else:  # torch's own EMA step: ema += (1 - decay) * (p - ema)
                    get_ema_multi_avg_fn(self.decay)(list(self.state.values()),
                                                     [params[n].detach().float() for n in self.state], step)
            elif self.mode == "lawa" and step % self.interval == 0:
                slot = (step // self.interval) % self.k
                for n, p in params.items():
                    self.state[f"{slot}/{n}"] = p.detach().float().cpu().clone()

    def save(self, ckpt_dir: Path) -> None:
        """Write the averaging state beside a Trainer checkpoint (safetensors)."""
        from safetensors.torch import save_file

        if self.state and ckpt_dir.is_dir():
            save_file({k: v.contiguous().cpu() for k, v in self.state.items()}, str(ckpt_dir / self.FILE))

    def load(self, ckpt_dir: str | None, device) -> None:
        """Read the averaging state a checkpoint holds (a resumed run averages the same way)."""
        from safetensors.torch import load_file

        if ckpt_dir and (Path(ckpt_dir) / self.FILE).is_file():
            self.state = {k: v.to(device) if self.mode == "ema" else v for k, v in load_file(str(Path(ckpt_dir) / self.FILE)).items()}

    def apply(self, model) -> int:
        """Copy the averaged weights into the model; returns how many snapshots were averaged."""
        import torch

        params = self._params(model)
        if not self.state:
            return 0
        with torch.no_grad():
            if self.mode == "ema":
                for n, p in params.items():
                    p.copy_(self.state[n].to(p.dtype))
                return 1
            slots = sorted({k.split("/", 1)[0] for k in self.state})
            for n, p in params.items():
                avg = sum(self.state[f"{s}/{n}"] for s in slots) / len(slots)
                p.copy_(avg.to(p.device, p.dtype))
            return len(slots)


LOG_FIELDS = (("loss", "loss", "{:.4g}"), ("reward", "reward", "{:.3f}"), ("grad_norm", "grad norm", "{:.3g}"),
              ("learning_rate", "lr", "{:.2e}"))


def progress_line(label: str, step: int, max_steps: int, logs: dict, elapsed: float, tokens: int | None = None) -> str:
    """One readable line of a training log: `qat w2: step 40/300 (13%) | loss 3.138 | grad norm 1.85 | lr 1.00e-05 |
    2.1 steps/s, 5,120 tok/s | ETA 2:04` (tokens/s where the trainer counts tokens)."""
    parts = [f"{label}: step {step}/{max_steps} ({100 * step / max(max_steps, 1):.0f}%)"]
    parts += [f"{name} {fmt.format(logs[key])}" for key, name, fmt in LOG_FIELDS if isinstance(logs.get(key), (int, float))]
    if step and elapsed > 0:
        speed = f"{step / elapsed:.2f} steps/s" + (f", {tokens / elapsed:,.0f} tok/s" if tokens else "")
        left = int(elapsed / step * (max_steps - step))
        parts.append(f"{speed} | ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}")
    return " | ".join(parts)


def read_progress_line(line: str) -> tuple[str, int, dict[str, str]] | None:
    """The inverse of `progress_line`: (label, step, {LOG_FIELDS key: its value as printed}) of one log line,
    None for any other line. Values stay strings ("nan" included); a field the line lacks is absent."""
    import re

    head, *fields = line.strip().split(" | ")
    m = re.fullmatch(r"(.+): step (\d+)/\d+ \(\d+%\)", head)
    if m is None:
        return None
    keys = {name: key for key, name, _ in LOG_FIELDS}
    values = {}
    for field in fields:
        name, _, value = field.rpartition(" ")
        if name in keys:
            values[keys[name]] = value
    return m.group(1), int(m.group(2)), values


def readable_progress(trainer, label: str) -> None:
    """Replace the Trainer's printing of raw log dicts by `progress_line`s naming the stage and bit width: under
    the progress bar in a terminal, one line per logging step elsewhere (where bars only fill log files)."""
    import sys
    import time

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    tty = sys.stderr.isatty()

    class StageProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.started, self.first_step = time.time(), state.global_step  # a resumed run: speed of this process
            if tty:
                super().on_train_begin(args, state, control, **kw)

        def on_step_end(self, args, state, control, **kw):
            if tty:
                super().on_step_end(args, state, control, **kw)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or "train_runtime" in logs:
                return
            done = state.global_step - self.first_step
            tokens = logs.get("num_tokens") or getattr(state, "num_input_tokens_seen", 0) or None
            line = progress_line(label, state.global_step, state.max_steps, logs, (time.time() - self.started) *
                                 (state.global_step / max(done, 1)), tokens)
            (self.training_bar.write if tty and self.training_bar is not None else print)(line)

        def on_train_end(self, args, state, control, **kw):
            if tty:
                super().on_train_end(args, state, control, **kw)

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StageProgress())

