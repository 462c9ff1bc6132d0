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


@pytest.mark.slow
def test_two_process_qat_killed_then_resumed(tmp_path):
    """SIGKILL of `rqat run` must take the launched workers down too (they run in sessions of their
    own), keep the checkpoint, and the re-run must continue from it to the uninterrupted result."""
    cli = [sys.executable, "-m", "reasoning_qat.cli", "run"]
    fmt = dict(root=tmp_path / "runs", responses="dataset", procs=2, packing="false", steps=15, save=5)
    straight = write_recipe(tmp_path / "a.yaml", MP_RECIPE.format(name="a", **fmt))
    subprocess.run([*cli, str(straight), "--stages", "teacher,calibrate,ptq,qat"], check=True, capture_output=True)

    rec = write_recipe(tmp_path / "b.yaml", MP_RECIPE.format(name="b", **fmt))
    run = tmp_path / "runs" / "b"
    for stage in ("teacher", "calibrate", "ptq"):  # the same recipe hashes: run b takes them as done
        shutil.copytree(tmp_path / "runs" / "a" / stage, run / stage)
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

    def losses(name):
        log = json.loads((tmp_path / "runs" / name / "qat" / "w2-qat" / "log_history.json").read_text())
        return [h["loss"] for h in log if "loss" in h and not h.get("initial")]

    assert len(losses("b")) == 15
    assert losses("b")[-1] == pytest.approx(losses("a")[-1], rel=1e-5)

