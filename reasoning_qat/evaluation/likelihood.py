"""Held-out cross-entropy: how likely a model finds the reference solutions (teacher forcing).

pass@1 only moves once an error crosses a decision; the mean cross-entropy per response token moves
with every bit of damage, so it measures PTQ damage where accuracy is saturated (the training-dynamics
rows: relative CE increase of a quantized teacher over its BF16 self)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.reasoning import IGNORE_INDEX, PadCollator, tokenize_example


@torch.no_grad()
def reference_ce(model, tokenizer, rows: list[dict], max_length: int = 4096, batch_size: int = 64) -> dict:
    """Mean cross-entropy (nats per response token) of `rows` ({prompt, response}) under `model`,
    the prompt formatted as at inference and only the response's tokens scored."""
    device = next(model.parameters()).device
    examples = sorted((tokenize_example(tokenizer, r["prompt"], r["response"], max_length) for r in rows),
                      key=lambda e: len(e["input_ids"]))  # similar lengths together: little padding
    collate = PadCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return {"ce": total / max(count, 1), "ce_tokens": count}


def reference_ce_of(model_path: str, rows: list[dict], batch_size: int = 64, trust_remote_code: bool = False) -> dict:
    """reference_ce of a checkpoint (loaded as every stage loads one: runtime hooks included)."""
    from ..models import best_device, load_model, load_tokenizer

    device = best_device()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    try:
        return reference_ce(model, load_tokenizer(model_path, trust_remote_code), rows, batch_size=batch_size)
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
