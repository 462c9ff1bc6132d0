"""Calibration sets for PTQ: domain-matched (the QAT data in its chat/thinking format) or generic text."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

import torch

from ..errors import SpecError, UserError
from .reasoning import read_jsonl, tokenize_example


def _pack(token_stream: list[int], num_samples: int, seq_len: int, rng: random.Random) -> torch.Tensor:
    if len(token_stream) < seq_len:
        # Short corpora (the demo) are repeated so every sample is full length.
        token_stream = token_stream * (seq_len // max(len(token_stream), 1) + 1)
    starts = [rng.randrange(0, len(token_stream) - seq_len + 1) for _ in range(num_samples)]
    return torch.tensor([token_stream[s : s + seq_len] for s in starts], dtype=torch.long)


def domain_calibration(examples, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Windows cut from tokenized conversations (prompt + thinking response, formatted as at
    inference): `examples` is the QAT set itself (anything indexable whose items hold input_ids), so
    calibration sees exactly the tokens QAT trains on. Only as many examples are read as needed."""
    if not len(examples):
        raise UserError("calibration: the reasoning data is empty; give the QAT data a source with rows")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    stream: list[int] = []
    need = num_samples * seq_len * 2
    for i in order:
        stream += list(examples[i]["input_ids"])
        if len(stream) >= need:
            break
    return _pack(stream, num_samples, seq_len, rng)


def tokenized_rows(tokenizer, rows: list[dict]) -> list[dict]:
    """{prompt, response} rows as calibration examples (for sets that are not a run's QAT data)."""
    return [tokenize_example(tokenizer, r["prompt"], r["response"]) for r in rows]


def generic_text(source: str, subset: str | None = None) -> str:
    """Plain text: the shipped builtin corpus, a .txt file, a .jsonl with a `text` field, or a hub id."""
    if source == "builtin":
        return resources.files("reasoning_qat.data").joinpath("generic_text.txt").read_text()
    path = Path(source)
    if path.suffix == ".txt":
        if not path.is_file():
            raise SpecError("generic_source", f"no such file {source!r}")
        return path.read_text()
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise SpecError("generic_source", f"no such file {source!r}")
        return "\n\n".join(r["text"] for r in read_jsonl(path))
    from datasets import load_dataset

    return "\n\n".join(load_dataset(source, subset, split="train")["text"][:20000])


def generic_calibration(tokenizer, source: str, num_samples: int, seq_len: int, seed: int = 0,
                        subset: str | None = None) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens of plain text ([num_samples, seq_len] int64) from the shipped
    text, a .txt/.jsonl or a hub dataset; the generic-text baseline of GPTQ's calibration. Raises SpecError (`generic_source`) on
    a missing or empty source."""
    ids = tokenizer(generic_text(source, subset), add_special_tokens=False)["input_ids"]
    if not ids:
        raise SpecError("generic_source", f"{source!r} holds no text")
    return _pack(ids, num_samples, seq_len, random.Random(seed))
