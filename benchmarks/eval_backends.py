"""Eval throughput: the vLLM backend against the transformers backend on the same exported
checkpoint, measured side by side in one run (vLLM's CPU build here; the same script runs on a GPU).

Random-weight Qwen3 architectures with the demo's character tokenizer, saved as a plain (dequantized-
style) checkpoint; greedy decoding of `--new-tokens` tokens for `--prompts` chat prompts through each
backend's own `generate`. A random model rarely emits the end-of-turn token, so both decode the full
budget and the token counts match. Engine start-up is reported apart from generation.

    python benchmarks/eval_backends.py --archs demo small
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import save  # noqa: E402

SHAPES = {  # Qwen3 architecture, the demo's character vocabulary
    "demo": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
}


def build(arch: str, path: Path) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from reasoning_qat.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), max_position_embeddings=1024, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False, **SHAPES[arch])
    model = Qwen3ForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def measure(name: str, make, prompts: list[str], new_tokens: int) -> dict:
    t0 = time.perf_counter()
    engine = make()
    start = time.perf_counter() - t0
    try:
        engine.generate(prompts[:2], 1, 0.0, 1.0, -1, 8)  # warm-up
        t = time.perf_counter()
        out = engine.generate(prompts, 1, 0.0, 1.0, -1, new_tokens)
        gen = time.perf_counter() - t
    finally:
        engine.close()
    tokens = sum(c[0].num_tokens for c in out)
    return {"backend": name, "startup_s": round(start, 2), "generate_s": round(gen, 2), "new_tokens": tokens,
            "tokens_per_s": tokens / gen}


def main() -> None:
    from reasoning_qat.data.reasoning import generation_prompt
    from reasoning_qat.data.tokenizer import build_char_tokenizer
    from reasoning_qat.evaluation.backends import EngineSettings, TransformersBackend, VLLMBackend

    p = argparse.ArgumentParser()
    p.add_argument("--archs", nargs="+", default=["demo", "small"], choices=list(SHAPES))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    a = p.parse_args()
    tok = build_char_tokenizer()
    prompts = [generation_prompt(tok, f"What is ({i % 10}+{i // 10 % 10})*{1 + i % 9}?") for i in range(a.prompts)]
    settings = EngineSettings(gpu_memory_utilization=0.3)  # fp32 on CPU (auto)
    rows = []
    for arch in a.archs:
        with tempfile.TemporaryDirectory() as d:
            n = build(arch, Path(d))
            res = [measure("transformers", lambda: TransformersBackend(d, batch_size=a.prompts, settings=settings), prompts, a.new_tokens),
                   measure("vllm", lambda: VLLMBackend(d, settings=settings), prompts, a.new_tokens)]
        for r in res:
            rows.append({"arch": arch, "params_M": round(n / 1e6, 2), **r,
                         "vs_transformers": r["tokens_per_s"] / res[0]["tokens_per_s"]})
    save("eval_backends-cpu" if not torch.cuda.is_available() else "eval_backends-gpu", rows,
         {"prompts": a.prompts, "new_tokens": a.new_tokens, "decoding": "greedy", "dtype": "float32 on CPU, bf16 on GPU"})


if __name__ == "__main__":  # vLLM may start worker processes that re-import this module
    main()
