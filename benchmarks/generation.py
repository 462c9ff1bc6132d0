"""Generation throughput of the transformers eval backend (batch 64): BF16 vs the dequantized
low-bit export (what eval runs for 2/3-bit) vs the fake-quant student re-quantizing at every step
vs the same student with its quantized weights frozen for the generation (what RL rollouts run).
Then the eval backend itself (`TransformersBackend` on a saved checkpoint, sampled, prompts of
mixed lengths) with the dynamic KV cache and with the static cache + compiled decode step that
`eval.static_cache: auto` picks on a GPU (first call, which compiles, excluded from the timing).

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


def backend_rows(model, a) -> list[dict]:
    import time

    from reasoning_qat.data.tokenizer import build_char_tokenizer
    from reasoning_qat.evaluation.backends import EngineSettings, TransformersBackend

    tok = build_char_tokenizer()
    prompts = [f"<|im_start|>user\nProblem {i}: " + "x" * (20 + 7 * (i % 13)) + "<|im_end|>\n<|im_start|>assistant\n"
               for i in range(a.batch)]
    out, rates = [], {}
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        for static in (False, True):
            backend = TransformersBackend(d, batch_size=a.batch, settings=EngineSettings(static_cache=static))
            run = lambda: backend.generate(prompts, k=1, temperature=1.0, top_p=1.0, top_k=0,  # noqa: E731
                                           max_new_tokens=a.new_tokens, seed=0)
            run()  # warm-up (compiles the decode step for the static cache)
            sync_t = time.perf_counter()
            total = 0
            for _ in range(a.iters):
                total += sum(c[0].num_tokens for c in run())
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            rate = total / (time.perf_counter() - sync_t)
            name = "eval_backend_static_compiled" if static else "eval_backend_dynamic"
            rates[name] = rate
            out.append({"model": name, "batch": a.batch, "new_tokens": a.new_tokens, "tokens_per_s": rate,
                        "ratio_to_bf16": rate / rates["eval_backend_dynamic"]})
            print(out[-1], flush=True)
            backend.close()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--backend-only", action="store_true", help="only the eval backend rows (dynamic vs static cache)")
    a = p.parse_args()
    rows = []
    bf16 = qwen3(a.arch, torch.bfloat16).eval()
    if a.backend_only:
        save("generation-backend", backend_rows(bf16, a), {"arch": a.arch})
        raise SystemExit

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
    rows += backend_rows(bf16, a)
    save("generation", rows, {"arch": a.arch})

