"""The qat stage in several processes: checkpoints, teacher-written data, packing, kill and resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ..conftest import write_recipe

MP_RECIPE = """
name: {name}
run_root: {root}
model:
  demo: {{hidden_size: 64, intermediate_size: 128, num_layers: 2, train_steps: 30, batch_size: 32, lr: 3.0e-3}}
  dtype: float32
quant: {{bits: [2], group_size: 32}}
calibration: {{num_samples: 8, seq_len: 128}}
ptq: {{method: gptq, baselines: []}}
qat:
  data: {{source: demo, max_samples: 64, responses: {responses}, generation: {{batch_size: 32, max_new_tokens: 80, temperature: 0}}}}
  max_steps: {steps}
  batch_size: 8
  save_steps: {save}
  logging_steps: 1
  num_processes: {procs}
  packing: {packing}
export: {{formats: [dequantized]}}
eval: {{tasks: [demo_arith], backend: transformers, limit: 10}}
"""


@pytest.mark.slow
def test_two_process_qat_with_checkpoints_and_teacher_data(tmp_path):
    """Two CPU processes (gloo DDP) train on teacher-written, packed data and checkpoint mid-run."""
    rec = write_recipe(tmp_path / "mp.yaml", MP_RECIPE.format(name="mp", root=tmp_path / "runs", responses="teacher",
                                                                procs=2, packing="true", steps=6, save=3))
    out = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec), "--stages", "teacher,calibrate,ptq,qat"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "mp"
    written = [json.loads(x) for x in (run / "calibrate" / "qat_data.jsonl").read_text().splitlines()]
    assert len(written) == 64 and all(w["response"] for w in written)
    assert json.loads((run / "calibrate" / "manifest.json").read_text())["metrics"]["qat_data"]["teacher_responses"]["rows"] == 64
    log = json.loads((run / "qat" / "w2-qat" / "log_history.json").read_text())
    steps = [h for h in log if "loss" in h and not h.get("initial")]  # step 0: the initialisation's loss
    assert [h["step"] for h in steps] == [1, 2, 3, 4, 5, 6]
    # Data parallel: each step consumes batch_size examples on each of the 2 ranks.
    assert steps[-1]["epoch"] == pytest.approx(6 * 8 * 2 / 64)
    assert not list((run / "qat" / "w2-qat" / "trainer").glob("checkpoint-*"))  # cleaned after success
    from reasoning_qat.quant.formats import read_quantized_weights

    qws, _, meta = read_quantized_weights(run / "qat" / "w2-qat" / "model")
    assert meta["bits"] == 2 and len(qws) == 2 * 7  # every Linear of both blocks, saved once by rank 0


CLI = [sys.executable, "-m", "reasoning_qat.cli", "run"]
FMT = dict(responses="dataset", packing="false", steps=15, save=5)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Run a: teacher to qat, the qat stage in 2 processes it launches itself (15 steps, checkpoints every 5)."""
    tmp = tmp_path_factory.mktemp("straight")
    rec = write_recipe(tmp / "a.yaml", MP_RECIPE.format(name="a", root=tmp / "runs", procs=2, **FMT))
    subprocess.run([*CLI, str(rec), "--stages", "teacher,calibrate,ptq,qat"], check=True, capture_output=True)
    return tmp / "runs" / "a"


def _losses(run):
    log = json.loads((run / "qat" / "w2-qat" / "log_history.json").read_text())
    return [h["loss"] for h in log if "loss" in h and not h.get("initial")]


def _copy_inputs(a, run):
    for stage in ("teacher", "calibrate", "ptq"):  # the same recipe hashes: the run takes them as done
        shutil.copytree(a / stage, run / stage)


