"""FSDP2 in the qat stage , on CPU/gloo:
- the KD loss (fused included) on a student sharded with fully_shard equals the unsharded loss in value and
  gradients, the teacher sharded by `shard_frozen`;
- the stage's training worker under the real Trainer and Accelerate's FSDP2 (Accelerate's GPU-only gate
  opened by tests/stages/cpu_fsdp2.py, nothing else changed) trains what DDP trains, and resumes from its
  sharded checkpoint after a kill;
- the shipped accelerate config agrees with what the stage sets; the recipe's checks.
tests/stages/test_qat_gpu.py runs `rqat run` itself under FSDP2 and ZeRO-3 on two GPUs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from reasoning_qat.recipe import RecipeError, load_recipe

from ..conftest import demo_recipe, write_recipe
from .test_qat_launch import MP_RECIPE

ROOT = Path(__file__).resolve().parents[2]


def test_sharded_loss_and_gradients_equal_the_unsharded_ones(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests/stages/fsdp2_worker.py"), str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        for r in json.loads((tmp_path / f"rank{rank}.json").read_text()):
            case = f"rank {rank}, tied head {r['tie']}, {r['loss']}, {r['layout']}"
            assert r["value"] == pytest.approx(r["reference"], rel=1e-5), case
            assert r["worst_relative_grad_diff"] < 1e-5, case
            assert r["missing_grads"] == [], case
            assert r["sharded_params"] == r["params"], case  # latents, step sizes, zero points: all DTensor shards
            assert r["fused_calls"] == 1, case  # the fused path ran sharded, no fallback to chunks
            assert r["head_is_dtensor"], case  # resharded: the loss saw it gathered only inside the forward


def test_the_shipped_accelerate_config_sets_what_the_stage_sets():
    from reasoning_qat.stages.qat import FSDP2_ENV

    config = yaml.safe_load((ROOT / "recipes/accelerate/fsdp2.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["mixed_precision"] == "no"
    # accelerate launch exports each fsdp_* key as FSDP_* (accelerate/utils/launch.py)
    exported = {f"FSDP_{k.removeprefix('fsdp_').upper()}": str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in config["fsdp_config"].items()}
    assert exported == {k: v for k, v in FSDP2_ENV.items() if k.startswith("FSDP_")}


def _qat(tmp_path, **qat):
    path = demo_recipe(tmp_path)
    r = yaml.safe_load(path.read_text())
    r["qat"] = {**r.get("qat", {}), **qat}
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.mark.parametrize("qat, message", [
    ({"distributed": "deepspeed"}, "qat: distributed: deepspeed needs `deepspeed`"),
    ({"distributed": "fsdp2", "deepspeed": "recipes/accelerate/zero3.json"}, "qat: deepspeed: set with distributed: fsdp2"),
    ({"distributed": "fsdp2", "averaging": "ema"}, "qat: averaging: not supported with distributed: fsdp2"),
])
def test_recipe_refuses_inconsistent_distribution(tmp_path, qat, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_qat(tmp_path, **qat))


def test_a_deepspeed_config_alone_means_deepspeed(tmp_path):
    assert load_recipe(_qat(tmp_path, deepspeed=str(ROOT / "recipes/accelerate/zero3.json"))).qat.distributed == "deepspeed"


def test_fsdp2_off_a_gpu_stops_in_one_line(tmp_path):
    import torch

    from reasoning_qat.pipeline import StageFailed
    from reasoning_qat.stages import qat

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    recipe = load_recipe(_qat(tmp_path, distributed="fsdp2", num_processes=2))
    with pytest.raises(StageFailed, match="qat.distributed: fsdp2 needs CUDA GPUs"):
        qat._launch(SimpleNamespace(recipe=recipe))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """teacher to qat, the qat stage in 2 gloo DDP processes (8 steps, checkpoints every 4)."""
    tmp = tmp_path_factory.mktemp("ddp")
    rec = write_recipe(tmp / "d.yaml", MP_RECIPE.format(name="d", root=tmp / "runs", procs=2, responses="dataset",
                                                        packing="false", steps=8, save=4))
    subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec), "--stages", "teacher,calibrate,ptq,qat"],
                   check=True, capture_output=True)
    return tmp / "runs" / "d"


def _fsdp2_copy(ddp_run, run):
    """A run with ddp_run's teacher, calibrate and ptq, its recipe switched to qat.distributed: fsdp2."""
    for stage in ("teacher", "calibrate", "ptq"):
        shutil.copytree(ddp_run / stage, run / stage)
    recipe = yaml.safe_load((ddp_run / "recipe.yaml").read_text())
    recipe["qat"]["distributed"] = "fsdp2"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run / ".qat.partial"


