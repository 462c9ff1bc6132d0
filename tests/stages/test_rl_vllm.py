"""GRPO with TRL's colocated vLLM (the CPU build in CI): rollouts come from the quantized weights. Apart from
tests/evaluation/test_vllm.py so that the two test workers can each take one of the two files (each starts vLLM
engines for minutes). CI sets RQAT_REQUIRE_VLLM=1: these fail there, rather than skip, without vLLM."""

import json
import os
import subprocess
import sys

import pytest

from reasoning_qat.evaluation.backends import vllm_problem

from ..conftest import demo_recipe

if vllm_problem() is not None:
    if os.environ.get("RQAT_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"RQAT_REQUIRE_VLLM=1 but {vllm_problem()}")
    pytest.skip(f"vLLM not usable here: {vllm_problem()}", allow_module_level=True)


@pytest.mark.slow
def test_grpo_rollouts_through_trl_colocated_vllm_get_the_quantized_weights(tmp_path):
    """TRL's colocated vLLM on the CPU build: every rollout batch comes from the engine, whose weights
    are synced from the student's quantized function, not its latent weights. QAT starts from the
    BF16 latents (qat.init: bf16), so the two differ."""
    rec = demo_recipe(tmp_path, name="rlv", teacher_steps=300, bits="[4]", baselines="[]", qat_steps=5, limit=10,
                      shared_teacher=True)
    rec.write_text(rec.read_text().replace("  enabled: true\n", "  enabled: true\n  init: bf16\n").replace(
        "rl: {enabled: false}", "rl: {enabled: true, use_vllm: true, min_accuracy: 0.0, data: {source: demo}, max_steps: 2, "
        "num_generations: 4, batch_size: 4, max_completion_length: 48, lr: 1.0e-5, save_steps: 1}\n"
        "").replace("eval: {", "eval: {gpu_memory_utilization: 0.2, "))
    subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec), "--stages", "teacher,calibrate,ptq,qat,rl"],
                   check=True, capture_output=True)
    m = json.loads((tmp_path / "runs" / "rlv" / "rl" / "manifest.json").read_text())["metrics"]["w4-qat_rl"]
    assert m["rollouts"] == "vllm" and m["steps"] == 2
    assert m["quantized_rollout_batches"] >= 2 and m["dequantized_weight_syncs"] >= 2
    assert m["vllm_vs_quantized_max_abs_diff"] == 0.0 < m["vllm_vs_latent_max_abs_diff"]
