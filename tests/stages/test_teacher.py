"""The teacher stage: the demo teacher's schedule and weight averaging."""

import json

import pytest
import torch


def test_demo_teacher_schedule_and_weight_averaging(tmp_path):
    """model.demo.schedule / averaging: a WSD teacher holds its peak rate, then decays; LAWA averages
    its last snapshots into the saved teacher."""
    from reasoning_qat.pipeline import Pipeline
    from reasoning_qat.recipe import load_recipe
    from reasoning_qat.stages import STAGES

    from ..conftest import demo_recipe

    teachers = {}
    for name, extra in (("wsdlawa", "schedule: wsd, decay_ratio: 0.25, averaging: lawa, lawa_k: 3, lawa_interval: 10, "),
                        ("wsd", "schedule: wsd, decay_ratio: 0.25, ")):
        rec = demo_recipe(tmp_path, name=name, teacher_steps=40)
        rec.write_text(rec.read_text().replace("demo: {hidden_size: 64,", "demo: {" + extra + "hidden_size: 64,"))
        Pipeline(load_recipe(rec), STAGES).run(["teacher"])
        m = json.loads((tmp_path / "runs" / name / "teacher" / "manifest.json").read_text())["metrics"]
        teachers[name] = m
        lrs = m["learning_rates"]
        assert m["schedule"] == "wsd" and max(lrs) == pytest.approx(3e-3)
        stable = [lr for lr in lrs if lr == pytest.approx(3e-3)]
        assert len(stable) >= len(lrs) // 2 and lrs[-1] < 3e-3  # held at the peak, then decayed
    assert teachers["wsdlawa"]["averaged_snapshots"] == 3 and teachers["wsd"]["averaged_snapshots"] == 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "runs" / "wsdlawa" / "teacher" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "wsd" / "teacher" / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same training, averaged weights saved

