"""Chunked KD loss vs naive full-logits KL: peak memory and time (forward + backward).

python benchmarks/kd_loss.py [--tokens 4096 8192] [--hidden 1024 2048]
"""

import argparse

import torch
from common import peak_memory, save

from reasoning_qat.kd import KDSpec, chunked_distill_loss, naive_distill_loss


def run(tokens, hidden, vocab=151936, chunk=1024):
    kd = KDSpec(loss="forward_kl", chunk_size=chunk)
    torch.manual_seed(0)
    head_s = torch.nn.Linear(hidden, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
    head_t = torch.nn.Linear(hidden, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
    h_s = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    h_t = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (1, tokens), device="cuda")

    def naive():
        with torch.no_grad():
            t_logits = head_t(h_t)
        naive_distill_loss(head_s(h_s), t_logits, labels, kd).backward()

    def chunked():
        sel = labels[:, 1:] != -100
        chunked_distill_loss(h_s[:, :-1][sel], h_t[:, :-1][sel], head_s, head_t, labels[:, 1:][sel], kd, chunk).backward()

    out = {}
    for name, fn in (("naive", naive), ("chunked", chunked)):
        fn()  # warm-up
        h_s.grad = None
        times, mems = zip(*(peak_memory(fn) for _ in range(3)))
        out[name] = (min(times), max(mems))
    return {"tokens": tokens, "hidden": hidden, "vocab": vocab, "naive_peak_gib": out["naive"][1],
            "chunked_peak_gib": out["chunked"][1], "memory_ratio_naive_over_chunked": out["naive"][1] / out["chunked"][1],
            "naive_s": out["naive"][0], "chunked_s": out["chunked"][0], "time_ratio_chunked_over_naive": out["chunked"][0] / out["naive"][0]}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    a = p.parse_args()
    save("kd_loss", [run(t, h) for h in a.hidden for t in a.tokens])
