"""Helpers shared by the trainers (teacher SFT, KD-QAT, GRPO), by concern: `arguments`, `nonfinite`,
`averaging`, `progress`."""

from .arguments import SCHEDULES, grouped_optimizer, last_checkpoint, quiet_training_args, schedule_args
from .averaging import WeightAveraging
from .nonfinite import (
    append_record,
    read_records,
    sdpa_cudnn,
    skip_nonfinite_steps,
    watch_gradients_before_clipping,
)
from .progress import LOG_FIELDS, progress_line, read_progress_line, readable_progress

__all__ = [
    "LOG_FIELDS",
    "SCHEDULES",
    "WeightAveraging",
    "append_record",
    "grouped_optimizer",
    "last_checkpoint",
    "progress_line",
    "quiet_training_args",
    "read_progress_line",
    "read_records",
    "readable_progress",
    "schedule_args",
    "sdpa_cudnn",
    "skip_nonfinite_steps",
    "watch_gradients_before_clipping",
]
