"""Tied output heads (Qwen3-0.6B/1.7B/4B, SmolLM2): quantizing the head unties it, the embedding keeps
its full-precision weight, and every checkpoint and export holds the fake-quant head (a reload's
`tie_weights()` used to copy the embedding over the head's grid-unit latent, zeroing the export)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from reasoning_qat.errors import UserError
from reasoning_qat.quant import swap_in_fake_quant
from reasoning_qat.quant.formats import (
    export_compressed_tensors,
    export_dequantized,
    load_quantized_checkpoint,
    save_quantized_checkpoint,
)
from reasoning_qat.quant.ptq import gptq_quantize_model, rtn_quantize_model
from reasoning_qat.quant.scheme import QuantScheme, QuantTargets

from ..families import FAMILIES

TARGETS = QuantTargets(QuantScheme(4, group_size=32), ignore=())  # quant.ignore: [] (the head too)


def _tied():
    f = FAMILIES["qwen3"]
    tok = f.tokenizer()
    model = f.model(tok)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, tok


@pytest.mark.parametrize("init", ["rtn", "bf16"])
def test_a_quantized_tied_head_is_untied_in_every_checkpoint_and_export(tmp_path, init):
    model, tok = _tied()
    embedding = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, len(tok), (2, 12))
    if init == "rtn":  # the ptq stage's RTN
        qws, _ = rtn_quantize_model(model, TARGETS.resolve(model))
        swap_in_fake_quant(model, TARGETS, qws)
    else:  # QAT from BF16: the latent keeps the full-precision weight
        swap_in_fake_quant(model, TARGETS, keep_latent=True)
    head = model.lm_head.quantized_weight().detach()
    assert model.config.tie_word_embeddings is False and "lm_head" in dict(model.named_modules())
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        ref = model(input_ids=ids).logits

    save_quantized_checkpoint(model, tmp_path / "q", tok)
    student = load_quantized_checkpoint(tmp_path / "q")
    assert torch.equal(student.lm_head.quantized_weight(), head)
    assert torch.equal(student.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, ref, atol=1e-5)

    export_dequantized(load_quantized_checkpoint(tmp_path / "q"), tmp_path / "deq", tok, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32)
    assert torch.equal(plain.lm_head.weight, head) and torch.equal(plain.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, ref, atol=1e-4)

    # compressed-tensors, read by its own decompressor and by transformers' integration
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    export_compressed_tensors(load_quantized_checkpoint(tmp_path / "q"), tmp_path / "ct", tok, dtype=torch.float32)
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    (scheme,) = QuantizationConfig.model_validate(json.loads((tmp_path / "ct" / "config.json").read_text())
                                                  ["quantization_config"]).config_groups.values()
    parts = {k.removeprefix("lm_head."): v for k, v in state.items() if k.startswith("lm_head.")}
    assert torch.equal(PackedQuantizationCompressor.decompress(parts, scheme)["weight"], head)
    assert torch.equal(state["model.embed_tokens.weight"], embedding)
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(packed(input_ids=ids).logits, ref, atol=1e-4)


def test_gptq_refuses_a_head_in_one_line_before_calibrating():
    model, _ = _tied()
    with pytest.raises(UserError, match=r"^ignore: GPTQ quantizes the decoder layers only; 1 targeted layer.*lm_head.*add them to ignore"):
        gptq_quantize_model(model, TARGETS.resolve(model), torch.zeros(2, 8, dtype=torch.long))


def test_a_recipe_that_gptq_quantizes_the_head_is_refused_before_the_run(tmp_path):
    """quant.ignore: [] with GPTQ: one line naming quant.ignore, exit 2, no run directory."""
    from ..test_errors import cli, one_line_error

    model_dir = FAMILIES["qwen3"].save(tmp_path / "qwen3")
    (tmp_path / "data.jsonl").write_text('{"prompt": "What is 3+5?", "response": "<think>\\n8\\n</think>\\n\\n\\\\boxed{8}", "answer": "8"}\n')
    (tmp_path / "math.jsonl").write_text('{"problem": "What is 3+5?", "answer": "8"}\n')
    rec = tmp_path / "head.yaml"
    rec.write_text(f"""name: head
run_root: {tmp_path / "runs"}
model: {{id: {model_dir}, dtype: float32}}
quant: {{bits: [4], group_size: 32, ignore: []}}
calibration: {{num_samples: 2, seq_len: 16}}
ptq: {{method: gptq, baselines: [rtn]}}
qat: {{data: {{source: {tmp_path / "data.jsonl"}}}}}
eval: {{tasks: [math500], data: {{math500: {tmp_path / "math.jsonl"}}}}}
""")
    one_line_error(cli("run", str(rec)), "quant.ignore: GPTQ (gptq) quantizes decoder layers only, and lm_head is outside them")
    assert not (tmp_path / "runs").exists()
