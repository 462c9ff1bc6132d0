"""QAT data written by the teacher: the dataset's prompts, the BF16 model's own responses.

Distilling on the teacher's own samples keeps the student in the distribution it will generate
from. Generation is the long part of such a run, so each finished batch is appended to the output
JSONL at once and a re-run continues after the last complete line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import SpecError
from ..evaluation.grader import grade
from .reasoning import generation_prompt, read_jsonl
from .thinking import prompt_opens_thinking


@dataclass(frozen=True)
class GenerationSpec:
    """How the teacher writes each response: sampling (`temperature`, `top_p`, `top_k`; Qwen3's thinking-mode
    defaults), at most `max_new_tokens`, `batch_size` prompts per batch, on `backend` (auto: vLLM where it
    runs), and which responses train (`keep`: all, finished = not cut by max_new_tokens, correct = graded
    against the row's answer)."""

    max_new_tokens: int = 4096
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    batch_size: int = 64
    backend: str = "auto"
    keep: str = "all"


def _done_lines(path: Path) -> int:
    """Rows already written; a torn last line (a crash mid-write) is cut off."""
    if not path.is_file():
        return 0
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    if complete != text:
        path.write_text(complete)
    return complete.count("\n")


def generate_teacher_responses(engine, rows: list[dict], out_path: str | Path, gen: GenerationSpec, seed: int = 0,
                               timing: dict | None = None) -> list[dict]:
    """Generate one response per row with `engine` (an evaluation backend) and return the kept rows.

    out_path holds one line per input row, in order: {prompt, response, answer?, kept, truncated}.
    gen.keep chooses what trains: `all`, `finished` (not cut by max_new_tokens) or `correct`
    (graded against the row's answer with the eval grader). `timing`, when given, receives what this
    call generated: rows, tokens and seconds (a resumed call counts only the rows it wrote).
    """
    out_path = Path(out_path)
    if gen.keep == "correct" and any("answer" not in r for r in rows):
        raise SpecError("generation.keep", "'correct' needs an 'answer' field in every row")
    start = _done_lines(out_path)
    t0, tokens = time.perf_counter(), 0
    with open(out_path, "a") as f, tqdm(total=len(rows), initial=start, desc="teacher responses") as bar:
        for i in range(start, len(rows), gen.batch_size):
            batch = rows[i : i + gen.batch_size]
            prompts = [generation_prompt(engine.tokenizer, r["prompt"]) for r in batch]
            # Seeds follow the row (vLLM: per row; transformers: per batch), so a resumed run samples
            # exactly what an uninterrupted one would.
            outs = engine.generate(prompts, 1, gen.temperature, gen.top_p, gen.top_k, gen.max_new_tokens, seed + i,
                                   keys=range(i, i + len(batch)))
            tokens += sum(c.num_tokens for (c,) in outs)
            for r, p, (c,) in zip(batch, prompts, outs):
                kept = {"all": True, "finished": not c.truncated,
                        "correct": not c.truncated and grade(c.text, r.get("answer", ""), prompt_opens_thinking(p)).correct
                        }[gen.keep]
                f.write(json.dumps({"prompt": r["prompt"], "response": c.text, **({"answer": r["answer"]} if "answer" in r else {}),
                                    "kept": kept, "truncated": c.truncated}) + "\n")
            f.flush()
            bar.update(len(batch))
    if timing is not None:
        seconds = time.perf_counter() - t0
        timing.update(rows_generated=len(rows) - start, generated_tokens=tokens, seconds=round(seconds, 2),
                      tokens_per_s=round(tokens / seconds, 1) if seconds > 0 and tokens else None)
    return kept_rows(out_path)


def kept_rows(path: str | Path) -> list[dict]:
    """The rows of a teacher-responses JSONL marked kept, as {prompt, response, answer?}. Raises SpecError
    (`generation.keep`) when none is."""
    rows = [r for r in read_jsonl(path) if r["kept"]]
    if not rows:
        raise SpecError("generation.keep", f"no teacher response was kept in {path}; use keep: all or raise max_new_tokens")
    return [{k: r[k] for k in ("prompt", "response", "answer") if k in r} for r in rows]
