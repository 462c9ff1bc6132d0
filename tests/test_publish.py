"""rqat publish: the folder loads alone in transformers, its model card is huggingface_hub's with the eval
results as model-index, and an upload while the hub is off stops before anything is written.
vLLM serving a published dequantized folder: tests/evaluation/test_vllm.py. Not exercised: the upload itself
(huggingface_hub ships no local hub server to stand up here)."""

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from .conftest import demo_recipe


@pytest.fixture(scope="module")
def run_w4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("publish")
    rec = demo_recipe(tmp, name="pub", bits="[4]", qat="false", limit=10, shared_teacher=True)
    subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec)], check=True, capture_output=True)
    return tmp / "runs" / "pub"


def test_published_folder_loads_alone_and_its_card_carries_the_evaluation(run_w4, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    import reasoning_qat as rq
    from reasoning_qat.publish import publish

    out = publish(run_w4, "w4-gptq", tmp_path / "w4")
    assert (out / "README.md").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    card = ModelCard.load(out / "README.md")
    ev = json.loads((run_w4 / "eval" / "manifest.json").read_text())["metrics"]
    (result,) = card.data.eval_results
    assert (result.metric_type, result.dataset_type) == ("pass@1", "demo_arith")
    assert result.metric_value == round(ev["w4-gptq"]["demo_arith"]["pass@1"], 4)
    assert "model-index" in card.data.to_dict() and "4-bit" in card.data.tags and "compressed-tensors" in card.data.tags
    text = card.text
    assert "| GPTQ (domain calib) | 4 | demo_arith |" in text and "| BF16 | 16 | demo_arith |" in text
    assert "| RTN | 4 | demo_arith |" in text and "by reasoning-qat: GPTQ (domain calib)" in text
    assert "vllm serve" in text and "temperature" in text and "- teacher: `" in text
    assert card.data.license == "apache-2.0" and "License: Apache-2.0" in text  # the demo teacher is the project's
    assert "packed integer weights" in text
    # the card's own Python snippet runs as written (its import line, the run's dtype) and loads this folder
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1).replace("THIS_FOLDER", str(out))
    scope = {}
    exec(snippet, scope)  # noqa: S102 (the card we wrote)
    assert scope["model"].dtype == getattr(torch, yaml.safe_load((run_w4 / "recipe.yaml").read_text())["model"]["dtype"])
    with torch.no_grad():
        ids = torch.randint(3, 40, (1, 12))
        served = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
        student = rq.load(run_w4, "w4-gptq", device="cpu")(ids).logits
    assert torch.allclose(served, student, atol=2e-2), (served - student).abs().max()


def test_publish_refuses_before_writing(run_w4, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from reasoning_qat.errors import UserError
    from reasoning_qat.publish import publish

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 in the environment sets it
    with pytest.raises(UserError, match="--repo-id org/name: the hub is off"):
        publish(run_w4, "w4-gptq", tmp_path / "a", repo_id="org/name")
    with pytest.raises(UserError, match="the run has no dequantized export of w4-qat"):  # QAT is off in this run
        publish(run_w4, "w4-qat", tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match="--to .*already exists"):
        publish(run_w4, "w4-gptq", tmp_path / "b")
    assert not (tmp_path / "a").exists() and list((tmp_path / "b").iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    dq = publish(run_w4, "w4-rtn", tmp_path / "c", fmt="dequantized")
    assert "quantization_config" not in json.loads((dq / "config.json").read_text())
