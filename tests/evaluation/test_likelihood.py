"""Held-out cross-entropy (evaluation/likelihood.py) against transformers' own loss."""

import torch

from reasoning_qat.data.reasoning import tokenize_example
from reasoning_qat.evaluation.likelihood import reference_ce


def test_reference_ce_is_the_mean_loss_over_response_tokens(tiny_model, tokenizer):
    rows = [{"prompt": f"What is {a}+{b}?", "response": f"<think>\n{a}+{b}={a + b}\n</think>\n\n\\boxed{{{a + b}}}"}
            for a, b in [(1, 2), (13, 29), (7, 8)]]
    got = reference_ce(tiny_model, tokenizer, rows, batch_size=2)  # padding across a batch of two lengths
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:  # one example at a time, no padding: transformers' mean loss over the labelled tokens
            ex = tokenize_example(tokenizer, r["prompt"], r["response"], 4096)
            n = sum(1 for x in ex["labels"][1:] if x != -100)
            out = tiny_model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
            total += out.loss.item() * n
            count += n
    assert got["ce_tokens"] == count
    assert abs(got["ce"] - total / count) < 1e-5
