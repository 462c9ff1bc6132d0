"""Recipe validation: bad recipes fail with one line naming the field; shipped recipes validate."""

import subprocess
import sys

import pytest
import yaml

from reasoning_qat.recipe import RecipeError, load_recipe, parse_recipe

from .conftest import ROOT

GOOD = {"name": "x", "model": {"id": "Qwen/Qwen3-0.6B"}}


def with_(path: str, value):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


BAD = [
    (with_("quant.bits", 5), "quant.bits[0]: Input should be 2, 3, 4 or 8 (got 5)"),
    (with_("quant.group_size", 100), "quant.group_size: Input should be -1, 32, 64 or 128 (got 100)"),
    (with_("quant.bitz", 4), "quant.bitz: unknown key"),
    (with_("qat.kd.loss", "mse"), "qat.kd.loss: Input should be 'forward_kl', 'reverse_kl', 'jsd' or 'ce' (got 'mse')"),
    (with_("qat.schedule", "linear"), "qat.schedule: Input should be 'cosine', 'wsd' or 'constant' (got 'linear')"),
    (with_("qat.lr", -1), "qat.lr: Input should be greater than 0 (got -1)"),
    (with_("qat.init", "gptq"), "qat.init: Input should be 'ptq', 'rtn' or 'bf16' (got 'gptq')"),
    (with_("ptq.method", "awq"), "ptq.method: Input should be 'gptq' or 'rtn' (got 'awq')"),
    (with_("calibration.num_samples", 0), "calibration.num_samples: Input should be greater than or equal to 1 (got 0)"),
    (with_("eval.backend", "sglang"), "eval.backend: Input should be 'auto', 'vllm' or 'transformers' (got 'sglang')"),
    (with_("rl.enabled", True) | {"qat": {"enabled": False}}, "rl.enabled needs qat.enabled"),
    (with_("rl.init", "rtn"), "rl.init: Input should be 'qat' or 'ptq' (got 'rtn')"),
    ({"name": "x", "model": {"demo": {"min_steps": 7, "max_steps": 5}}}, "model.demo: min_steps 7 is above max_steps 5"),
    (with_("eval.methods", ["qat", "awq"]), "eval.methods[1]: Input should be"),
    ({"name": "x", "model": {}}, "model: set exactly one of model.id (hub id or local path) or model.demo"),
    ({"name": "x"}, "model: required field is missing"),
    ({"name": "bad name!", "model": {"id": "a"}}, "name: String should match pattern"),
    (with_("quant.bits", []), "quant.bits: Value error, give at least one bit width" .replace("Value error, ", "")),
    (with_("qat.deepspeed", "nope.json"), "qat.deepspeed: no such DeepSpeed config file 'nope.json'"),
    (with_("model.trust_remote_code", "maybe"), "model.trust_remote_code: Input should be a valid boolean"),
    (with_("qat.data.responses", "student"), "qat.data.responses: Input should be 'dataset' or 'teacher' (got 'student')"),
    (with_("rl.data", {"responses": "teacher"}), "rl.data: responses: teacher applies to qat.data only"),
    (with_("export.formats", ["gptq"]), "export.formats: gptq is served by vLLM only for symmetric 4- or 8-bit weights "
                                        "(this recipe: bits [4], symmetric False); use compressed-tensors"),
    (with_("export.formats", ["gptq"]) | {"quant": {"bits": [3, 4], "symmetric": True}}, "(this recipe: bits [3, 4], symmetric True)"),
    (with_("export.formats", ["awq"]), "export.formats[0]: Input should be 'dequantized', 'compressed-tensors' or 'gptq'"),
    ({**GOOD, "quant": {"bits": [3]}, "eval": {"export_format": "compressed-tensors", "backend": "vllm"}},
     "eval.export_format: compressed-tensors under vLLM, but vLLM 0.26 serves zero points (asymmetric) only at [4, 8] "
     "bits, not 3; symmetric 3-bit is served (quant.symmetric: true); or evaluate eval.export_format: dequantized"),
    ({**GOOD, "quant": {"bits": [4], "overrides": [{"pattern": "*.down_proj", "bits": 2}]},
      "eval": {"export_format": "compressed-tensors"}}, "not 2; symmetric 2-bit is served"),
    ({**GOOD, "quant": {"bits": [3], "symmetric": True}, "ptq": {"act_order": True},
      "eval": {"export_format": "compressed-tensors", "backend": "vllm"}},
     ("vLLM 0.26 has no 3-bit kernel for act-order groups (only [4, 8] bits); 3-bit without act-order is served "
      "(ptq.act_order: false)")),
    (with_("eval.dtype", "fp8"), "eval.dtype: Input should be 'auto', 'bfloat16', 'float16' or 'float32' (got 'fp8')"),
    (with_("eval.gpu_memory_utilization", 1.5), "eval.gpu_memory_utilization: Input should be less than or equal to 1"),
    (with_("model.attn_implementation", "flash"), "model.attn_implementation: Input should be 'sdpa', 'eager', "),
    ({"name": "x", "model": {"id": "Qwen/Qwen3-0.6B", "attn_implementation": "eager"}, "quant": {"preset": "w4a4kv4"},
      "export": {"formats": ["dequantized"]}, "eval": {"backend": "transformers"}},
     ("model.attn_implementation: quant.activations computes attention through SDPA (with its online rotation / K-V "
      "fake quant), not eager; leave it unset or sdpa")),
]


