"""Data: the demo task, QAT traces, calibration sets, teacher-written responses and the cached teacher.

Torch-free at this level: the preflight reads `is_saved_dataset` without importing the data modules."""

from pathlib import Path

# What datasets' save_to_disk writes at the top of a dataset (or DatasetDict) directory
SAVED_DATASET_FILES = ("dataset_dict.json", "dataset_info.json", "state.json")


def is_saved_dataset(path: str | Path) -> bool:
    """Whether `path` is a directory that datasets' `save_to_disk` wrote."""
    return Path(path).is_dir() and any((Path(path) / f).is_file() for f in SAVED_DATASET_FILES)
