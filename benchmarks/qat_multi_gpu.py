"""The real qat stage across GPUs (issue 29 item 5): one GPU against two with DDP, FSDP2 and ZeRO-3, on a
random-init Qwen3 architecture.

The run's teacher, calibrate and ptq stages are made once (`rqat run --stages teacher,calibrate,ptq`, W4G128
RTN); each configuration then runs the qat stage's own `train_one` under `accelerate launch`, as the stage
launches itself (the same FSDP2 environment, `qat.distributed`, the shipped ZeRO-3 config), with a timer on
every optimizer step (medians after 4 warm-up steps; the final checkpoint is not written). Reported per
configuration:
- tokens/s over all GPUs (sequences x length per step / step time);
- useful MFU per GPU: 8 x params FLOPs per token (student forward + backward, teacher forward) against the
  bf16 matmul rate measured in the same run;
- peak memory per GPU (largest over the ranks) and the KD loss path (fused / chunked);
- scaling efficiency of a multi-GPU configuration against the first 1-GPU one: tok/s / (GPUs x 1-GPU tok/s).

python benchmarks/qat_multi_gpu.py --arch qwen3-1.7b --configs 1gpu:1:ddp ddp:2:ddp fsdp2:2:fsdp2
  (NAME:PROCESSES:DISTRIBUTED, DISTRIBUTED one of ddp, fsdp2, zero3)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ARCHS, DEVICE, bf16_matmul_tflops, save, scratch_dir
from qat_stage import StepTimer, make_model_and_data, qwen3_params, recipe_text

ROOT = Path(__file__).resolve().parents[1]
ZERO3 = ROOT / "recipes" / "accelerate" / "zero3.json"


def prepare(a, root: Path) -> Path:
    """Model, data and the run's stages up to ptq; returns the run directory."""
    model_dir, data = make_model_and_data(a.arch, root, a.seq)
    recipe = root / "bench.yaml"
    text = recipe_text(model_dir, data, a.seq, a.batch, a.steps, "stage").replace("compile: true", f"compile: {a.compile}")
    recipe.write_text(text.replace("name: bench-qat-stage", "name: bench-qat-multi-gpu"))
    run = root / "runs" / "bench-qat-multi-gpu"
    if not (run / "ptq").is_dir():
        subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(recipe), "--run-root", str(root / "runs"),
                        "--stages", "teacher,calibrate,ptq"], check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    return run


def worker(a) -> None:
    """One configuration, inside `accelerate launch`: the qat stage's train_one with a step timer."""
    from reasoning_qat import kd
    from reasoning_qat.pipeline import StageContext, recipe_from_run
    from reasoning_qat.recipe import Recipe, apply_overrides
    from reasoning_qat.stages import qat

    run = Path(a.run_dir)
    zero3 = a.distributed == "zero3"
    data = apply_overrides(recipe_from_run(run).model_dump(mode="json"), {
        "qat.distributed": "deepspeed" if zero3 else a.distributed, "qat.deepspeed": str(ZERO3) if zero3 else None,
        "qat.num_processes": a.processes})
    recipe = Recipe.model_validate(data)
    timer, init = StepTimer(), kd.KDTrainer.__init__
    trainers = []

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(timer.callback)
        trainers.append(self)

    kd.KDTrainer.__init__ = patched
    qat.save_quantized_checkpoint = lambda *args, **kwargs: None  # the 8B checkpoint would take longer than the steps
    out = run / f".bench-{a.name}"
    ctx = StageContext(recipe, run, out, {}, stage="qat")
    qat.train_one(ctx, recipe.quant.bits[0])
    steady = timer.times[4:]
    metrics = json.loads(next(out.glob("*/qat_metrics.json")).read_text()) if trainers[0].is_world_process_zero() else {}
    print("RESULT " + json.dumps({
        "rank": int(os.environ.get("RANK", "0")), "median_step_s": statistics.median(steady), "steps_timed": len(steady),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        "kd_path": ",".join(sorted(trainers[0].loss_paths)),
        "gradient_checkpointing": metrics.get("gradient_checkpointing")}), flush=True)


def launch(a, run: Path, name: str, nproc: int, distributed: str) -> dict:
    from reasoning_qat.stages.qat import FSDP2_ENV

    shutil.rmtree(run / f".bench-{name}", ignore_errors=True)
    if torch.cuda.is_available():
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc)]
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(ZERO3)] if distributed == "zero3" else \
            (["--multi_gpu"] if nproc > 1 else [])
    else:  # the CPU smoke test (--arch tiny): torch's launcher, as the stage does off a GPU
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [__file__, "--worker", "--run-dir", str(run), "--name", name, "--processes", str(nproc), "--distributed", distributed]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(FSDP2_ENV if distributed == "fsdp2" else {})}
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout, check=False)
    ranks = [json.loads(x[7:]) for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or len(ranks) != nproc:
        print(done.stdout[-3000:], done.stderr[-6000:], file=sys.stderr)
        errors = [x for x in done.stderr.splitlines() if "Error" in x] or ["?"]
        return {"error": errors[-1][:160]}
    step = statistics.median(r["median_step_s"] for r in ranks)
    first = min(ranks, key=lambda r: r["rank"])
    return {"gpus": nproc, "distributed": distributed, "median_step_s": step,
            "tokens_per_s": nproc * a.batch * a.seq / step, "peak_gib_per_gpu": max(r["peak_gib"] for r in ranks),
            "kd_path": first["kd_path"], "gradient_checkpointing": first["gradient_checkpointing"],
            "process_wall_s": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="qwen3-1.7b", choices=list(ARCHS))
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--compile", default="true")
    p.add_argument("--configs", nargs="+", default=["1gpu:1:ddp", "ddp:2:ddp", "fsdp2:2:fsdp2"])
    p.add_argument("--root", help="working directory, kept between calls (default: a temporary one)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per configuration")
    p.add_argument("--tag", default="")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--distributed", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    root = scratch_dir("qat_multi_gpu_", a.root)
    run = prepare(a, root)
    params = qwen3_params(a.arch)
    peak = bf16_matmul_tflops() if DEVICE == "cuda" else float("nan")
    torch.cuda.empty_cache() if DEVICE == "cuda" else None
    rows, base = [], None
    for spec in a.configs:
        name, nproc, distributed = spec.split(":")
        res = launch(a, run, name, int(nproc), distributed)
        if "tokens_per_s" in res:
            res["useful_mfu_per_gpu"] = 8 * params * res["tokens_per_s"] / res["gpus"] / (peak * 1e12)
            base = base or (res["tokens_per_s"] if res["gpus"] == 1 else None)
            res["scaling_efficiency"] = res["tokens_per_s"] / (res["gpus"] * base) if base and res["gpus"] > 1 else ""
        rows.append({"config": name, **res})
        print(name, json.dumps(res), flush=True)
    cols = ("config", "gpus", "distributed", "tokens_per_s", "useful_mfu_per_gpu", "scaling_efficiency",
            "peak_gib_per_gpu", "median_step_s", "kd_path", "gradient_checkpointing", "error")
    table = [{c: r.get(c, "") for c in cols} for r in rows]
    save(f"qat_multi_gpu-{a.arch}{a.tag}", table, {"arch": a.arch, "params": params, "seq": a.seq,
                                                   "sequences_per_gpu": a.batch, "bf16_matmul_tflops": round(peak, 1)})


if __name__ == "__main__":
    main()