@pytest.mark.parametrize("data,expected", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_recipe_messages(data, expected):
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "r.yaml")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("r.yaml: ")
    assert expected in msg


def test_vllm_served_packed_schemes_pass():
    """Symmetric 2/3-bit and asymmetric 4/8-bit compressed-tensors are served; the transformers backend
    reads asymmetric 2/3-bit exports too."""
    for quant, backend in (({"bits": [2, 3], "symmetric": True}, "vllm"), ({"bits": [4, 8]}, "auto"),
                           ({"bits": [2, 3]}, "transformers")):
        parse_recipe({**GOOD, "quant": quant, "eval": {"export_format": "compressed-tensors", "backend": backend}})
    # act-order at 4/8 bits is served (Machete); at 2/3 bits it is only refused where GPTQ runs
    parse_recipe({**GOOD, "quant": {"bits": [4, 8]}, "ptq": {"act_order": True},
                  "eval": {"export_format": "compressed-tensors", "backend": "vllm"}})
    parse_recipe({**GOOD, "quant": {"bits": [3], "symmetric": True}, "ptq": {"act_order": True, "method": "rtn"},
                  "eval": {"export_format": "compressed-tensors", "backend": "vllm"}})


def test_not_yaml_and_not_mapping(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line \d"):
        load_recipe(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="expected a mapping of sections"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\nmodel: {id: a}\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_cli_bad_recipe_exits_2_without_traceback_and_writes_nothing(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(f"name: x\nrun_root: {tmp_path / 'runs'}\nmodel: {{id: a}}\nquant: {{bits: 7}}\n")
    res = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(p)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert "quant.bits[0]: Input should be 2, 3, 4 or 8 (got 7)" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_defaults_keep_remote_code_off_and_lm_head_in_bf16():
    r = parse_recipe(GOOD)
    assert r.model.trust_remote_code is False
    assert r.quant.ignore == ["lm_head"] and r.quant.bits == [4]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name DeepSpeed configs relative to the repository root
    r = load_recipe(path)
    assert r.name == path.stem


@pytest.mark.parametrize("recipe,layers,hidden,inter,heads,kv", [
    ("qwen3-0.6b-w4g128", 28, 1024, 3072, 16, 8),
    ("qwen3-1.7b-w4g128", 28, 2048, 6144, 16, 8),
])
def test_qwen3_recipes_resolve_architecture_from_local_config(tmp_path, monkeypatch, recipe, layers, hidden, inter, heads, kv):
    """The hub id is swapped for a local directory holding the real architecture's config; the quant
    plan then resolves over the real layer shapes (on the meta device: no weights allocated)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from reasoning_qat.models import load_config
    from reasoning_qat.stages.specs import quant_spec

    monkeypatch.chdir(ROOT)
    r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml")
    local = tmp_path / recipe
    Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, tie_word_embeddings=True,
                max_position_embeddings=40960).save_pretrained(local)
    r = r.model_copy(update={"model": r.model.model_copy(update={"id": str(local)})})
    cfg = load_config(r.model.id)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    for bits in r.quant.bits:
        plan = quant_spec(r, bits).weights.resolve(model)
        assert len(plan) == layers * 7
        assert all(s.group_size == 128 and s.bits == bits for s in plan.values())
        assert not any(n.startswith("lm_head") for n in plan)


def test_group_size_that_does_not_divide_a_layer_fails_before_any_work(tmp_path, saved_tiny):
    """The tiny model's layers are 64 and 128 wide: group size 128 cannot split the 64-wide inputs."""
    p = tmp_path / "r.yaml"
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "response": "r", "problem": "p", "answer": "1"}\n')
    p.write_text(f"name: x\nrun_root: {tmp_path / 'runs'}\nmodel: {{id: {saved_tiny}}}\nquant: {{bits: 4, group_size: 128}}\n"
                 f"qat: {{data: {{source: {data}}}}}\neval: {{data: {{math500: {data}}}}}\n")
    res = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(p)], capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "quant.group_size: 128 does not divide the input width 64 of model.layers.0.self_attn.q_proj" in res.stderr
    assert not (tmp_path / "runs" / "x" / "teacher").exists()


def test_plan_notes_act_order_exports_vllm_will_not_serve_packed():
    """An act-order GPTQ export at 2 bits is valid (transformers reads it) but vLLM 0.26 has no kernel for it:
    one note under the plan; at 4 bits, and with RTN (no act-order groups), none."""
    from reasoning_qat.stages.preflight import serving_notes

    def notes(bits, method="gptq"):
        return serving_notes(parse_recipe({**GOOD, "quant": {"bits": bits, "symmetric": True},
                                           "ptq": {"act_order": True, "method": method, "baselines": []},
                                           "export": {"formats": ["dequantized", "compressed-tensors"]}}))

    assert notes([2]) == [("export.formats: the 2-bit compressed-tensors export is written, but vLLM 0.26 has no 2-bit "
                           "kernel for act-order groups (only [4, 8] bits); 2-bit without act-order is served "
                           "(ptq.act_order: false)")]
    assert notes([4]) == [] and notes([2], method="rtn") == []
