"""Generation under W4A4KV4 (QuaRot's online Hadamards, 4-bit per-token activations, 4-bit K/V): K/V transformed
once as the KV cache stores them, against the whole cache rotated and quantized again at every decode step.

The rotation of the keys and the K/V quantization act per token, so both give the same tokens (checked here; the
logits in tests/quant/test_rotation.py); the per-step path does work that grows with the cache, so its cost per
token grows with the length generated. The model and scheme are the GPU organism's W4A4KV4 column
(recipes/organism-gpu.yaml with quant.preset=w4a4kv4 and ptq.rotation=hadamard, built by the stages' own
`demo_config` and `quant_spec`), random weights, rotated and RTN-quantized (frozen, as in GRPO rollouts and the
eval of a student). Generation goes through the eval stage's backend (`TransformersBackend.generate`:
left-padded batches, the end tokens); the prompts are chat-formatted +/- chains of varied length, decoded greedily.

    python benchmarks/kv_quant_generation.py [--batch 64] [--new-tokens 512] [--device cpu]

Each path is warmed up at the full batch, then timed twice in the order A B B A (the first long generation of a
process pays a one-time cost on a GPU, about 25 s on an H200), and the faster of its two timings is kept.
Prints the seconds and tokens/s of each path and the ratio, measured in one run; --out FILE.json keeps them.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
W4A4KV4 = ["quant.bits=[4]", "quant.preset=w4a4kv4", "ptq.rotation=hadamard"]


def organism_backend(batch: int, device: str, dtype: torch.dtype):
    """The eval backend over a W4A4KV4 model of the organism's shape and scheme: rotated (Hadamard), weights
    RTN-quantized, online parts installed."""
    from transformers import Qwen3ForCausalLM

    from reasoning_qat.data.tokenizer import build_char_tokenizer
    from reasoning_qat.evaluation.backends import TransformersBackend
    from reasoning_qat.models import demo_config
    from reasoning_qat.quant import prepare
    from reasoning_qat.quant.rotation import rotate
    from reasoning_qat.recipe import load_recipe
    from reasoning_qat.stages.specs import quant_spec

    recipe = load_recipe(ROOT / "recipes" / "organism-gpu.yaml", W4A4KV4)
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(demo_config(recipe.model.demo, tok)).eval()
    rotate(model, seed=recipe.ptq.rotation_seed)
    spec = quant_spec(recipe, 4)
    prepare(model, spec)
    return TransformersBackend.from_model(model.to(device=device, dtype=dtype), tok, batch_size=batch)


def chain_prompts(tok, n: int, seed: int = 0) -> list[str]:
    """n chat-formatted prompts: +/- chains of 4-8 numbers of 3-4 digits (the organism's problems' length range)."""
    rng = random.Random(seed)
    chains = [" ".join(f"{rng.choice('+-')} {rng.randint(100, 9999)}" for _ in range(rng.randint(4, 8)))[2:]
              for _ in range(n)]
    return [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
            for c in chains]


def timed_generate(backend, prompts: list[str], new_tokens: int):
    from reasoning_qat.quant.fake_quant import frozen_fake_quant

    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with frozen_fake_quant(backend.model):  # weights quantized once, as in rollouts and a student's eval
        out = backend.generate(prompts, 1, 0.0, 1.0, -1, new_tokens)
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, [c[0] for c in out]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    at_write = organism_backend(args.batch, args.device, dtype)
    every_step = organism_backend(args.batch, args.device, dtype)
    every_step.model.kv_write_hook.remove()  # the attention function transforms the whole cache at every step
    prompts = chain_prompts(at_write.tokenizer, args.batch)
    timed_generate(at_write, prompts, 8)  # warm-up at the full batch (allocator, kernels, autotuning)
    timed_generate(every_step, prompts, 8)
    # each path twice, in the order A B B A, so neither gains from running second; the faster of each pair
    runs = {"write": [], "step": []}
    for path in ("write", "step", "step", "write"):
        runs[path].append(timed_generate(at_write if path == "write" else every_step, prompts, args.new_tokens))
    t_write, out_write = min(runs["write"], key=lambda r: r[0])
    t_step, out_step = min(runs["step"], key=lambda r: r[0])
    rows_same = sum(a.text == b.text for a, b in zip(out_write, out_step))
    same_tokens = rows_same == len(out_write)
    tokens = sum(c.num_tokens for c in out_write)
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
        "batch": args.batch, "max_new_tokens": args.new_tokens, "generated_tokens": tokens,
        "kv_at_write_s": round(t_write, 2), "kv_every_step_s": round(t_step, 2),
        "kv_at_write_tokens_per_s": round(tokens / t_write), "kv_every_step_tokens_per_s": round(tokens / t_step),
        "speedup": round(t_step / t_write, 2), "same_tokens": same_tokens, "rows_with_same_tokens": rows_same,
        "all_times_s": {k: [round(t, 2) for t, _ in v] for k, v in runs.items()},
    }
    print(f"W4A4KV4 generation, batch {args.batch}, up to {args.new_tokens} new tokens ({tokens:,} in all), "
          f"{result['device']}:")
    print(f"  K/V transformed as the cache stores them: {t_write:.1f} s ({result['kv_at_write_tokens_per_s']:,} tok/s)")
    print(f"  whole cache transformed every step:       {t_step:.1f} s ({result['kv_every_step_tokens_per_s']:,} tok/s)")
    print(f"  speedup {result['speedup']}x; same tokens in {rows_same} of {len(out_write)} rows; "
          f"all timings {result['all_times_s']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