def _fsdp2_worker(run, out, **kw):
    from reasoning_qat.stages.qat import FSDP2_ENV

    env = {**os.environ, **FSDP2_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests/stages/cpu_fsdp2.py"), "--run-dir", str(run), "--out", str(out)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _trained(out_or_run):
    from reasoning_qat.quant.formats import read_quantized_weights

    d = out_or_run / "w2-qat"
    log = json.loads((d / "log_history.json").read_text())
    qws, other, _ = read_quantized_weights(d / "model")
    return ([h["loss"] for h in log if "loss" in h], {k: v.codes for k, v in qws.items()}, other,
            json.loads((d / "qat_metrics.json").read_text()))


@pytest.fixture(scope="module")
def fsdp2_out(ddp_run, tmp_path_factory):
    out = _fsdp2_copy(ddp_run, tmp_path_factory.mktemp("fsdp2") / "f")
    proc = _fsdp2_worker(out.parent, out)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-4000:]
    return out


@pytest.mark.slow
def test_the_stage_under_accelerates_fsdp2_trains_what_ddp_trains(ddp_run, fsdp2_out):
    losses, codes, other, metrics = _trained(fsdp2_out)
    ref_losses, ref_codes, ref_other, _ = _trained(ddp_run / "qat")
    assert metrics["distributed"] == "fsdp2" and metrics["processes"] == 2
    assert metrics["kd_path"] == ["fused"]  # the head is an FSDP unit of its own (FSDPLinear) and still fused
    # the teacher was loaded on the CPU and sharded, as its size beside the student's chose
    assert metrics["teacher_placement"] == "shard" and 0 < metrics["teacher_bytes_per_gpu"] < metrics["gpu_bytes"]
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert all(torch.equal(codes[k], ref_codes[k]) for k in ref_codes)  # the saved student is the whole one
    assert all(torch.allclose(other[k], ref_other[k], atol=1e-5) for k in ref_other)


@pytest.mark.slow
def test_an_offloaded_teacher_trains_what_a_sharded_one_trains(ddp_run, fsdp2_out, tmp_path):
    """qat.kd.teacher_placement: offload keeps the teacher's shards in CPU memory (FSDP2's CPUOffloadPolicy):
    the same teacher logits, so the same losses and student as the sharded teacher's."""
    out = _fsdp2_copy(ddp_run, tmp_path / "o")
    recipe = yaml.safe_load((out.parent / "recipe.yaml").read_text())
    recipe["qat"]["kd"] = {**recipe["qat"].get("kd", {}), "teacher_placement": "offload"}
    (out.parent / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = _fsdp2_worker(out.parent, out)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-4000:]
    losses, codes, _, metrics = _trained(out)
    ref_losses, ref_codes, _, _ = _trained(fsdp2_out)
    assert metrics["teacher_placement"] == "offload"
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert all(torch.equal(codes[k], ref_codes[k]) for k in ref_codes)


@pytest.mark.slow
def test_fsdp2_resumes_from_its_sharded_checkpoint_after_a_kill(ddp_run, fsdp2_out, tmp_path):
    out = _fsdp2_copy(ddp_run, tmp_path / "k")
    proc = _fsdp2_worker(out.parent, out, start_new_session=True)
    ckpt = out / "w2-qat" / "trainer" / "checkpoint-4"
    deadline = time.time() + 600
    while not (ckpt / "trainer_state.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / "trainer_state.json").exists(), "no checkpoint before the kill"
    assert list(ckpt.rglob("*.distcp")), "the checkpoint is not a torch.distributed.checkpoint"
    assert not (out / "w2-qat" / "qat_metrics.json").exists()
    proc = _fsdp2_worker(out.parent, out)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-4000:]
    losses, codes, _, _ = _trained(out)
    ref_losses, ref_codes, _, _ = _trained(fsdp2_out)
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=1e-4)
    assert all(torch.equal(codes[k], ref_codes[k]) for k in ref_codes)
