"""QAT data loading at hub scale, before and after the lazy path, on a local `save_to_disk`
fixture of long OpenR1-shaped rows (4 generations of ~6k characters each).

before: what the data path did until now: every row of the dataset turned into a Python dict, then
        `max_samples` applied, then one-process tokenization.
after:  data/qat_data.py: `max_samples` applied by index selection on the memory-mapped Arrow table,
        trace selection and tokenization through datasets.map.

Each variant runs in a fresh process; the table gives its wall time and peak resident memory.

    python benchmarks/data_loading.py --rows 5000 --max-samples 500
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_fixture(path: Path, rows: int, chars: int) -> None:
    import random

    from datasets import Dataset

    rng = random.Random(0)
    words = ["so", "then", "we", "get", "x", "=", "+", "2", "7", "carry", "check", "sum", "the", "next", "step"]

    def trace(i, j):
        body = " ".join(rng.choice(words) for _ in range(chars // 4))
        return f"<think>\n{body}\n</think>\n\nThe answer is \\boxed{{{i + j}}}."

    def gen():
        for i in range(rows):
            yield {"problem": f"Problem {i}: what is {i} + 0?", "answer": str(i),
                   "generations": [trace(i, j) for j in range(4)],
                   "correctness_math_verify": [j == 0 for j in range(4)], "is_reasoning_complete": [True] * 4}

    Dataset.from_generator(gen).save_to_disk(str(path))


def run_variant(variant: str, path: str, max_samples: int) -> None:
    import datasets  # noqa: F401  (imported before the baseline reading, like the rest)

    from reasoning_qat.data.qat_data import TraceSpec
    from reasoning_qat.data.tokenizer import build_char_tokenizer

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # after imports, before any data
    tok = build_char_tokenizer()
    data = TraceSpec(source=path, prompt_field="problem", response_field="generations", max_samples=max_samples,
                      max_length=100_000, select="first")
    t = time.perf_counter()
    if variant == "before":
        from datasets import load_from_disk

        from reasoning_qat.data.reasoning import select_fields, tokenize_example

        rows = [dict(r) for r in load_from_disk(path)]  # the old load_rows
        rows = select_fields(rows, data.prompt_field, data.response_field, data.max_samples)
        examples = [tokenize_example(tok, r["prompt"], r["response"], data.max_length) for r in rows]
        n = len(examples)
    else:
        from reasoning_qat.data.qat_data import open_dataset, select_traces, tokenize_traces

        kept, _ = tokenize_traces(select_traces(open_dataset(path), data), tok, data)
        n = len(kept)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"variant": variant, "examples": n, "seconds": round(wall, 2), "peak_rss_gib": round(peak, 3),
                      "data_gib": round(peak - base, 3)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--chars", type=int, default=6000, help="characters per generation")
    p.add_argument("--max-samples", type=int, default=500)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant == "fixture":
        return make_fixture(Path(a.path), a.rows, a.chars)
    if a.variant:
        return run_variant(a.variant, a.path, a.max_samples)
    from benchmarks.common import save

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fixture"
        # In a process of its own: Linux carries a parent's peak RSS into the children it starts,
        # so the parent must never hold the fixture.
        subprocess.run([sys.executable, __file__, "--variant", "fixture", "--path", str(path), "--rows", str(a.rows),
                        "--chars", str(a.chars)], check=True, capture_output=True)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        rows = []
        for variant in ("before", "after"):
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--path", str(path),
                                  "--max-samples", str(a.max_samples)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in rows:
        r["time_vs_before"] = r["seconds"] / rows[0]["seconds"]
        r["data_memory_vs_before"] = r["data_gib"] / max(rows[0]["data_gib"], 1e-3)
    save("data_loading", rows, {"fixture_rows": a.rows, "generations_per_row": 4, "chars_per_generation": a.chars,
                                "fixture_mib": round(size, 1), "max_samples": a.max_samples})


if __name__ == "__main__":
    main()
