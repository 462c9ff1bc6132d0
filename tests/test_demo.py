"""The demo pipeline at a reduced size, end to end through the CLI, RL included."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from reasoning_qat.quant.formats import load_quantized_checkpoint

from .conftest import demo_recipe


def cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "reasoning_qat.cli", *args], capture_output=True, text=True, check=check)


@pytest.mark.slow
def test_demo_pipeline_small(tmp_path):
    rec = demo_recipe(tmp_path, name="small", teacher_steps=300, bits="[2, 4]", baselines="[rtn, gptq_generic]",
                      qat_steps=20, save_steps=10, limit=30, shared_teacher=True)
    text = rec.read_text().replace("rl: {enabled: false}", "rl: {enabled: true, min_accuracy: 0.0, data: {source: demo}, "
                                   "max_steps: 2, num_generations: 4, batch_size: 4, max_completion_length: 48, lr: 1.0e-5, save_steps: 1}")
    rec.write_text(text)
    out = cli("run", str(rec))
    run = tmp_path / "runs" / "small"
    for stage in ("teacher", "calibrate", "ptq", "qat", "rl", "export", "eval"):
        assert json.loads((run / stage / "manifest.json").read_text())["status"] == "done", stage

    # PTQ errors recorded per layer (output error on each method's own calibration inputs).
    ptq = json.loads((run / "ptq" / "manifest.json").read_text())["metrics"]
    assert ptq["w2-gptq"]["error_kind"] == "output" and ptq["w2-rtn"]["error_kind"] == "weight"
    assert 0 < ptq["w2-gptq"]["mean_layer_error"] < ptq["w2-gptq"]["max_layer_error"] < 1
    # how much of each layer's input width the calibration data uses (GPTQ's H; RTN has none)
    assert 0 < ptq["w2-gptq"]["mean_input_rank_fraction"] <= 1 and "mean_input_rank_fraction" not in ptq["w2-rtn"]
    layers = json.loads((run / "ptq" / "w2-gptq" / "ptq_errors.json").read_text())["layers"]
    assert len(layers) == 14

    # Every variant was exported and evaluated; the compare table lists them all.
    variants = {"bf16", "w2-rtn", "w2-gptq", "w2-gptq_generic", "w2-qat", "w2-qat_rl", "w4-qat", "w4-qat_rl"}
    metrics = json.loads((run / "eval" / "manifest.json").read_text())["metrics"]
    assert variants <= set(metrics)
    assert metrics["bf16"]["demo_arith"]["pass@1"] > 0.3  # the short-trained teacher already reasons
    table = (run / "compare" / "compare.md").read_text()
    assert "KD-QAT + RL" in table and "GPTQ (generic calib)" in table and (run / "compare" / "compare.png").stat().st_size > 0
    assert "| small | demo_arith | 2 | KD-QAT |" in out.stdout

    # RL rollouts went through the quantized forward (the TRL override was called).
    rl = json.loads((run / "rl" / "manifest.json").read_text())["metrics"]["w2-qat_rl"]
    assert rl["rollouts"] == "transformers" and rl["quantized_rollout_batches"] >= 2

    # The dequantized export is what the fake-quant QAT student computes.
    student = load_quantized_checkpoint(run / "qat" / "w2-qat" / "model")
    exported = AutoModelForCausalLM.from_pretrained(run / "export" / "w2-qat" / "dequantized", dtype=torch.float32)
    x = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        assert torch.allclose(student(x).logits, exported(x).logits, atol=1e-4)
    assert "model.layers.0.mlp.down_proj.weight_packed" in load_file(
        str(run / "export" / "w2-qat" / "compressed-tensors" / "model.safetensors"))

    # rqat compare and rqat status work on the run directory.
    cmp = cli("compare", str(run), "--out", str(tmp_path / "cmp"))
    assert "| small | demo_arith | 16 | BF16 |" in cmp.stdout and (tmp_path / "cmp" / "compare.png").is_file()
    # without --out it writes beside the run, leaving the run's own compare stage to `rqat run`
    stage = (run / "compare" / "manifest.json").read_bytes()
    cli("compare", str(run), "--no-plot")
    assert (run.parent / "compare-small" / "compare.md").is_file() and (run / "compare" / "manifest.json").read_bytes() == stage
    assert "done" in cli("status", str(run)).stdout


@pytest.mark.slow
def test_rl_refuses_a_student_that_cannot_solve_anything(tmp_path):
    rec = demo_recipe(tmp_path, name="cold", teacher_steps=5, bits="[2]", baselines="[]", qat_steps=2, limit=10)
    rec.write_text(rec.read_text().replace("rl: {enabled: false}", "rl: {enabled: true, min_accuracy: 0.5, data: {source: demo}, "
                                           "max_completion_length: 48}"))
    res = cli("run", str(rec), check=False)
    assert res.returncode == 2
    assert "rl: the w2-qat student solves" in res.stderr and "below rl.min_accuracy=0.5" in res.stderr
    run = tmp_path / "runs" / "cold"
    assert (run / "qat" / "manifest.json").is_file() and not (run / "rl").exists()


@pytest.mark.slow
def test_grpo_straight_from_a_ptq_checkpoint(tmp_path):
    """rl.init: ptq (the control row: RL without the KD cold start) runs with QAT off, starts from
    the ptq stage's checkpoint of ptq.method, and its variant goes through export, eval and compare."""
    rec = demo_recipe(tmp_path, name="rlptq", teacher_steps=300, bits="[4]", baselines="[]", qat="false", limit=10,
                      shared_teacher=True)
    rec.write_text(rec.read_text().replace("method: gptq", "method: rtn").replace(
        "rl: {enabled: false}", "rl: {enabled: true, init: ptq, min_accuracy: 0.0, data: {source: demo}, max_steps: 2, "
        "num_generations: 4, batch_size: 4, max_completion_length: 48, save_steps: 1}").replace(
        "  dtype: float32", "  dtype: float32\n  attn_implementation: eager"))  # the kernel is not a stage input:
    run = tmp_path / "runs" / "rlptq"
    shared = (run / "teacher" / "manifest.json").read_text()
    cli("run", str(rec))
    assert (run / "teacher" / "manifest.json").read_text() == shared  # ...the shared teacher stays done
    assert not (run / "qat").exists()
    rl = json.loads((run / "rl" / "manifest.json").read_text())
    assert set(rl["inputs"]) == {"teacher", "ptq"}
    m = rl["metrics"]["w4-ptq_rl"]
    assert m["init"] == "w4-rtn" and m["steps"] == 2 and m["quantized_rollout_batches"] >= 2
    assert m["attn_implementation"] == "eager"  # the policy ran the recipe's kernel
    assert m["cudnn_sdpa"] is False  # SDPA's cuDNN kernels were off while GRPO trained (model.cudnn_sdpa: false)
    # RL changed the weights it started from (a w4 start solves some prompts: the rewards differ)
    start, after = (load_quantized_checkpoint(p) for p in (run / "ptq" / "w4-rtn", run / "rl" / "w4-ptq_rl" / "model"))
    # the recorded share of weights moved to another grid point is the one the two checkpoints' codes show
    # (two small steps here move the step sizes, not a code: test_quantizer checks a positive share)
    codes = [{k: v for k, v in load_file(str(d / "model.safetensors")).items() if k.endswith(".codes")}
             for d in (run / "ptq" / "w4-rtn", run / "rl" / "w4-ptq_rl" / "model")]
    moved = sum(int((codes[0][k] != codes[1][k]).sum()) for k in codes[0]) / sum(v.numel() for v in codes[0].values())
    assert m["moved_to_another_grid_point"] == pytest.approx(moved) and moved < 0.5
    x = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        assert not torch.allclose(start(x).logits, after(x).logits)
    # transformers' Trainer switches the KV cache off in the config (TrainingArguments.use_cache):
    # the saved policy and its export switch it on again, or generation recomputes every prefix
    configs = [run / "rl" / "w4-ptq_rl" / "model" / "config.json", *(run / "export").glob("w4-ptq_rl/*/config.json"),
               *(run / "export").glob("w4-ptq_rl/*/generation_config.json")]
    assert len(configs) >= 2 and all(json.loads(c.read_text())["use_cache"] is True for c in configs)
    ev = json.loads((run / "eval" / "manifest.json").read_text())["metrics"]
    assert {"bf16", "w4-rtn", "w4-ptq_rl"} <= set(ev)
    # the held-out cross-entropy sits beside pass@1, and quantization raised it
    assert 0 < ev["bf16"]["demo_arith"]["ce"] < ev["w4-rtn"]["demo_arith"]["ce"]
    table = (run / "compare" / "compare.md").read_text()
    assert "| rlptq | demo_arith | 4 | RL from RTN |" in table and "CE increase (%)" in table
