"""The qat stage sharded on GPUs: FSDP2 through Accelerate over two GPUs trains what one
process trains and its sharded checkpoints resume after a kill (needs two GPUs, two GPUs);
ZeRO-3 keeps the fused loss (one GPU or two, with DeepSpeed). Skipped without CUDA (tests/stages/test_fsdp2.py
runs FSDP2 on CPU shards)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from .test_qat_launch import MP_RECIPE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
CLI = [sys.executable, "-m", "reasoning_qat.cli", "run"]
ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE = 12, 4


def _recipe(tmp, name, **qat) -> Path:
    text = MP_RECIPE.format(name=name, root=tmp / "runs", procs=1, responses="dataset", packing="false", steps=STEPS,
                            save=SAVE)
    r = yaml.safe_load(text)
    r["qat"].update({"compile": False, **qat})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _losses(run):
    log = json.loads((run / "qat" / "w2-qat" / "log_history.json").read_text())
    return [h["loss"] for h in log if "loss" in h and not h.get("initial")]


def _metrics(run):
    return json.loads((run / "qat" / "w2-qat" / "qat_metrics.json").read_text())


def _codes(run):
    from reasoning_qat.quant.formats import read_quantized_weights

    qws, _, _ = read_quantized_weights(run / "qat" / "w2-qat" / "model")
    return {k: v.codes for k, v in qws.items()}


def _same_codes(a, b) -> float:
    ca, cb = _codes(a), _codes(b)
    assert ca.keys() == cb.keys()
    return sum((ca[k] == cb[k]).sum().item() for k in ca) / sum(v.numel() for v in ca.values())


def _copy_inputs(src, run):
    for stage in ("teacher", "calibrate", "ptq"):
        shutil.copytree(src / stage, run / stage)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One GPU, two batches accumulated per step: the same examples per update as two processes of one."""
    tmp = tmp_path_factory.mktemp("one")
    rec = _recipe(tmp, "one", batch_size=4, grad_accum=2)
    subprocess.run([*CLI, str(rec), "--stages", "teacher,calibrate,ptq,qat"], check=True,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    return tmp / "runs" / "one"


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory, one_process):
    tmp = tmp_path_factory.mktemp("fsdp2")
    rec = _recipe(tmp, "f", batch_size=4, num_processes=2, distributed="fsdp2")
    run = tmp / "runs" / "f"
    _copy_inputs(one_process, run)
    subprocess.run([*CLI, str(rec), "--stages", "qat"], check=True)
    return run


@two_gpus
def test_fsdp2_trains_what_one_process_trains(one_process, fsdp2):
    m = _metrics(fsdp2)
    assert m["distributed"] == "fsdp2" and m["processes"] == 2 and m["kd_path"] == ["fused"]
    assert _metrics(one_process)["kd_path"] == ["fused"]
    a, b = _losses(one_process), _losses(fsdp2)
    assert len(a) == len(b) == STEPS
    assert b == pytest.approx(a, rel=2e-2)  # bf16 matmuls, other reduction orders
    assert _same_codes(one_process, fsdp2) > 0.99


@two_gpus
def test_an_offloaded_teacher_trains_what_a_sharded_one_trains(tmp_path, one_process, fsdp2):
    """qat.kd.teacher_placement: offload (FSDP2's CPUOffloadPolicy on the teacher): the same teacher logits, so
    the same training as the sharded teacher's (auto chose shard for this small one)."""
    assert _metrics(fsdp2)["teacher_placement"] == "shard"
    rec = _recipe(tmp_path, "o", batch_size=4, num_processes=2, distributed="fsdp2", kd={"teacher_placement": "offload"})
    run = tmp_path / "runs" / "o"
    _copy_inputs(one_process, run)
    subprocess.run([*CLI, str(rec), "--stages", "qat"], check=True)
    assert _metrics(run)["teacher_placement"] == "offload"
    assert _losses(run) == pytest.approx(_losses(fsdp2), rel=1e-3)
    assert _same_codes(run, fsdp2) > 0.999


@two_gpus
def test_fsdp2_resumes_from_its_sharded_checkpoint_after_a_kill(tmp_path, one_process, fsdp2):
    rec = _recipe(tmp_path, "k", batch_size=4, num_processes=2, distributed="fsdp2")
    run = tmp_path / "runs" / "k"
    _copy_inputs(one_process, run)
    proc = subprocess.Popen([*CLI, str(rec), "--stages", "qat"], start_new_session=True)
    ckpt = run / ".qat.partial" / "w2-qat" / "trainer" / f"checkpoint-{SAVE}"
    deadline = time.time() + 300
    while not (ckpt / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (ckpt / "trainer_state.json").exists(), "no checkpoint written"
    sharded = list(ckpt.rglob("*.distcp"))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sharded, f"not a torch.distributed.checkpoint: {sorted(p.name for p in ckpt.iterdir())}"
    out = subprocess.run([*CLI, str(rec), "--stages", "qat"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout
    assert _losses(run) == pytest.approx(_losses(fsdp2), rel=1e-2)
    assert _same_codes(run, fsdp2) > 0.995


def test_zero3_keeps_the_fused_loss(tmp_path, one_process):
    pytest.importorskip("deepspeed")
    gpus = min(torch.cuda.device_count(), 2)  # one process of batch 8 or two of 4: the same 8 examples per step
    rec = _recipe(tmp_path, "z", batch_size=8 // gpus, num_processes=gpus,
                  deepspeed=str(ROOT / "recipes/accelerate/zero3.json"))
    run = tmp_path / "runs" / "z"
    _copy_inputs(one_process, run)
    out = subprocess.run([*CLI, str(rec), "--stages", "qat"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _metrics(run)["kd_path"] == ["fused"] and _metrics(run)["distributed"] == "deepspeed"
    assert _losses(run) == pytest.approx(_losses(one_process), rel=2e-2)
    assert _same_codes(one_process, run) > 0.99
    # the chunked loss under the same ZeRO-3 run: the reference the fused path must match
    rec = _recipe(tmp_path, "zc", batch_size=8 // gpus, num_processes=gpus, kd={"fused": False},
                  deepspeed=str(ROOT / "recipes/accelerate/zero3.json"))
    chunked = tmp_path / "runs" / "zc"
    _copy_inputs(one_process, chunked)
    out = subprocess.run([*CLI, str(rec), "--stages", "qat"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _metrics(chunked)["kd_path"] == ["chunked"]
    assert _losses(run) == pytest.approx(_losses(chunked), rel=1e-2)
