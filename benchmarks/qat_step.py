"""KD-QAT step vs a plain BF16 fine-tune step with the same teacher forward and the same chunked
KD loss: throughput, peak memory and MFU against the measured bf16 matmul rate.

Both students keep float32 master weights under bf16 autocast with fused AdamW, as the qat stage
does; the only difference is the fake-quant Linear layers (w4 g128, learnable scales), run eagerly
and through torch.compile (`qat.compile: true`).

python benchmarks/qat_step.py [--archs qwen3-0.6b qwen3-1.7b] [--seq-len 4096] [--bits 4]
"""

import argparse

import torch
from common import ARCHS, bf16_matmul_tflops, peak_memory, qwen3, save, timed

from reasoning_qat.kd import KDSpec, chunked_distill_loss, hidden_and_head
from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant
from reasoning_qat.quant.fake_quant import use_compiled_fake_quant


def step_fn(student, teacher, ids, kd, opt):
    labels = ids.clone()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h_s, head_s = hidden_and_head(student, student, ids, None)
            with torch.no_grad():
                h_t, head_t = hidden_and_head(teacher, teacher, ids, None)
            sel = labels[:, 1:] != -100
            loss = chunked_distill_loss(h_s[:, :-1][sel], h_t[:, :-1][sel], head_s, head_t, labels[:, 1:][sel], kd, kd.chunk_size)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def flops_per_step(arch, tokens):
    a = ARCHS[arch]
    d, L, V, inter = a["hidden_size"], a["num_hidden_layers"], a["vocab_size"], a["intermediate_size"]
    attn_proj = d * a["num_attention_heads"] * a["head_dim"] * 2 + d * a["num_key_value_heads"] * a["head_dim"] * 2
    n = L * (attn_proj + 3 * d * inter) + V * d  # matmul parameters, lm_head included
    attn = 2 * 2 * L * a["num_attention_heads"] * a["head_dim"] * tokens * tokens / 2  # causal QK^T and AV, forward
    fwd = 2 * n * tokens + attn
    return 3 * fwd + fwd  # student forward+backward, teacher forward


def run(arch, seq_len, bits, peak_tflops):
    kd = KDSpec(loss="forward_kl", chunk_size=1024)
    teacher = qwen3(arch, torch.bfloat16).eval().requires_grad_(False)
    ids = torch.randint(0, ARCHS[arch]["vocab_size"], (1, seq_len), device="cuda")
    out = {"arch": arch, "seq_len": seq_len}
    q = f"w{bits}g128"
    for kind in ("bf16", q, f"{q}_compiled"):
        student = qwen3(arch, torch.float32).train()
        student.config.use_cache = False
        if kind != "bf16":
            swap_in_fake_quant(student, QuantTargets(QuantScheme(bits, 128)))
            use_compiled_fake_quant(student, kind.endswith("compiled"))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
        step = step_fn(student, teacher, ids, kd, opt)
        s = timed(step, warmup=3, iters=10)
        _, mem = peak_memory(step)
        out[f"{kind}_step_s"] = s
        out[f"{kind}_tokens_per_s"] = seq_len / s
        out[f"{kind}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[f"{kind}_mfu"] = flops_per_step(arch, seq_len) / s / 1e12 / peak_tflops
        del student, opt, step
        torch.cuda.empty_cache()
    for v in (q, f"{q}_compiled"):
        out[f"{v}_over_bf16_step_time"] = out[f"{v}_step_s"] / out["bf16_step_s"]
        out[f"{v}_over_bf16_peak_mem"] = out[f"{v}_peak_gib"] / out["bf16_peak_gib"]
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--archs", nargs="+", default=list(ARCHS))
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--bits", type=int, default=4)
    a = p.parse_args()
    peak = bf16_matmul_tflops()
    rows = []
    for arch in a.archs:
        torch.cuda.reset_peak_memory_stats()
        rows.append(run(arch, a.seq_len, a.bits, peak))
    save("qat_step", rows, {"measured_bf16_matmul_tflops": peak})
