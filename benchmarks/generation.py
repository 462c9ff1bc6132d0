"""Generation throughput of the transformers eval backend (batch 64): BF16 vs the dequantized
low-bit export (what eval runs for 2/3-bit) vs the fake-quant student re-quantizing at every step
vs the same student with its quantized weights frozen for the generation (what RL rollouts run).

python benchmarks/generation.py [--arch qwen3-0.6b] [--batch 64] [--new-tokens 256]
"""

import argparse
import contextlib
import tempfile

import torch
from common import ARCHS, DEVICE, qwen3, save, timed
from transformers import AutoModelForCausalLM

from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant
from reasoning_qat.quant.fake_quant import frozen_fake_quant
from reasoning_qat.quant.formats import export_dequantized


def gen_fn(model, vocab, batch, prompt_len, new_tokens):
    ids = torch.randint(0, vocab, (batch, prompt_len), device=DEVICE)

    @torch.no_grad()
    def go():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return go


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--iters", type=int, default=3)
    a = p.parse_args()
    rows = []
    bf16 = qwen3(a.arch, torch.bfloat16).eval()

    def fake_quant_model():
        m = qwen3(a.arch, torch.bfloat16).eval()
        swap_in_fake_quant(m, QuantTargets(QuantScheme(a.bits, 128)))
        return m.to(DEVICE)

    with tempfile.TemporaryDirectory() as d:
        export_dequantized(fake_quant_model(), d)  # swaps the fake-quant modules out in place
        dq = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).to(DEVICE).eval()
    fq = fake_quant_model()
    n = a.batch * a.new_tokens
    results = {}
    variants = (("bf16", bf16, False), (f"dequantized_w{a.bits}", dq, False), (f"fake_quant_w{a.bits}", fq, False),
                (f"fake_quant_w{a.bits}_frozen", fq, True))
    for name, model, frozen in variants:
        with frozen_fake_quant(model) if frozen else contextlib.nullcontext():
            s = timed(gen_fn(model, ARCHS[a.arch]["vocab_size"], a.batch, a.prompt_len, a.new_tokens), warmup=1, iters=a.iters)
        results[name] = n / s
        rows.append({"model": name, "batch": a.batch, "new_tokens": a.new_tokens, "tokens_per_s": n / s,
                     "ratio_to_bf16": (n / s) / results["bf16"]})
        print(rows[-1], flush=True)
    save("generation", rows, {"arch": a.arch})
