"""The QAT training set, built the way hub-scale reasoning data needs it.

1. Open the source lazily: a hub dataset or a `save_to_disk` directory stays an Arrow table on disk
   (memory-mapped); `max_samples` is applied by index selection before any row becomes a Python object.
2. Choose one trace per row (`select`): `first` generation, `verified` (the dataset's own
   correctness/completeness fields when the recipe names them, else graded against `answer` with
   the eval grader), or `all` (every generation is an example).
3. Tokenize with `datasets.map` (batched, `num_proc` workers), formatted by the tokenizer's own chat
   template (`reasoning.format_example`).
4. Apply the length policy: `overlength: drop` (default: a trace cut before its answer and its
   end-of-turn token teaches the student to stop mid-thought) or `truncate`.

The calibrate stage builds the set once and saves it (`calibrate/qat_data/`); calibration windows
and the qat stage both read that copy. The counts (read, kept, dropped and why, truncated) and the
token-length distribution go into the calibrate manifest and `rqat status`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecError
from . import is_saved_dataset
from .reasoning import read_jsonl, tokenize_example


@dataclass(frozen=True)
class TraceSpec:
    """Which reasoning traces a dataset gives and how they become training examples: the columns
    (`prompt_field`, `response_field`: one trace or a list of generations, `answer_field`), which trace per
    row (`select`: first, verified (the dataset's own `verified_field` / `complete_field` flags, else graded
    against the answer), all), `max_samples` source rows, `max_length` tokens per example and what happens
    beyond it (`overlength`: drop, truncate), `num_proc` datasets.map workers (None: the cores for large sets).
    Errors name these keys (SpecError)."""

    source: str = "demo"
    subset: str | None = None
    split: str = "train"
    prompt_field: str = "prompt"
    response_field: str = "response"
    answer_field: str = "answer"
    max_samples: int | None = None
    max_length: int = 2048
    select: str = "first"
    verified_field: str | None = None
    complete_field: str | None = None
    overlength: str = "drop"
    num_proc: int | None = None


def open_dataset(source: str, split: str = "train", subset: str | None = None, demo_dir: str | Path | None = None,
                 field: str = "source", offline_hint: str = "", data_files: list[str] | None = None):
    """A `datasets.Dataset` over `source`: `demo`, a .jsonl file, a `save_to_disk` directory or a hub id.
    Hub and disk datasets are memory-mapped Arrow tables: opening one reads no rows. Raises SpecError
    naming `field` when the source cannot be opened."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if source == "demo":
        if demo_dir is None:
            raise SpecError(field, "'demo' needs the demo teacher's data (its test and train splits)")
        return Dataset.from_list(read_jsonl(Path(demo_dir) / f"{split}.jsonl"))
    if source.endswith(".jsonl"):
        if not Path(source).is_file():
            raise SpecError(field, f"no such file {source!r}")
        return Dataset.from_list(read_jsonl(source))
    if is_saved_dataset(source):
        ds = load_from_disk(source)
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise SpecError(field, f"{source!r} has no split {split!r} (has {sorted(ds)})")
            ds = ds[split]
        return ds
    try:
        return load_dataset(source, subset, split=split, **({"data_files": data_files} if data_files else {}))
    except Exception as err:  # offline, unknown id, no such split: the datasets library's many error types
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SpecError(field, f"cannot load {source!r} ({type(err).__name__}: {first[:200]})"
                        + (f"; {offline_hint}" if offline_hint else "; give a local .jsonl file or dataset directory")) from err


def load_rows(source: str, split: str = "train", demo_dir: str | Path | None = None, subset: str | None = None,
              field: str = "source", offline_hint: str = "", limit: int | None = None,
              data_files: list[str] | None = None) -> list[dict]:
    """Rows of `demo` (the run's generated split), a .jsonl file, a dataset directory or a hub id, as
    dicts: the first `limit` only, selected before any row is read. Raises SpecError naming `field`."""
    ds = open_dataset(source, split, subset, demo_dir, field, offline_hint, data_files)
    return ds.select(range(min(limit, len(ds)))).to_list() if limit else ds.to_list()


