"""report_to reaches every stage: the teacher's and QAT's training curves, eval's pass@1 per variant and the
compare plot land in TensorBoard event files inside the run, read back here with TensorBoard's own reader."""

import re
import subprocess
import sys

from .conftest import demo_recipe


def _events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for f in directory.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f.parent), size_guidance={"images": 4})
        acc.Reload()
        tags = acc.Tags()
        found.setdefault("scalars", set()).update(tags["scalars"])
        found.setdefault("images", set()).update(tags["images"])
        for tag in tags["scalars"]:
            found.setdefault("values", {})[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return found


def test_every_stage_reports_to_tensorboard(tmp_path):
    rec = demo_recipe(tmp_path, name="tb", bits="[2]", baselines="[]", qat_steps=10, limit=10, teacher_steps=20)
    rec.write_text(rec.read_text() + "report_to: [tensorboard]\n")
    out = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec)], check=True, capture_output=True,
                         text=True).stdout
    # readable progress: the stage, bit width, step, loss and ETA in one line; no raw log dicts; the engine named
    assert re.search(r"^qat w2: step 10/10 \(100%\) \| loss [0-9.e-]+ \| .* steps/s \| ETA 0:00:00$", out, re.MULTILINE), out
    assert re.search(r"^teacher: step 20/20 \(100%\)", out, re.MULTILINE) and "{'loss'" not in out
    assert re.search(r"w2-qat demo_arith: pass@1 .*\[transformers on w2-qat/dequantized\]", out)
    run = tmp_path / "runs" / "tb"
    teacher, qat = _events(run / "teacher"), _events(run / "qat")
    assert "train/loss" in teacher["scalars"] and len(teacher["values"]["train/loss"]) >= 2
    assert "train/loss" in qat["scalars"]
    ev = _events(run / "eval")
    import json

    metrics = json.loads((run / "eval" / "manifest.json").read_text())["metrics"]
    for name, tasks in metrics.items():
        assert ev["values"][f"pass@1/demo_arith/{name}"] == [(0, tasks["demo_arith"]["pass@1"])]
    assert ev["values"]["pass@1_by_bits/demo_arith/qat"][0][0] == 2  # against the bit width
    assert "compare" in _events(run / "compare")["images"]


def test_progress_line():
    from reasoning_qat.training import progress_line

    line = progress_line("rl w3", 40, 200, {"loss": 0.5, "reward": 0.25, "learning_rate": 1e-6}, elapsed=20.0, tokens=40960)
    assert line == "rl w3: step 40/200 (20%) | loss 0.5 | reward 0.250 | lr 1.00e-06 | 2.00 steps/s, 2,048 tok/s | ETA 0:01:20"


def test_a_progress_line_reads_back_into_its_fields():
    """read_progress_line inverts progress_line (benchmarks read cut-off runs' rewards from their logs with it):
    a NaN gradient norm stays readable, and lines of other output give None."""
    from reasoning_qat.training import progress_line, read_progress_line

    logs = {"loss": 0.5, "reward": 0.25, "grad_norm": float("nan"), "learning_rate": 1e-6}
    line = progress_line("rl w2", 40, 200, logs, elapsed=20.0, tokens=40960)
    assert read_progress_line(line) == ("rl w2", 40, {"loss": "0.5", "reward": "0.250", "grad_norm": "nan",
                                                      "learning_rate": "1.00e-06"})
    assert read_progress_line(progress_line("qat w3", 0, 300, {}, elapsed=0.0)) == ("qat w3", 0, {})
    assert read_progress_line("stage rl") is None and read_progress_line("  done rl in 771.8s") is None
