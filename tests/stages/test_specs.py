"""stages/specs.py, the recipe's one boundary with the library: specs built from recipe sections, library
errors named by the recipe key the user wrote, and the QuantSpec a checkpoint carries beside its weights."""

import json

import pytest
import torch

from reasoning_qat.pipeline import StageContext
from reasoning_qat.quant.runtime import SPEC_FILE, install_quant_spec, read_quant_spec, write_quant_spec
from reasoning_qat.quant.scheme import (
    ActivationScheme,
    KVCacheScheme,
    QuantScheme,
    QuantSpec,
    QuantTargets,
    RotationScheme,
)
from reasoning_qat.recipe import RecipeError, parse_recipe
from reasoning_qat.stages.common import source_rows
from reasoning_qat.stages.specs import engine_settings, kd_spec, quant_spec

from ..conftest import tiny_qwen3


def _recipe(tmp_path, **sections):
    return parse_recipe({"name": "s", "run_root": str(tmp_path / "runs"), "model": {"id": "org/model"}, **sections})


def test_a_data_error_names_the_section_it_was_read_for(tmp_path, tokenizer):
    """The same library call (select_traces) reading rl.data names rl.data, reading qat.data names qat.data."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    data = {"source": str(rows), "prompt_field": "question", "response_field": "solution"}
    r = _recipe(tmp_path, qat={"data": data}, rl={"enabled": True, "data": {**data, "prompt_field": "problem"}})
    ctx = StageContext(r, tmp_path / "runs" / "s", tmp_path / "out", {}, stage="rl")
    with pytest.raises(RecipeError, match=r"^rl\.data\.prompt_field: the dataset has no column 'problem' \(columns: question, answer\)"):
        source_rows(ctx, r.rl.data, tokenizer, prompts_only=True)
    with pytest.raises(RecipeError, match=r"^qat\.data\.response_field: the dataset has no column 'solution'"):
        source_rows(ctx, r.qat.data, tokenizer)
    assert source_rows(ctx, r.qat.data, tokenizer, prompts_only=True) == [{"prompt": "1+1?", "response": "", "answer": "2"}]


def test_specs_carry_the_recipe_values(tmp_path):
    r = _recipe(tmp_path, quant={"bits": [2, 4], "group_size": 64, "symmetric": True, "preset": "w4a8",
                                 "overrides": [{"pattern": "*.down_proj", "bits": 8}]},
                ptq={"rotation": "hadamard", "rotation_seed": 3}, qat={"kd": {"loss": "jsd", "jsd_beta": 0.3}},
                export={"formats": ["dequantized"]}, eval={"gpu_memory_utilization": 0.4, "max_model_len": 512})
    spec = quant_spec(r, 2)
    assert spec.weights.default == QuantScheme(2, 64, True)
    assert spec.weights.scheme_for("model.layers.0.mlp.down_proj").bits == 8
    assert spec.activations == ActivationScheme(8) and spec.kv_cache is None and spec.rotation == RotationScheme("hadamard", 3)
    assert spec.online and not quant_spec(_recipe(tmp_path), 4).online
    assert (kd_spec(r).loss, kd_spec(r).jsd_beta) == ("jsd", 0.3)
    assert (engine_settings(r).gpu_memory_utilization, engine_settings(r).max_model_len) == (0.4, 512)


def test_the_quant_spec_beside_the_weights_and_a_legacy_runtime_give_the_same_function(tmp_path):
    """quant_spec.json round-trips, and a checkpoint written before it (config.json's `rqat_runtime`) installs
    the same online parts: the two models compute the same logits, which differ from the bare weights'."""
    spec = QuantSpec(QuantTargets(QuantScheme(4), ignore=("lm_head",)), ActivationScheme(4),
                     KVCacheScheme(4, group_size=8), RotationScheme("hadamard", 0))
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    model = tiny_qwen3(vocab_size=50)
    install_quant_spec(model, spec)
    write_quant_spec(model, tmp_path)
    assert read_quant_spec(tmp_path) == spec
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    act_modules = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    (legacy / "config.json").write_text(json.dumps({"rqat_runtime": {
        "rotation": {"kind": "hadamard", "seed": 0}, "activations": {"bits": 4, "symmetric": False, "clip_ratio": 1.0},
        "act_modules": act_modules, "kv_cache": {"bits": 4, "group_size": 8, "symmetric": False, "clip_ratio": 1.0}}}))
    old = tiny_qwen3(vocab_size=50)
    install_quant_spec(old, read_quant_spec(legacy))
    bare = tiny_qwen3(vocab_size=50)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        a, b, c = model(ids).logits, old(ids).logits, bare(ids).logits
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert not (tmp_path / "plain").exists() and read_quant_spec(tmp_path / "plain") is None
    assert SPEC_FILE == "quant_spec.json"
