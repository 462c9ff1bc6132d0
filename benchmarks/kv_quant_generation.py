"""Generation under W4A4KV4 (QuaRot's online Hadamards, 4-bit per-token activations, 4-bit K/V): K/V transformed
once as the KV cache stores them, against the whole cache rotated and quantized again at every decode step.

The rotation of the keys and the K/V quantization act per token, so both give the same tokens and logits (checked
here, and in tests/quant/test_rotation.py); the per-step path does work that grows with the cache, so its cost per
token grows with the length generated. The model has the GPU organism's shape (recipes/organism-gpu.yaml: 4
layers, hidden 512, 8 heads, 4 KV heads, head_dim 64), random weights, rotated and RTN-quantized (frozen, as
in GRPO rollouts); the prompts are random tokens, and every row generates exactly --new-tokens tokens.

    python benchmarks/kv_quant_generation.py [--batch 64] [--prompt 64] [--new-tokens 512] [--device cpu]

Prints the seconds and tokens/s of each path and the ratio, measured in one run; --out FILE.json keeps them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def organism_model(device: str, dtype: torch.dtype):
    """A W4A4KV4 model of the organism's shape: rotated (Hadamard), weights RTN-quantized, online parts installed."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from reasoning_qat.quant.fake_quant import swap_in_fake_quant
    from reasoning_qat.quant.rotation import rotate
    from reasoning_qat.quant.runtime import install_quant_spec
    from reasoning_qat.quant.scheme import (
        ActivationScheme,
        KVCacheScheme,
        QuantScheme,
        QuantSpec,
        QuantTargets,
        RotationScheme,
    )

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=102, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    rotate(model, seed=0)
    spec = QuantSpec(QuantTargets(QuantScheme(4, group_size=128)), ActivationScheme(4), KVCacheScheme(4),
                     RotationScheme("hadamard", 0))
    swap_in_fake_quant(model, spec.weights)
    install_quant_spec(model, spec)
    return model.to(device=device, dtype=dtype)


def timed_generate(model, ids, new_tokens: int):
    from reasoning_qat.quant.fake_quant import frozen_fake_quant

    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad(), frozen_fake_quant(model):  # weights quantized once, as in rollouts
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    at_write = organism_model(args.device, dtype)
    every_step = organism_model(args.device, dtype)
    every_step.kv_write_hook.remove()  # the attention function transforms the whole cache at every step
    ids = torch.randint(3, 102, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).to(args.device)
    timed_generate(at_write, ids[:, :8], 4)  # warm-up (allocator, kernels)
    timed_generate(every_step, ids[:, :8], 4)
    t_write, out_write = timed_generate(at_write, ids, args.new_tokens)
    t_step, out_step = timed_generate(every_step, ids, args.new_tokens)
    same_tokens = bool(torch.equal(out_write.sequences, out_step.sequences))
    logit_gap = max((a - b).abs().max().item() for a, b in zip(out_write.logits, out_step.logits))
    tokens = args.batch * args.new_tokens
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
        "batch": args.batch, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
        "kv_at_write_s": round(t_write, 2), "kv_every_step_s": round(t_step, 2),
        "kv_at_write_tokens_per_s": round(tokens / t_write), "kv_every_step_tokens_per_s": round(tokens / t_step),
        "speedup": round(t_step / t_write, 2), "same_tokens": same_tokens, "max_logit_gap": logit_gap,
    }
    print(f"W4A4KV4 generation, batch {args.batch}, {args.prompt} + {args.new_tokens} tokens, {result['device']}:")
    print(f"  K/V transformed as the cache stores them: {t_write:.1f} s ({result['kv_at_write_tokens_per_s']:,} tok/s)")
    print(f"  whole cache transformed every step:       {t_step:.1f} s ({result['kv_every_step_tokens_per_s']:,} tok/s)")
    print(f"  speedup {result['speedup']}x; same tokens: {same_tokens}; max logit gap {logit_gap:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
