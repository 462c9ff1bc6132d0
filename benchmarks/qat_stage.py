"""The real qat stage (`rqat run ... --stages qat`, KDTrainer) against a naive HF distillation loop,
measured side by side in one run on a random-init Qwen3 architecture.

Configurations (each in its own process, timed per optimizer step after 4 warm-up steps):
- `stage`: the qat stage as the recipe runs it (fused linear+KD loss, gradient checkpointing `auto`,
  compiled fake-quant, w4 g128 asymmetric, forward KL);
- `stage_no_recompute` / `stage_recompute`: `stage` with gradient checkpointing off / on (`auto`
  picks one of the two);
- `stage_unfused`: the loss as it was before the speed work (checkpointed chunked loss, float32
  head), gradient checkpointing on;
- `stage_no_fq`: `stage` with fake-quant swapped out (same trainer, BF16 student): QAT's own cost;
- `naive`: 60 lines of plain PyTorch: bf16 weights, full logits, chunked float32 KL, fused AdamW.

Hardware utilisation: 8 x params FLOPs per token (student forward+backward, teacher forward)
against the bf16 matmul rate measured in the same run.

python benchmarks/qat_stage.py [--arch qwen3-0.6b] [--seq 4096] [--batch 4] [--configs stage naive ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ARCHS, DEVICE, bf16_matmul_tflops, qwen3, save, scratch_dir

CONFIGS = ("stage", "stage_no_recompute", "stage_recompute", "stage_unfused", "stage_no_fq", "naive")


def make_model_and_data(arch: str, root: Path, seq: int) -> tuple[Path, Path]:
    from reasoning_qat.data.tokenizer import build_char_tokenizer

    model_dir, data = root / "model", root / "qat.jsonl"
    if not model_dir.is_dir():
        m = qwen3(arch, torch.bfloat16, device="cpu")  # built on the CPU: this process holds no GPU memory
        tok = build_char_tokenizer()
        m.config.eos_token_id, m.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
        m.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del m
    rnd = random.Random(0)
    with open(data, "w") as f:  # every row longer than seq tokens (character tokenizer): truncated to fill it
        for i in range(64):
            resp = " ".join(str(rnd.randint(0, 99999)) for _ in range(seq // 5 + 50))
            f.write(json.dumps({"prompt": f"Compute {i}+{i}.", "response": f"<think>\n{resp}\n</think>\n\\boxed{{{2 * i}}}"}) + "\n")
    return model_dir, data


def recipe_text(model_dir: Path, data: Path, seq: int, batch: int, steps: int, config: str) -> str:
    qat_extra = {"stage_unfused": "gradient_checkpointing: true\n  kd: {loss: forward_kl, chunk_size: 1024, fused: false}",
                 "stage_no_recompute": "gradient_checkpointing: false\n  kd: {loss: forward_kl, chunk_size: 1024}",
                 "stage_recompute": "gradient_checkpointing: true\n  kd: {loss: forward_kl, chunk_size: 1024}",
                 }.get(config, "kd: {loss: forward_kl, chunk_size: 1024}")
    return f"""name: bench-qat-stage
model: {{id: {model_dir}, dtype: bfloat16}}
quant: {{bits: [4], group_size: 128, symmetric: false}}
calibration: {{domain: reasoning, num_samples: 4, seq_len: 256}}
ptq: {{method: rtn, baselines: []}}
qat:
  init: ptq
  {qat_extra}
  data: {{source: {data}, max_length: {seq}, overlength: truncate, prompt_field: prompt, response_field: response}}
  max_steps: {steps}
  batch_size: {batch}
  compile: true
  logging_steps: 5
  save_steps: 100000
