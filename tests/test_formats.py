"""On-disk formats: GPTQ packing read back by an independent unpacker, the dequantized export read
back by transformers, and the PTQ -> QAT bridge."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant
from reasoning_qat.quant.fake_quant import fake_quant_modules
from reasoning_qat.quant.formats import (
    export_dequantized,
    export_gptq,
    load_quantized_checkpoint,
    pack_bits,
    save_quantized_checkpoint,
)

from .conftest import tiny_qwen3


def unpack_words_bitstream(words: torch.Tensor, bits: int, count: int) -> list[int]:
    """Spec: values are a little-endian bit stream over consecutive 32-bit words."""
    stream = 0
    for k, w in enumerate(words.tolist()):
        stream |= (w & 0xFFFFFFFF) << (32 * k)
    return [(stream >> (bits * j)) & (2**bits - 1) for j in range(count)]


def independent_gptq_dequant(state: dict, prefix: str, bits: int, in_f: int, out_f: int) -> torch.Tensor:
    """Rebuild W [out, in] from qweight/qzeros/scales/g_idx the way GPTQ v1 kernels define them."""
    qweight, qzeros = state[f"{prefix}.qweight"], state[f"{prefix}.qzeros"]
    scales, g_idx = state[f"{prefix}.scales"].float(), state[f"{prefix}.g_idx"].long()
    assert qweight.shape == (in_f * bits // 32, out_f) and qweight.dtype == torch.int32
    W = torch.zeros(out_f, in_f)
    zeros = torch.tensor([unpack_words_bitstream(qzeros[g], bits, out_f) for g in range(qzeros.shape[0])]) + 1
    for o in range(out_f):
        codes = torch.tensor(unpack_words_bitstream(qweight[:, o], bits, in_f))
        W[o] = (codes - zeros[g_idx, o]).float() * scales[g_idx, o]
    return W


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_is_little_endian_bitstream(bits):
    torch.manual_seed(bits)
    vals = torch.randint(0, 2**bits, (5, 64))
    packed = pack_bits(vals, bits)
    assert packed.shape == (5, 64 * bits // 32) and packed.dtype == torch.int32
    for r in range(5):
        assert unpack_words_bitstream(packed[r], bits, 64) == vals[r].tolist()


def test_pack_bits_3bit_matches_autogptq_layout():
    """AutoGPTQ's 3-bit packer: values 0-9 in word 0, value 10 split 2/1 bits across words 0/1, ..."""
    vals = torch.arange(32) % 8
    w = pack_bits(vals[None], 3)[0].tolist()
    w = [x & 0xFFFFFFFF for x in w]
    expect0 = sum(int(vals[j]) << (3 * j) for j in range(10)) | ((int(vals[10]) << 30) & 0xFFFFFFFF)
    assert w[0] == expect0
    assert w[1] & 1 == (int(vals[10]) >> 2) & 1


def _quantized_tiny(bits, gs=32, tie=False, sym=False):
    model = tiny_qwen3(tie=tie)
    swap_in_fake_quant(model, QuantTargets(QuantScheme(bits, gs, sym)))
    # Move the quantizers off their RTN init, as QAT would.
    with torch.no_grad():
        for m in fake_quant_modules(model).values():
            m.weight.add_(torch.randn_like(m.weight) * 0.01)
            m.scale.mul_(1.05)
    return model


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_export_matches_fake_quant(tmp_path, bits):
    model = _quantized_tiny(bits)
    export_gptq(model, tmp_path / "gptq")
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == bits and cfg["group_size"] == 32
    assert cfg["checkpoint_format"] == "gptq" and cfg["sym"] is False
    state = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    for name, m in fake_quant_modules(model).items():
        w = independent_gptq_dequant(state, name, bits, m.in_features, m.out_features)
        assert torch.equal(w, m.quantized_weight().detach()), name
    assert "lm_head.weight" in state and "model.layers.0.mlp.up_proj.weight" not in state


@pytest.mark.parametrize("tie", [False, True])
def test_dequantized_export_loads_in_transformers(tmp_path, tie):
    model = _quantized_tiny(3, tie=tie)
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        ref = model(x).logits
    export_dequantized(model, tmp_path / "dq", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dq").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


def test_bridge_student_equals_ptq_model(tmp_path):
    """PTQ checkpoint -> fake-quant student: the forward is the PTQ model's (dequantized) forward."""
    model = _quantized_tiny(2, sym=True)
    x = torch.randint(0, 100, (2, 16))
    save_quantized_checkpoint(model, tmp_path / "ptq")
    student = load_quantized_checkpoint(tmp_path / "ptq")
    export_dequantized(load_quantized_checkpoint(tmp_path / "ptq"), tmp_path / "dq", dtype=torch.float32)
    ptq_model = AutoModelForCausalLM.from_pretrained(tmp_path / "dq").eval()
    with torch.no_grad():
        a, b, c = student(x).logits, ptq_model(x).logits, model(x).logits
    assert (a - b).abs().max().item() < 1e-5
    assert (a - c).abs().max().item() < 1e-5
    assert all(p.requires_grad for n, p in student.named_parameters() if n.endswith(".scale"))
