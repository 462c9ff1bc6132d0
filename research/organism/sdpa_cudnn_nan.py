"""Does SDPA's cuDNN backward give a NaN query gradient here, and does `training.sdpa_cudnn(False)` stop it?

The cause named for the rare NaN-gradient GRPO step (research/organism/README.md, "The cause"):
pytorch/pytorch#196678 (also huggingface/trl#7181). On H100/H200 with torch >= 2.11, cuDNN's SDPA backward
returns NaN in grad_q when a mask is passed, the padded length L is 64 mod 128 and a query row's logsumexp is
below -88.7 (ln FLT_MAX). This script measures it two ways, for L in --lengths (64 mod 128 and not):

- kernel: the torch-only reproduction of pytorch#196678 (every logit ~ -120, causal boolean mask), and a left-padded
  batch (random q/k/v; the first rows of one sequence are padding, so their query rows are fully masked, as a
  GRPO micro-batch of left-padded prompts has them), through SDPA as PyTorch picks its kernel (`default`), with
  cuDNN forced (`cudnn`), and inside `training.sdpa_cudnn(False)` (`cudnn_off`, what the training stages run);
- model (--model DIR, a transformers checkpoint such as a run's teacher/model): one forward and backward of a
  left-padded batch through the model, bf16, SDPA (`default`, `cudnn`, `cudnn_off`) and eager attention, the loss a
  cross-entropy over the non-pad tokens; it lists the parameters whose gradient is non-finite, to compare with
  the records of the GPU runs' skipped steps (`nonfinite_steps.jsonl`).

    python research/organism/sdpa_cudnn_nan.py [--model DIR] [--lengths 576 640 704 768] [--out FILE.json]

Prints one line per case and writes them all to --out (JSON). On a machine without CUDA the cuDNN modes are
left out (nothing to measure there); the rest runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from reasoning_qat.training import sdpa_cudnn


def modes(device: str) -> dict:
    """{name: a context-manager factory} for the SDPA kernel choices measured on `device`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {"default": nullcontext, "math": lambda: sdpa_kernel([SDPBackend.MATH])}
    if device == "cuda":
        out["cudnn"] = lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
        out["cudnn_off"] = lambda: sdpa_cudnn(False)
    return out


def kernel_inputs(kind: str, length: int, device: str, head_dim: int = 64, pad: int = 37):
    """(q, k, v, boolean mask), bf16 on `device`, of shape (batch, heads, length, head_dim) and a mask
    (batch, 1, length, length). `low_lse`: pytorch#196678's reproduction, one sequence whose every logit is
    ~ -120. `left_padded`: two sequences of random q/k/v, the second with `pad` leading pad positions, causal
    mask over the non-pad keys (its first `pad` query rows see no key: logsumexp -inf)."""
    g = torch.Generator().manual_seed(0)
    if kind == "low_lse":
        q, k = (torch.randn(1, 1, length, head_dim, generator=g) * 0.1 for _ in range(2))
        v = torch.randn(1, 1, length, head_dim, generator=g)
        q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(head_dim)
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    else:
        q, k, v = (torch.randn(2, 4, length, head_dim, generator=g) for _ in range(3))
        keep = torch.ones(2, length, dtype=torch.bool)
        keep[1, :pad] = False
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    return [t.to(device, torch.bfloat16) for t in (q, k, v)] + [mask.to(device)]


def kernel_case(kind: str, length: int, mode: str, ctx, device: str) -> dict:
    """Non-finite counts of SDPA's output and its q/k/v gradients for one input kind, length and kernel mode."""
    q, k, v, mask = kernel_inputs(kind, length, device)
    for t in (q, k, v):
        t.requires_grad_()
    with ctx():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))

    def bad(t):
        return int((~torch.isfinite(t)).sum())

    return {"part": "kernel", "input": kind, "length": length, "length_mod_128": length % 128, "mode": mode,
            "out_nonfinite": bad(out), "grad_q_nonfinite": bad(q.grad), "grad_k_nonfinite": bad(k.grad),
            "grad_v_nonfinite": bad(v.grad)}


def model_case(model_dir: str, length: int, mode: str, ctx, device: str, pads=(0, 17, 40, 63)) -> dict:
    """One forward/backward of a left-padded batch (one row per entry of `pads`, that many leading pad tokens,
    padded to `length`) through the checkpoint at `model_dir`; the parameters whose gradient is non-finite."""
    from transformers import AutoModelForCausalLM

    attn = "eager" if mode == "eager" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attn).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (len(pads), length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = model.config.pad_token_id or 0
    ids, mask = ids.to(device), mask.to(device)
    with ctx():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    return {"part": "model", "length": length, "length_mod_128": length % 128, "mode": mode,
            "loss_finite": bool(torch.isfinite(loss)), "nonfinite_parameters": len(bad),
            "of_parameters": sum(1 for _ in model.parameters()), "nonfinite_names": bad}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a transformers checkpoint directory (e.g. runs/<run>/teacher/model)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[576, 640, 704, 768])
    ap.add_argument("--out", help="write every case here as JSON")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "cudnn": torch.backends.cudnn.version() if device == "cuda" else None}
    print(json.dumps(env), flush=True)
    cases = []
    for length in args.lengths:
        for kind in ("low_lse", "left_padded"):
            for mode, ctx in modes(device).items():
                cases.append(kernel_case(kind, length, mode, ctx, device))
                print(json.dumps(cases[-1]), flush=True)
        if args.model:
            model_modes = {m: c for m, c in modes(device).items() if m != "math"}
            for mode, ctx in {**model_modes, "eager": nullcontext}.items():
                cases.append(model_case(args.model, length, mode, ctx, device))
                print(json.dumps(cases[-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"env": env, "cases": cases}, indent=1) + "\n")
    return cases


if __name__ == "__main__":
    main()
