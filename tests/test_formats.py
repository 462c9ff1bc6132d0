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


def _act_ordered_tiny(bits, gs=32, sym=False):
    """A fake-quant model whose groups are a permutation of the columns, as act-order GPTQ writes."""
    from reasoning_qat.quant.fake_quant import FakeQuantLinear, QuantizedWeight, _set_module
    from reasoning_qat.quant.quantizer import find_group_params, quantize_weight

    model = tiny_qwen3()
    scheme = QuantScheme(bits, gs, sym)
    g = torch.Generator().manual_seed(bits)
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]:
        in_f = lin.in_features
        g_idx = (torch.arange(in_f) // gs)[torch.randperm(in_f, generator=g)].to(torch.int32)
        scale, zero = find_group_params(lin.weight.data, scheme)
        qw = QuantizedWeight(quantize_weight(lin.weight.data, scale, zero, g_idx, scheme.maxq), scale, zero, g_idx, scheme)
        _set_module(model, name, FakeQuantLinear(lin, qw))
    return model


CT_CASES = [(b, gs, sym) for b in (2, 3, 4, 8) for gs in (32, -1) for sym in (False, True)]


@pytest.mark.parametrize("bits,gs,sym", CT_CASES + [("act_order", 32, False), ("act_order", 32, True)])
def test_compressed_tensors_export_decompresses_to_the_fake_quant_weights(tmp_path, bits, gs, sym):
    """Written and read back by the compressed-tensors library itself (its own decompressor)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from reasoning_qat.quant.formats import export_compressed_tensors

    model = _act_ordered_tiny(3, gs, sym) if bits == "act_order" else _quantized_tiny(bits, gs, sym=sym)
    expected = {n: m.quantized_weight().detach().clone() for n, m in fake_quant_modules(model).items()}
    export_compressed_tensors(model, tmp_path / "ct", dtype=torch.float32)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"]
    qcfg = QuantizationConfig.model_validate(cfg)
    (scheme,) = qcfg.config_groups.values()
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, w in expected.items():
        parts = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name}
        assert "weight" not in parts and parts["weight_packed"].dtype == torch.int32
        assert ("weight_zero_point" in parts) is (not sym) and ("weight_g_idx" in parts) is (bits == "act_order")
        assert torch.equal(PackedQuantizationCompressor.decompress(parts, scheme)["weight"], w), name
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight.detach())


@pytest.mark.parametrize("bits,gs,sym", [(2, 32, False), (3, -1, True), (4, 32, False), (8, 32, True)])
def test_transformers_loads_the_compressed_tensors_export(tmp_path, bits, gs, sym):
    """transformers' compressed-tensors integration loads the export; its logits are the dequantized export's."""
    import copy

    from reasoning_qat.quant.formats import export_compressed_tensors

    model = _quantized_tiny(bits, gs, sym=sym)
    export_dequantized(copy.deepcopy(model), tmp_path / "dq", dtype=torch.float32)
    export_compressed_tensors(model, tmp_path / "ct", dtype=torch.float32)
    x = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()(x).logits
        dq = AutoModelForCausalLM.from_pretrained(tmp_path / "dq").eval()(x).logits
    assert torch.equal(ct, dq)