export: {{formats: [dequantized]}}
eval: {{tasks: [math500], backend: transformers}}
"""


class StepTimer:
    """Wall time of each optimizer step (synchronised), and the peak memory of the steps."""

    def __init__(self):
        from transformers import TrainerCallback

        self.times: list[float] = []
        self.profile = os.environ.get("PROFILE") == "1"  # torch.profiler table of steps 7-9 in the output
        outer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None

            def on_step_begin(self, args, state, control, **kw):
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                if outer.profile and state.global_step == 6:
                    acts = [torch.profiler.ProfilerActivity.CUDA if torch.cuda.is_available() else torch.profiler.ProfilerActivity.CPU]
                    outer.prof = torch.profiler.profile(activities=acts)
                    outer.prof.__enter__()
                outer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                outer.times.append(time.perf_counter() - outer.t0)
                if outer.profile and state.global_step == 9:  # steps 7-9
                    outer.prof.__exit__(None, None, None)
                    print(outer.prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total", row_limit=30, max_name_column_width=70),
                          flush=True)

        self.callback = _CB()


def run_stage(config: str, root: Path, model_dir: Path, data: Path, a) -> dict:
    """One qat stage run, in this process, on the run directory shared by all configurations."""
    import reasoning_qat.kd as kd
    import reasoning_qat.stages.qat as qat_stage
    from reasoning_qat.cli import main

    timer = StepTimer()
    init = kd.KDTrainer.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(timer.callback)

    kd.KDTrainer.__init__ = patched
    if config == "stage_no_fq":  # benchmark-only: the student keeps plain Linear layers
        qat_stage.prepare = lambda *args, **kwargs: {}
        qat_stage.read_quantized_weights = lambda *args, **kwargs: ({}, None, None)
        qat_stage.save_quantized_checkpoint = lambda *args, **kwargs: None
    recipe = root / f"{config}.yaml"
    recipe.write_text(recipe_text(model_dir, data, a.seq, a.batch, a.steps, config))
    rc = main(["run", str(recipe), "--run-root", str(root / "runs"), "--stages", "teacher,calibrate,ptq"])
    assert rc in (0, None), rc
    rc = main(["run", str(recipe), "--run-root", str(root / "runs"), "--stages", "qat", "--force"])
    assert rc in (0, None), rc
    metrics = json.loads(next((root / "runs").glob("*/qat/*/qat_metrics.json")).read_text())
    steady = timer.times[4:]
    return {"median_step_s": statistics.median(steady), "steps_timed": len(steady),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
            "gradient_checkpointing": metrics.get("gradient_checkpointing"),
            "gradient_checkpointing_reason": metrics.get("gradient_checkpointing_reason")}


def _kl(s, t):
    s_logp, t_logp = s.float().log_softmax(-1), t.float().log_softmax(-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()


def run_naive(arch: str, a) -> dict:
    """A plain distillation loop: bf16 weights, full logits, chunked float32 forward KL, fused AdamW."""
    teacher = qwen3(arch, torch.bfloat16).eval().requires_grad_(False)
    student = qwen3(arch, torch.bfloat16, seed=1).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=DEVICE == "cuda")
    vocab = ARCHS[arch]["vocab_size"]
    times = []
    torch.cuda.reset_peak_memory_stats() if DEVICE == "cuda" else None
    for _ in range(a.steps):
        ids = torch.randint(0, vocab, (a.batch, a.seq), device=DEVICE)
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
        n = s_logits.shape[0] * s_logits.shape[1]
        s_flat, t_flat = s_logits.view(n, -1), t_logits.view(n, -1)
        loss = 0.0
        for i in range(0, n, 1024):  # float32 KL per chunk, recomputed in the backward pass (else 10 GiB of log-probs)
            loss = loss + torch.utils.checkpoint.checkpoint(_kl, s_flat[i : i + 1024], t_flat[i : i + 1024],
                                                            use_reentrant=False)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize() if DEVICE == "cuda" else None
        times.append(time.perf_counter() - t0)
    steady = times[4:]
    return {"median_step_s": statistics.median(steady), "steps_timed": len(steady),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0,
            "gradient_checkpointing": False}


def worker(a) -> None:
    root = Path(a.root)
    model_dir, data = root / "model", root / "qat.jsonl"
    res = run_naive(a.arch, a) if a.worker == "naive" else run_stage(a.worker, root, model_dir, data, a)
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen3-0.6b", choices=list(ARCHS))
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--root", help="working directory (default: a temporary one)")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="")
    p.add_argument("--profile", nargs="*", default=[], choices=CONFIGS, help="print a torch.profiler table of these")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    root = scratch_dir("qat_stage_", a.root)
    make_model_and_data(a.arch, root, a.seq)
    tokens = a.batch * a.seq
    params = qwen3_params(a.arch)
    peak = bf16_matmul_tflops() if DEVICE == "cuda" else float("nan")
    torch.cuda.empty_cache() if DEVICE == "cuda" else None
    out = {}
    for config in a.configs:
        cmd = [sys.executable, __file__, "--worker", config, "--root", str(root), "--arch", a.arch, "--seq", str(a.seq),
               "--batch", str(a.batch), "--steps", str(a.steps)]
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1",
                              "PROFILE": "1" if config in a.profile else "0"})
        if config in a.profile:
            print("\n".join(x for x in done.stdout.splitlines() if "|" not in x or "%" in x or "Name" in x), flush=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode != 0 or not line:
            print(done.stdout[-3000:], done.stderr[-6000:], file=sys.stderr)
            errors = [x for x in done.stderr.splitlines() if "Error" in x] or ["?"]
            out[config] = {"error": errors[-1][:100]}
            continue
        res = json.loads(line[0][7:])
        res["tokens_per_s"] = tokens / res["median_step_s"]
        res["hardware_fraction"] = 8 * params * res["tokens_per_s"] / (peak * 1e12)
        res["process_wall_s"] = time.time() - t0
        out[config] = res
        print(config, json.dumps(res), flush=True)
    ok = {c: r for c, r in out.items() if "tokens_per_s" in r}
    extra = {"arch": a.arch, "params": params, "tokens_per_step": tokens, "bf16_matmul_tflops": round(peak, 1)}
    if "stage" in ok and "naive" in ok:
        extra["stage_over_naive_tokens_per_s"] = round(ok["stage"]["tokens_per_s"] / ok["naive"]["tokens_per_s"], 3)
    if "stage" in ok and "stage_unfused" in ok:
        extra["stage_over_unfused_tokens_per_s"] = round(ok["stage"]["tokens_per_s"] / ok["stage_unfused"]["tokens_per_s"], 3)
    if "stage" in ok and "stage_no_fq" in ok:
        extra["fake_quant_cost_step_time"] = round(ok["stage"]["median_step_s"] / ok["stage_no_fq"]["median_step_s"], 3)
    cols = ("tokens_per_s", "hardware_fraction", "peak_gib", "median_step_s", "gradient_checkpointing")
    rows = [{"config": c, **{k: r.get(k, r.get("error", "")) for k in cols}} for c, r in out.items()]
    save(f"qat_stage-{a.arch}{a.tag}", rows, extra)


def qwen3_params(arch: str) -> int:
    with torch.device("meta"):
        m = qwen3(arch, torch.bfloat16, device="meta")
    return sum(p.numel() for p in m.parameters())


if __name__ == "__main__":
    main()