@pytest.mark.slow
def test_two_process_qat_killed_then_resumed(tmp_path, straight):
    """SIGKILL of `rqat run` must take the launched workers down too (they run in sessions of their
    own), keep the checkpoint, and the re-run must continue from it to the uninterrupted result."""
    cli = CLI
    rec = write_recipe(tmp_path / "b.yaml", MP_RECIPE.format(name="b", root=tmp_path / "runs", procs=2, **FMT))
    run = tmp_path / "runs" / "b"
    _copy_inputs(straight, run)
    proc = subprocess.Popen([*cli, str(rec), "--stages", "qat"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = run / ".qat.partial" / "w2-qat" / "trainer" / "checkpoint-5" / "trainer_state.json"
    deadline = time.time() + 900  # a bound, not a wait: 2 test workers share 2 cores
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert ckpt.exists(), "QAT never wrote its first checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    time.sleep(3)  # the workers notice their launcher is gone within a second
    workers = subprocess.run(["pgrep", "-f", f"reasoning_qat.stages.qat --run-dir {run}"], capture_output=True, text=True)
    assert workers.stdout.strip() == ""
    assert not (run / ".qat.partial" / "w2-qat" / ".done").exists()

    out = subprocess.run([*cli, str(rec), "--stages", "qat"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming" in out.stdout

    assert len(_losses(run)) == 15
    assert _losses(run)[-1] == pytest.approx(_losses(straight)[-1], rel=1e-5)


@pytest.mark.slow
def test_two_nodes_started_by_the_user(tmp_path, straight):
    """`torchrun --nnodes 2` (one process each, loopback rendezvous) running `rqat run` as users start it:
    rank 0 alone writes the run and takes the lock, rank 1 only trains when rank 0's qat stage asks, and the
    data-parallel training ends at the loss of the 2 processes `rqat run` launches itself."""
    import socket

    rec = write_recipe(tmp_path / "c.yaml", MP_RECIPE.format(name="c", root=tmp_path / "runs", procs=1, **FMT))
    run = tmp_path / "runs" / "c"
    _copy_inputs(straight, run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "reasoning_qat.cli", "run", str(rec), "--stages", "qat"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [n.communicate(timeout=900)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "run c in" in outs[0] and "run c in" not in outs[1]  # only rank 0 plans and reports
    assert len(_losses(run)) == 15
    assert _losses(run)[-1] == pytest.approx(_losses(straight)[-1], rel=1e-5)
    (finished,) = run.glob(".launch/*/finished.json")
    assert json.loads(finished.read_text()) == {"status": 0}



@pytest.mark.slow
def test_accelerate_launch_started_by_the_user(tmp_path, straight):
    """`accelerate launch --num_processes 2 -m reasoning_qat.cli run RECIPE`, as users start it (its multi-GPU
    launcher, torch's elastic agent underneath, runs on CPU too; `--cpu` would start one process): one
    process plans and writes, both train, and the run ends at the loss of the 2 processes `rqat run`
    launches itself."""
    rec = write_recipe(tmp_path / "e.yaml", MP_RECIPE.format(name="e", root=tmp_path / "runs", procs=1, **FMT))
    run = tmp_path / "runs" / "e"
    _copy_inputs(straight, run)
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "reasoning_qat.cli", "run", str(rec), "--stages", "qat"],
                         capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("run e in") == 1  # rank 0 alone plans and reports
    metrics = json.loads((run / "qat" / "w2-qat" / "qat_metrics.json").read_text())
    assert metrics["processes"] == 2
    assert _losses(run)[-1] == pytest.approx(_losses(straight)[-1], rel=1e-5)


def test_a_follower_stops_when_rank_0_is_gone(tmp_path, monkeypatch):
    """A rank other than 0 waits on rank 0's heartbeat in the shared run folder; when it stops (rank 0 killed
    on another node), the follower exits 1 instead of waiting for ever."""
    from reasoning_qat import launch

    monkeypatch.setattr(launch, "SAVED", {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "2"})
    monkeypatch.setattr(launch, "HEARTBEAT_S", 0.05)
    started = time.time()
    d = launch.session_dir(tmp_path)
    d.mkdir(parents=True)
    (d / "heartbeat").touch()
    assert launch.follow(tmp_path, started, timeout_s=30) == 1
    assert time.time() - started < 10
    launch.end_session(tmp_path, 0)
    (d / "heartbeat").touch()
    assert launch.follow(tmp_path, started, timeout_s=30) == 0  # rank 0 said it finished