def workers(data: TraceSpec, n_rows: int) -> int | None:
    """`num_proc` for datasets.map: the recipe's, else the cores for large sets (processes cost more
    than they save on a few thousand rows)."""
    if data.num_proc is not None:
        return data.num_proc if data.num_proc > 1 else None
    return min(os.cpu_count() or 1, 16) if n_rows >= 20_000 else None


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _pick(batch, data, with_response: bool, tokenizer=None):
    """One output row per kept trace; rows with nothing usable come out with a `status` saying why.
    Traces are graded as what the model writes after its generation prompt (`tokenizer`'s template):
    after a prompt that opened `<think>`, a trace with no `</think>` is unfinished thinking, not an answer."""
    from ..evaluation.grader import grade
    from .reasoning import generation_prompt
    from .thinking import prompt_opens_thinking

    out = {"prompt": [], "response": [], "answer": [], "status": []}
    n = len(batch[data.prompt_field])
    for i in range(n):
        answer = batch[data.answer_field][i] if data.answer_field in batch else None
        answer = None if answer is None else str(answer)
        if not with_response:
            traces = [""]
        else:
            gens = _as_list(batch[data.response_field][i])
            if data.select == "first":
                traces = gens[:1]
            elif data.select == "all":
                traces = gens
            else:
                ok = [True] * len(gens)
                if data.verified_field or data.complete_field:
                    for f in (data.verified_field, data.complete_field):
                        if f:
                            flags = _as_list(batch[f][i])
                            ok = [a and bool(b) for a, b in zip(ok, flags + [False] * (len(gens) - len(flags)))]
                elif answer is not None:
                    opened = tokenizer is not None and prompt_opens_thinking(
                        generation_prompt(tokenizer, batch[data.prompt_field][i]))
                    ok = [grade(g, answer, opened).correct for g in gens]
                else:
                    ok = [False] * len(gens)
                traces = [g for g, good in zip(gens, ok) if good][:1]
        if not traces:
            traces, status = [""], "dropped: no verified trace" if data.select == "verified" else "dropped: no trace"
        else:
            status = "kept"
        for t in traces:
            out["prompt"].append(batch[data.prompt_field][i])
            out["response"].append(t)
            out["answer"].append(answer)
            out["status"].append(status)
    return out


def select_traces(ds, data: TraceSpec, with_response: bool = True, tokenizer=None):
    """Rows {prompt, response, answer, status} from a raw dataset, `max_samples` applied first.
    `tokenizer`: the model's, whose chat template decides where a trace's thinking ends when
    `select: verified` grades it (None: as if the prompt never opened the thinking). Raises SpecError
    naming the `*_field` key whose column the dataset lacks."""
    keys = ("prompt_field", "response_field" if with_response else None,
            "verified_field" if data.select == "verified" else None, "complete_field" if data.select == "verified" else None)
    missing = [k for k in keys if k and getattr(data, k) and getattr(data, k) not in ds.column_names]
    if missing:
        raise SpecError(missing[0], f"the dataset has no column {getattr(data, missing[0])!r} "
                                    f"(columns: {', '.join(ds.column_names)})")
    if data.max_samples:
        ds = ds.select(range(min(len(ds), data.max_samples)))  # an index mapping: nothing is read yet
    return ds.map(_pick, batched=True, batch_size=256, remove_columns=ds.column_names, num_proc=workers(data, len(ds)),
                  fn_kwargs={"data": data, "with_response": with_response, "tokenizer": tokenizer},
                  desc="selecting traces")


def _tokenize(batch, tokenizer, max_length: int, overlength: str):
    out = {"input_ids": [], "labels": [], "length": [], "status": []}
    for prompt, response, status in zip(batch["prompt"], batch["response"], batch["status"]):
        ex = tokenize_example(tokenizer, prompt, response) if status == "kept" else {"input_ids": [], "labels": []}
        n = len(ex["input_ids"])
        if status == "kept" and n > max_length:
            status = "truncated" if overlength == "truncate" else "dropped: longer than max_length"
            ex = {k: v[:max_length] for k, v in ex.items()}
        out["input_ids"].append(ex["input_ids"])
        out["labels"].append(ex["labels"])
        out["length"].append(n)
        out["status"].append(status)
    return out


def tokenize_traces(rows, tokenizer, data: TraceSpec):
    """Tokenized examples (input_ids, labels) and the statistics of what was kept and why. Raises SpecError
    (`max_length`) when nothing is kept."""
    toks = rows.map(_tokenize, batched=True, batch_size=256, num_proc=workers(data, len(rows)),
                    fn_kwargs={"tokenizer": tokenizer, "max_length": data.max_length, "overlength": data.overlength},
                    remove_columns=[c for c in rows.column_names if c != "status"], desc="tokenizing")
    statuses = Counter(toks["status"])
    lengths = sorted(n for n, st in zip(toks["length"], toks["status"]) if not st.startswith("dropped: no"))
    kept = toks.filter(lambda st: not st.startswith("dropped"), input_columns=["status"])
    stats = {
        "rows": len(toks),
        "kept": len(kept),
        "truncated": statuses.get("truncated", 0),
        "dropped": {k.removeprefix("dropped: "): v for k, v in sorted(statuses.items()) if k.startswith("dropped")},
        "tokens": {"p50": _pct(lengths, 50), "p90": _pct(lengths, 90), "max": lengths[-1] if lengths else 0,
                   "max_length": data.max_length},
        "select": data.select,
        "overlength": data.overlength,
    }
    if not len(kept):
        raise SpecError("max_length", f"no example was kept ({stats['dropped']}); raise max_length, use "
                                      "overlength: truncate, or select: first")
    return kept.select_columns(["input_ids", "labels"]), stats


def _pct(sorted_values: list[int], q: int) -> int:
    """Nearest-rank percentile: an actual example's length (statistics.quantiles would interpolate between two)."""
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, (len(sorted_values) * q) // 100)]


def save_tokenized(ds, out_dir: Path) -> None:
    """Write the tokenized QAT set (datasets' save_to_disk) where the qat stage reads it."""
    ds.save_to_disk(str(out_dir))


def load_tokenized(path: Path):
    """The tokenized QAT set the calibrate stage saved (memory-mapped Arrow)."""
    from datasets import load_from_disk

    return load_from_disk(str(path))
