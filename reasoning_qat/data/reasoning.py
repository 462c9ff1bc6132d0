"""Reasoning data: rows of (prompt, response-with-thinking), formatted exactly as at inference.

A training example is the chat template's generation prompt for the user turn followed by the
response and the end-of-turn token; the loss mask covers the response only. Calibration uses the
same text, so PTQ sees the domain and format that QAT trains on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from .thinking import continuation, prompt_opens_thinking, split_completion, with_open_tag

IGNORE_INDEX = -100


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped). Raises UserError naming the first bad line."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSON lines (parent directories created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def select_fields(rows: list[dict], prompt_field: str, response_field: str | None, max_samples: int | None = None) -> list[dict]:
    """Rows as {prompt, response, answer?}; response_field None keeps prompts only (response "")."""
    out = []
    for i, r in enumerate(rows[:max_samples] if max_samples else rows):
        if prompt_field not in r or (response_field is not None and response_field not in r):
            raise UserError(f"data: row {i} lacks field {prompt_field!r} or {response_field!r} (has {sorted(r)})")
        response = r[response_field] if response_field is not None else ""
        if isinstance(response, list):  # datasets with several generations per prompt: take the first
            response = response[0] if response else ""
        out.append({"prompt": r[prompt_field], "response": response, **({"answer": str(r["answer"])} if "answer" in r else {})})
    return out


def generation_prompt(tokenizer, prompt: str, enable_thinking: bool = True) -> str:
    """The chat-formatted prompt a model generates after, as its own chat template writes it (thinking on:
    Qwen3's default)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )


def format_example(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """(prompt text, completion text) exactly as the model sees its own generation of `response`.

    The conversation [user, assistant(response)] is rendered by the tokenizer's own chat template,
    and the completion is what follows the generation prompt, so a template normalises a response
    the way it renders its own turns (Qwen3's whitespace around the tags). That rendering is kept
    only when it extends the generation prompt and keeps the response's thinking and answer
    (data/thinking.py decides both); otherwise (R1-Distill's template drops the thinking from
    assistant turns; a prompt that opens `<think>` would get the tag twice) the completion is the
    response continued after the prompt (`thinking.continuation`). A response that starts inside its
    thinking gets its `<think>` back first, so templates that split only whole blocks (Qwen3.5) see one.
    The completion ends with the end-of-turn token (the template's trailing newline is not something
    the model generates).
    """
    p_text = generation_prompt(tokenizer, prompt)
    opened = prompt_opens_thinking(p_text)
    response = with_open_tag(response)
    eos = tokenizer.eos_token
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                         tokenize=False)
    if full.startswith(p_text) and eos in full[len(p_text):]:
        completion = full[len(p_text):]
        completion = completion[: completion.rindex(eos)]
        if split_completion(completion, opened).same_as(split_completion(continuation(response, opened), opened)):
            return p_text, completion + eos
    return p_text, continuation(response, opened) + eos


def tokenize_example(tokenizer, prompt: str, response: str, max_length: int | None = None) -> dict:
    """input_ids and labels (prompt masked); `max_length` truncates (None: keep the whole example)."""
    p_text, c_text = format_example(tokenizer, prompt, response)
    p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(c_text, add_special_tokens=False)["input_ids"]
    ids = (p_ids + c_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(p_ids) + c_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


class ReasoningSFTDataset(torch.utils.data.Dataset):
    """Tokenized (prompt, response) pairs for SFT: labels only on the response (thinking, answer, end of
    turn)."""
    def __init__(self, rows: list[dict], tokenizer, max_length: int):
        self.examples = [tokenize_example(tokenizer, r["prompt"], r["response"], max_length) for r in rows]
        if not self.examples:
            raise UserError("data: the training set is empty")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


class PadCollator:
    """Right-pads input_ids/labels and builds the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
