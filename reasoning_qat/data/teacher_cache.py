"""A cached teacher: its top-k log-probabilities on every QAT response token, computed once, so the qat stage
trains without the teacher in memory (`qat.kd.teacher: cached`).

For each example of the tokenized QAT set, and each position t whose next token is a response token
(labels[t+1] != -100, the positions the KD loss reads), the teacher's distribution at temperature T is kept as
its k most likely tokens (log-probabilities, float16, and token ids, int32) plus the log of the mass left
outside them (float32). With that tail bucket, forward KL against the cache (`kd.cached_forward_kl`) is the KL
divergence between the two distributions coarse-grained to k + 1 outcomes: a proper divergence, never above
the full one, equal to it when k is the vocabulary. (Stored top-k logits, as TRL's users ask for, with the tail
mass added.)

On disk: `shard-00000.safetensors`, ... (tensors `values` [rows, k], `indices` [rows, k], `tail` [rows] and
`offsets` [examples + 1]: example i's rows are offsets[i]:offsets[i+1] of its shard), written one at a time
and atomically, so a killed run resumes at the first missing shard; `manifest.json` last. Shards are opened
memory-mapped (safetensors' safe_open), one example's rows read at a time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..errors import SpecError, UserError
from .reasoning import IGNORE_INDEX

MANIFEST = "manifest.json"
KEYS = ("teacher_values", "teacher_indices", "teacher_tail")


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions t of a label row [seq] whose next token carries a loss (labels[t+1] != -100)."""
    return (labels[1:] != IGNORE_INDEX).nonzero().flatten()


