"""Model shapes from config.json alone (architecture.py) against the models transformers builds, and the
preflight that uses them: a bad recipe for a local model directory is refused without importing torch."""

import ast
import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from reasoning_qat.architecture import head_dim, linear_shapes
from reasoning_qat.errors import SpecError
from reasoning_qat.quant.ptq import linear_shapes_of
from reasoning_qat.quant.scheme import QuantScheme, QuantTargets
from reasoning_qat.recipe import RecipeError
from reasoning_qat.stages.specs import recipe_keys

SMALL = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
CONFIGS = [
    Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=True),  # head_dim set on its own (not 64 / 4)
    Qwen3Config(**SMALL),  # head_dim left at Qwen3's default, 128
    Qwen2Config(**SMALL, tie_word_embeddings=False),
    LlamaConfig(**SMALL),
    MistralConfig(**{**SMALL, "num_key_value_heads": 4}, head_dim=8),
]


def _saved_dict(config, tmp_path) -> dict:
    """config.json as save_pretrained writes it (only what differs from the defaults, as on the hub)."""
    config.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.model_type}-hd{getattr(c, 'head_dim', None)}")
def test_shapes_from_config_json_are_the_built_models(config, tmp_path):
    """Every nn.Linear's name, widths and decoder layer, and head_dim, read from config.json equal those of
    the model transformers builds from the same file (on the meta device)."""
    saved = _saved_dict(config, tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert linear_shapes(saved) == linear_shapes_of(model)
    assert head_dim(saved) == model.model.layers[0].self_attn.head_dim == head_dim(model.config)


def test_a_plan_from_shapes_is_the_plan_from_the_model(tmp_path):
    """QuantTargets resolves the same plan (overrides, ignore, class-name targets) from the config's
    shapes as from the built model, and refuses the same width in one line naming the override."""
    config = CONFIGS[0]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = QuantTargets(QuantScheme(bits=4, group_size=16), ("Linear",), ("lm_head", "*.0.mlp.*"),
                           (("*.k_proj", {"bits": 8, "group_size": -1}),))
    plan = targets.resolve_shapes(linear_shapes(_saved_dict(config, tmp_path)))
    assert plan == targets.resolve(model)
    assert plan["model.layers.1.self_attn.k_proj"].bits == 8 and "model.layers.0.mlp.up_proj" not in plan
    bad = QuantTargets(QuantScheme(bits=4, group_size=16), overrides=(("*.down_proj", {"group_size": 64}),))
    with pytest.raises(SpecError, match=r"^overrides: 64 does not divide the input width 96 of model.layers.0.mlp.down_proj"):
        bad.resolve_shapes(linear_shapes(config.to_dict()))
    # the recipe adapter names the key the user wrote
    with pytest.raises(RecipeError, match=r"^quant.overrides: 64 does not divide"), recipe_keys("quant"):
        bad.resolve_shapes(linear_shapes(config.to_dict()))


def test_other_families_are_left_to_the_built_model():
    """A family whose Linear layers differ (Phi-3 fuses q/k/v and gate/up) gets no shapes from the config:
    the preflight builds it on the meta device instead."""
    assert linear_shapes(Phi3Config(**SMALL).to_dict()) is None


REFUSE = r"""
import sys
from reasoning_qat.cli import main
rc = main(["run", sys.argv[1]])
print(rc, sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize(("config", "quant", "heavy", "message"), [
    (CONFIGS[0], "{bits: [4], group_size: 64}", [],
     "quant.group_size: 64 does not divide the input width 96 of model.layers.0.mlp.down_proj"),
    (CONFIGS[3], "{bits: [4], group_size: 32, kv_cache: {group_size: 12}}", [],
     "quant.kv_cache.group_size: 12 does not divide the model's head_dim 16"),
    # Phi-3 (fused qkv_proj and gate_up_proj): built on the meta device, so torch and transformers are imported
    (Phi3Config(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2), "{bits: [4], group_size: 64}", ["torch", "transformers"],
     "quant.group_size: 64 does not divide the input width 96 of model.layers.0.mlp.down_proj"),
], ids=["qwen3-width", "llama-kv-group", "phi3-meta"])
def test_a_local_model_directorys_widths_are_checked_before_anything_runs(tmp_path, config, quant, heavy, message):
    """A recipe for a model directory holding only config.json (no weights, no tokenizer) is refused on its
    widths, exit 2, in one line, nothing created; for the dense families without importing torch."""
    config.save_pretrained(tmp_path / "model")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: x\nrun_root: {tmp_path / 'runs'}\nmodel: {{id: {tmp_path / 'model'}}}\nquant: {quant}\n"
                      "qat: {data: {source: " + str(tmp_path / "qat.jsonl") + ", prompt_field: problem, response_field: solution}}\n"
                      "ptq: {method: rtn}\n"
                      "export: {formats: [dequantized]}\neval: {tasks: [math500], data: {math500: "
                      + str(tmp_path / "qat.jsonl") + "}}\n")
    (tmp_path / "qat.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2", "solution": "\\boxed{2}"}) + "\n")
    res = subprocess.run([sys.executable, "-c", REFUSE, str(recipe)], capture_output=True, text=True, timeout=300)
    assert res.stdout.split()[0] == "2", res.stderr
    assert res.stderr.strip() == f"error: {message}" or message in res.stderr.strip().splitlines()[-1], res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert ast.literal_eval(res.stdout.split(" ", 1)[1]) == heavy
    assert not (tmp_path / "runs").exists()
