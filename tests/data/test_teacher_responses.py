"""Teacher-written QAT data (data/teacher_responses.py): resume after a torn write, a real model's responses."""

import dataclasses
import json

import pytest

from reasoning_qat.data.teacher_responses import GenerationSpec

from ..conftest import tiny_qwen3

ROWS = [
    {"prompt": "What is (1+2)*3?", "response": "<think>\n1+2=3\n3*3=9\n</think>\n\n\\boxed{9}", "answer": "9"},
    {"prompt": "What is (4+4)*2?", "response": "<think>\n4+4=8\n8*2=16\n</think>\n\nThe answer is \\boxed{16}.", "answer": "16"},
    {"prompt": "What is 7?", "response": "\\boxed{7}", "answer": "7"},
]


class _Echo:
    """A deterministic 'backend' for the resume test: answers every prompt with its own text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def generate(self, prompts, k, temperature, top_p, top_k, max_new_tokens, seed=0, keys=None):
        from reasoning_qat.evaluation.backends import Completion

        self.calls += 1
        return [[Completion(f"<think>\n{seed}\n</think>\n\n\\boxed{{0}}", 5, False)] for p in prompts]


def test_teacher_responses_resume_after_a_torn_write(tmp_path, tokenizer):
    from reasoning_qat.data.teacher_responses import generate_teacher_responses

    rows = [{"prompt": f"q{i}", "response": "", "answer": str(i % 2)} for i in range(7)]
    gen = GenerationSpec(batch_size=3, keep="correct")
    full = tmp_path / "full.jsonl"
    kept_full = generate_teacher_responses(_Echo(tokenizer), rows, full, gen, seed=5)
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == 7
    assert [r["prompt"] for r in kept_full] == ["q0", "q2", "q4", "q6"]  # keep: correct drops the wrong ones

    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:3]) + lines[3][:10])  # one batch done, the next torn mid-line
    echo = _Echo(tokenizer)
    kept_cut = generate_teacher_responses(echo, rows, cut, gen, seed=5)
    assert echo.calls == 2  # rows 3-5 and 6 only
    assert cut.read_text() == full.read_text() and kept_cut == kept_full


def test_teacher_responses_from_a_real_model(tmp_path, tokenizer):
    from reasoning_qat.data.teacher_responses import generate_teacher_responses
    from reasoning_qat.evaluation.backends import TransformersBackend

    engine = TransformersBackend.from_model(tiny_qwen3(vocab_size=len(tokenizer)), tokenizer, batch_size=2)
    gen = GenerationSpec(batch_size=2, max_new_tokens=6, temperature=0.0)
    kept = generate_teacher_responses(engine, ROWS, tmp_path / "t.jsonl", gen)
    assert [r["prompt"] for r in kept] == [r["prompt"] for r in ROWS]
    written = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert all(w["truncated"] for w in written)  # a random model never ends its turn in 6 tokens
    with pytest.raises(ValueError, match="no teacher response was kept"):
        generate_teacher_responses(engine, ROWS, tmp_path / "f.jsonl", dataclasses.replace(gen, keep="finished"))