@torch.no_grad()
def top_k_with_tail(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """(values [n, k] log-probabilities, indices [n, k], tail [n] log of the remaining mass) of [n, vocab]
    logits at `temperature`; the tail is -inf when k covers the vocabulary."""
    logp = (logits.float() / temperature).log_softmax(-1)
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    tail = logp.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return values, indices, tail


def _shard_path(out: Path, i: int) -> Path:
    return out / f"shard-{i:05d}.safetensors"


@torch.no_grad()
def write_teacher_cache(model, dataset, out_dir: str | Path, top_k: int = 64, temperature: float = 1.0,
                        batch_size: int = 8, chunk_size: int = 1024, shard_examples: int = 1024,
                        progress: bool = True, info: dict | None = None) -> dict:
    """Run `model` over `dataset` (rows with input_ids and labels) and write its top-k cache into `out_dir`;
    returns the manifest (rows, tokens, bytes per token, seconds, tokens/s). `model` is the teacher as a
    transformers model (eval mode, on its device; the vocabulary projection runs `chunk_size` positions at a
    time, since Qwen3's 151k-token logits of a whole batch would not fit), or an engine with
    `prompt_top_k(token_ids, k)` (evaluation/backends.VLLMBackend: vLLM's prompt_logprobs, temperature 1 only).
    Shards already written are kept (a resumed run). `info` is merged into the manifest. Raises UserError for an
    empty dataset, SpecError (`backend`) for a temperature the engine cannot apply."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(dataset) == 0:
        raise SpecError("teacher", "cached, but the QAT set is empty")
    if hasattr(model, "prompt_top_k") and temperature != 1.0:
        raise SpecError("backend", f"vllm reports log-probabilities at temperature 1, not {temperature}; use the "
                                   "transformers backend, or temperature 1")
    n_shards = (len(dataset) + shard_examples - 1) // shard_examples
    started, tokens_computed = time.time(), 0
    bar = tqdm(total=len(dataset), desc="teacher top-k cache", unit="ex", disable=not progress)
    for s in range(n_shards):
        lo, hi = s * shard_examples, min(len(dataset), (s + 1) * shard_examples)
        path = _shard_path(out, s)
        if path.is_file():  # written before a crash
            bar.update(hi - lo)
            continue
        values, indices, tails, offsets = [], [], [], [0]
        for b in range(lo, hi, batch_size):
            rows = [dataset[i] for i in range(b, min(hi, b + batch_size))]
            for v, idx, t in _response_rows(model, rows, top_k, temperature, chunk_size):
                values.append(v.half())
                indices.append(idx.int())
                tails.append(t.float())
                offsets.append(offsets[-1] + len(t))
            tokens_computed += sum(len(r["input_ids"]) for r in rows)
            bar.update(len(rows))
        tensors = {"values": torch.cat(values), "indices": torch.cat(indices), "tail": torch.cat(tails),
                   "offsets": torch.tensor(offsets, dtype=torch.int64)}
        tmp = path.with_suffix(".tmp")
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    bar.close()
    rows_total = sum(_rows_in(_shard_path(out, s)) for s in range(n_shards))
    size = sum(_shard_path(out, s).stat().st_size for s in range(n_shards))
    seconds = time.time() - started
    manifest = {"top_k": top_k, "temperature": temperature, "examples": len(dataset), "shards": n_shards,
                "shard_examples": shard_examples, "rows": rows_total, "bytes": size,
                "bytes_per_token": size / max(rows_total, 1), "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens_computed / seconds, 1) if tokens_computed else None, **(info or {})}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def _response_rows(model, rows: list[dict], top_k: int, temperature: float, chunk_size: int):
    """Per row of the batch, (values [n, k], indices [n, k], tail [n]) on the CPU at its n response positions:
    from an engine's prompt_top_k, or from a transformers model's final hidden states projected chunk by chunk."""
    if hasattr(model, "prompt_top_k"):
        for row, (v, idx, t) in zip(rows, model.prompt_top_k([r["input_ids"] for r in rows], top_k)):
            pos = response_positions(torch.tensor(row["labels"]))
            yield v[pos], idx[pos], t[pos]
        return
    from .reasoning import PadCollator

    device = next(model.parameters()).device
    batch = PadCollator(0)(rows)
    # the decoder's final (normed) hidden states; the head projects only the response positions
    hidden = model.get_decoder()(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device), use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    for j, labels in enumerate(batch["labels"]):
        h = hidden[j, response_positions(labels).to(device)]
        parts = [top_k_with_tail(head(h[c : c + chunk_size].to(head.weight.dtype)), top_k, temperature)
                 for c in range(0, len(h), chunk_size) or [0]]  # [0]: an example without response tokens
        yield tuple(torch.cat(x).cpu() for x in zip(*parts))


def _rows_in(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("tail").get_shape()[0]


class TeacherCache:
    """Read access to a written cache: `rows(i)` -> (values [n, k] float32 log-probabilities, indices [n, k]
    int64, tail [n] float32) of example i. Raises UserError when the directory holds no finished cache."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise UserError(f"{self.path}: no finished teacher cache (re-run the calibrate stage)")
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        self._open: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.manifest["examples"]

    def _shard(self, s: int):
        if s not in self._open:  # opened lazily, per process (dataloader workers each open their own)
            from safetensors import safe_open

            f = safe_open(str(_shard_path(self.path, s)), framework="pt")
            self._open[s] = (f, f.get_tensor("offsets"))
        return self._open[s]

    def rows(self, i: int):
        s, local = divmod(i, self.manifest["shard_examples"])
        f, offsets = self._shard(s)
        lo, hi = int(offsets[local]), int(offsets[local + 1])
        return (f.get_slice("values")[lo:hi].float(), f.get_slice("indices")[lo:hi].long(),
                f.get_slice("tail")[lo:hi])


class CachedTeacherDataset(torch.utils.data.Dataset):
    """The tokenized QAT set with each example's cached teacher rows added (KEYS); the cache must have been
    written from this very set (same examples, same order)."""

    def __init__(self, dataset, cache: TeacherCache):
        if len(cache) != len(dataset):
            raise UserError(f"{cache.path}: the teacher cache holds {len(cache)} examples, the QAT set {len(dataset)}; "
                            "re-run the calibrate stage")
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.dataset[i])
        return row | dict(zip(KEYS, self.cache.rows(i)))


class CachedTeacherCollator:
    """Wraps a collator (padding or packing): the cached rows of the batch's examples are concatenated in batch
    order, which is the order the loss selects response positions in (row by row, left to right; packing keeps
    each example's positions, and masks only the first label of each, a prompt token)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict:
        cached = [{k: f.pop(k) for k in KEYS} for f in features]
        batch = self.collate(features)
        return batch | {k: torch.cat([c[k] for c in cached]) for k in KEYS}
