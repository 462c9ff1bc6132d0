"""Decode throughput of the exports in vLLM against their BF16 model, and their size on disk.

    python research/real_models/serve_bench.py OUT.json MODEL_DIR:LABEL [MODEL_DIR:LABEL ...] [--batches 1,16,256]

Each model is served in its own process (vLLM's defaults: torch.compile and CUDA graphs, bfloat16), warmed up,
then timed at each batch size: `batch` prompts of 32 tokens, 256 new tokens each, greedy, EOS ignored. Decode
tokens/s = batch x 256 / wall time of the generate call (prefill of 32 tokens included: under 2% of the work).
The log line `Using ... kernel` / `... for CompressedTensorsWNA16` names the kernel vLLM chose.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

NEW_TOKENS, PROMPT_TOKENS = 256, 32


def size_on_disk(model: Path) -> int:
    """Bytes of the weight files (safetensors) of a checkpoint directory."""
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


def serve_one(model: str, batches: list[int]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(model=model, seed=0, gpu_memory_utilization=0.5, max_model_len=1024, dtype="bfloat16")
    res = {"init_s": round(time.time() - t0, 1)}
    vocab = llm.get_tokenizer().vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=[(17 * i + 31 * j) % (vocab - 100) + 50 for j in range(PROMPT_TOKENS)])
               for i in range(max(batches))]
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up: compile, graphs
    for b in batches:
        t = time.time()
        outs = llm.generate(prompts[:b], params, use_tqdm=False)
        s = time.time() - t
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        res[f"batch{b}"] = {"seconds": round(s, 3), "tokens": tokens, "tok_per_s": round(tokens / s, 1)}
    first = outs[0].outputs[0].token_ids[:16]
    res["first_tokens"] = list(first)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("models", nargs="+", help="MODEL_DIR:LABEL")
    p.add_argument("--batches", default="1,16,256")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    if a.one:
        print("SERVED " + json.dumps(serve_one(a.one, batches)), flush=True)
        os._exit(0)  # vLLM's engine core otherwise outlives the measurement
    results = []
    for item in a.models:
        model, _, label = item.rpartition(":")
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, a.out, item, "--batches", a.batches, "--one", model],
                              capture_output=True, text=True, timeout=600, check=False)
        log = proc.stdout + proc.stderr
        kernel = [line.split("]", 1)[-1].strip() for line in log.splitlines()
                  if "kernel" in line.lower() and ("Using" in line or "using" in line)][:3]
        row = {"label": label, "model": model, "size_bytes": size_on_disk(Path(model)), "rc": proc.returncode,
               "kernel": kernel, "wall_s": round(time.time() - t, 1)}
        served = [line for line in log.splitlines() if line.startswith("SERVED ")]
        if served:
            row |= json.loads(served[-1][len("SERVED "):])
        else:
            row["error"] = [line for line in log.splitlines() if "Error" in line][-3:]
        print(json.dumps(row), flush=True)
        results.append(row)
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
