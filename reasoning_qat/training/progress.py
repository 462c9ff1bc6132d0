"""One readable progress line per logging step, and its parser (the research scripts read logs back)."""

from __future__ import annotations

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
