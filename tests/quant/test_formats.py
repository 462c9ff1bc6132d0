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
    FUSED_SIBLINGS,
    export_dequantized,
    export_gptq,
    load_quantized_checkpoint,
    pack_bits,
    save_quantized_checkpoint,
)
from reasoning_qat.quant.quantizer import is_contiguous_groups
from reasoning_qat.serving import act_ordered_export, vllm_refuses_variant

from ..conftest import tiny_qwen3


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


def _act_ordered_tiny(bits, gs=32, sym=False, shared=True):
    """A fake-quant model whose groups are a permutation of the columns, as act-order GPTQ writes: one
    permutation per input (q/k/v share one, gate/up one), or with shared=False one per Linear."""
    from reasoning_qat.quant.fake_quant import FakeQuantLinear, QuantizedWeight, _set_module
    from reasoning_qat.quant.quantizer import find_group_params, quantize_weight

    model = tiny_qwen3()
    scheme = QuantScheme(bits, gs, sym)
    g = torch.Generator().manual_seed(bits)
    perms = {}
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]:
        in_f = lin.in_features
        fused = shared and name.rsplit(".", 1)[1] in {leaf for group in FUSED_SIBLINGS for leaf in group}
        reads = name.rsplit(".", 1)[0] if fused else name
        perm = perms.setdefault(reads, torch.randperm(in_f, generator=g))
        g_idx = (torch.arange(in_f) // gs)[perm].to(torch.int32)
        scale, zero = find_group_params(lin.weight.data, scheme)
        qw = QuantizedWeight(quantize_weight(lin.weight.data, scale, zero, g_idx, scheme.maxq), scale, zero, g_idx, scheme)
        _set_module(model, name, FakeQuantLinear(lin, qw))
    return model


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_packed_export_refuses_fused_layers_with_different_act_order_groups(tmp_path, fmt):
    """vLLM fuses q/k/v (and gate/up) into one layer holding one g_idx: a packed export whose siblings disagree
    would be served as another function (3-5 nats off, measured), so it is refused, naming both layers; the
    dequantized export holds no g_idx and is written."""
    from reasoning_qat.errors import UserError
    from reasoning_qat.quant.formats import export_formats

    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.q_proj and model\.layers\.0\.self_attn\.k_proj .*g_idx"):
        export_formats(_act_ordered_tiny(4, sym=True, shared=False), {fmt: tmp_path / fmt})
    assert not (tmp_path / fmt).exists()
    export_formats(_act_ordered_tiny(4, sym=True, shared=False), {"dequantized": tmp_path / "dq"})
    assert (tmp_path / "dq" / "config.json").is_file()


def test_act_order_gptq_gives_fused_layers_one_column_order():
    """Real GPTQ with act_order on a tiny Qwen3: q/k/v and gate/up read one input, so they get one g_idx each
    (what the packed exports' check and vLLM's fused layers need); other layers get their own orders."""
    from reasoning_qat.quant import QuantTargets
    from reasoning_qat.quant.formats import check_fused_g_idx
    from reasoning_qat.quant.ptq import gptq_quantize_model

    torch.manual_seed(0)
    model = tiny_qwen3()
    plan = QuantTargets(QuantScheme(4, 32, True)).resolve(model)
    qws, _ = gptq_quantize_model(model, plan, torch.randint(0, 100, (4, 32)), act_order=True, progress=False)
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    assert not is_contiguous_groups(qws[f"{attn}.q_proj"].g_idx, qws[f"{attn}.q_proj"].scale.shape[1])
    assert torch.equal(qws[f"{attn}.q_proj"].g_idx, qws[f"{attn}.k_proj"].g_idx)
    assert torch.equal(qws[f"{attn}.q_proj"].g_idx, qws[f"{attn}.v_proj"].g_idx)
    assert torch.equal(qws[f"{mlp}.gate_proj"].g_idx, qws[f"{mlp}.up_proj"].g_idx)
    assert not torch.equal(qws[f"{attn}.q_proj"].g_idx, qws[f"{mlp}.gate_proj"].g_idx)
    check_fused_g_idx(qws)  # raises nothing


CT_CASES = [(b, gs, sym) for b in (2, 3, 4, 8) for gs in (32, -1) for sym in (False, True)]


def independent_ct_dequant(parts: dict, bits: int, out_f: int, in_f: int, group_size: int) -> torch.Tensor:
    """Rebuild W [out, in] from a pack-quantized layer by the format's definition (compressed-tensors
    >= 0.18 `unpack_from_int32`; vLLM's WNA16 shapes): codes a little-endian bit stream per row,
    ceil(in*b/32) words; zero points the same stream down each column; stored unsigned, signed = u - 2^(b-1)."""
    packed, scale = parts["weight_packed"], parts["weight_scale"].float()
    assert packed.shape == (out_f, -(-in_f * bits // 32)) and packed.dtype == torch.int32
    codes = torch.tensor([unpack_words_bitstream(packed[o], bits, in_f) for o in range(out_f)])
    g_idx = parts["weight_g_idx"].long() if "weight_g_idx" in parts else torch.arange(in_f) // (group_size if group_size > 0 else in_f)
    if "weight_zero_point" in parts:
        zp = parts["weight_zero_point"]
        assert zp.shape == (-(-out_f * bits // 32), scale.shape[1]) and zp.dtype == torch.int32
        zero = torch.tensor([unpack_words_bitstream(zp[:, g], bits, out_f) for g in range(zp.shape[1])]).t()
    else:
        zero = torch.full(scale.shape, 2 ** (bits - 1))
    return (codes - zero[:, g_idx]).float() * scale[:, g_idx]


@pytest.mark.parametrize("bits,gs,sym", CT_CASES + [("act_order", 32, False), ("act_order", 32, True)])
def test_compressed_tensors_export_decompresses_to_the_fake_quant_weights(tmp_path, bits, gs, sym):
    """Read back by an independent decoder of the format's dense layout at every bit width, and by the
    compressed-tensors library's own decompressor where its pinned release (0.17) packs the same stream
    (2, 4, 8 bits; at 3 bits 0.17 pads ten codes to a word, which vLLM and the format since 0.18 do not)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from reasoning_qat.quant.formats import export_compressed_tensors

    model = _act_ordered_tiny(3, gs, sym) if bits == "act_order" else _quantized_tiny(bits, gs, sym=sym)
    nbits = 3 if bits == "act_order" else bits
    expected = {n: m.quantized_weight().detach().clone() for n, m in fake_quant_modules(model).items()}
    export_compressed_tensors(model, tmp_path / "ct", dtype=torch.float32)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"]
    # what the eval stage and `rqat publish` read to decide whether vLLM serves it packed
    assert act_ordered_export(tmp_path / "ct") is (bits == "act_order")
    assert (vllm_refuses_variant(nbits, set(), sym, act_ordered_export(tmp_path / "ct")) is None) is (
        nbits in (4, 8) or (sym and bits != "act_order"))
    qcfg = QuantizationConfig.model_validate(cfg)
    (scheme,) = qcfg.config_groups.values()
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, w in expected.items():
        parts = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == name}
        assert "weight" not in parts and parts["weight_packed"].dtype == torch.int32
        assert ("weight_zero_point" in parts) is (not sym) and ("weight_g_idx" in parts) is (bits == "act_order")
        assert torch.equal(independent_ct_dequant(parts, nbits, *w.shape, gs), w), name
        if nbits != 3:
            assert torch.equal(PackedQuantizationCompressor.decompress(parts, scheme)["weight"], w), name
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight.detach())


def test_dense_packing_is_the_libraries_at_2_4_8_bits():
    """At 2, 4 and 8 bits the dense stream is exactly what compressed-tensors' own packer writes."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    for bits in (2, 4, 8):
        for cols in (64, 40):  # a whole and a padded last word
            v = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, cols), dtype=torch.int8)
            assert torch.equal(pack_bits(v.long() + 2 ** (bits - 1), bits, pad=True), pack_to_int32(v, bits, packed_dim=1))


def _ct_version() -> tuple[int, ...]:
    import compressed_tensors

    return tuple(int(x) for x in compressed_tensors.__version__.split(".")[:2])


@pytest.mark.parametrize("bits,gs,sym", [(2, 32, False), (3, -1, True), (3, 32, True), (4, 32, False), (8, 32, True)])
def test_transformers_loads_the_compressed_tensors_export(tmp_path, bits, gs, sym):
    """transformers' compressed-tensors integration loads the export; its logits are the dequantized export's.
    CI runs this on both stacks: compressed-tensors 0.17 (the pin) and the newest release (0.20.1 over the
    newest transformers). Where a stack cannot read a layout it must fail loudly, never compute other logits:
    0.17 reads 3-bit as ten codes per word (the dense export fails its shapes); 0.18+ does not pack
    asymmetric zero points on transformers' meta-device path (size mismatch; README "Formats")."""
    import copy

    from reasoning_qat.quant.formats import export_compressed_tensors

    model = _quantized_tiny(bits, gs, sym=sym)
    export_dequantized(copy.deepcopy(model), tmp_path / "dq", dtype=torch.float32)
    export_compressed_tensors(model, tmp_path / "ct", dtype=torch.float32)
    x = torch.randint(0, 100, (2, 16))
    readable = (bits != 3) if _ct_version() < (0, 18) else sym
    with torch.no_grad():
        dq = AutoModelForCausalLM.from_pretrained(tmp_path / "dq").eval()(x).logits
        if not readable:
            with pytest.raises(RuntimeError):
                AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()(x)
            return
        ct = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()(x).logits
    assert torch.equal(ct, dq)


def test_all_formats_from_one_load_equal_one_load_per_format(tmp_path):
    """The export stage writes every format from one loaded model (export_formats): the same tensors and
    configs as a fresh load per format."""
    import copy

    from reasoning_qat.quant.formats import export_compressed_tensors, export_formats

    model = _quantized_tiny(4)
    export_formats(copy.deepcopy(model), {f: tmp_path / "one" / f for f in ("dequantized", "compressed-tensors", "gptq")})
    export_dequantized(copy.deepcopy(model), tmp_path / "each" / "dequantized")
    export_compressed_tensors(copy.deepcopy(model), tmp_path / "each" / "compressed-tensors")
    export_gptq(copy.deepcopy(model), tmp_path / "each" / "gptq")
    for fmt in ("dequantized", "compressed-tensors", "gptq"):
        a = load_file(str(tmp_path / "one" / fmt / "model.safetensors"))
        b = load_file(str(tmp_path / "each" / fmt / "model.safetensors"))
        assert a.keys() == b.keys(), fmt
        assert all(torch.equal(a[k], b[k]) for k in a), fmt
        ca, cb = (json.loads((tmp_path / d / fmt / "config.json").read_text()) for d in ("one", "each"))
        assert ca == cb, fmt


@pytest.mark.parametrize("bits,sym,tie", [(3, False, False), (4, True, True)])
def test_export_straight_from_the_checkpoint_equals_a_fake_quant_load(tmp_path, bits, sym, tie):
    """The export stage writes from the checkpoint's stored codes (export_checkpoint) without building a
    fake-quant model: every tensor and config equals what a fake-quant load swapped out writes, act-order
    layers and a tied head included."""
    from torch import nn

    from reasoning_qat.quant.fake_quant import FakeQuantLinear, QuantizedWeight, _set_module
    from reasoning_qat.quant.formats import export_checkpoint, export_formats
    from reasoning_qat.quant.quantizer import default_g_idx, find_group_params, quantize_weight

    torch.manual_seed(0)
    model = _quantized_tiny(bits, sym=sym, tie=tie)
    name = "model.layers.0.mlp.down_proj"  # in act-order: its columns' groups permuted, as GPTQ's act_order leaves them
    fq = model.get_submodule(name)
    w, s = fq.latent_weight().detach(), fq.scheme
    g = default_g_idx(w.shape[1], s)[torch.randperm(w.shape[1])]
    scale, zero = find_group_params(w, s)
    linear = nn.Linear(fq.in_features, fq.out_features, bias=False)
    _set_module(model, name, FakeQuantLinear(linear, QuantizedWeight(quantize_weight(w, scale, zero, g, s.maxq),
                                                                     scale, zero, g, s)))
    save_quantized_checkpoint(model, tmp_path / "ckpt")
    fmts = ("dequantized", "compressed-tensors", *(("gptq",) if sym else ()))
    direct = export_checkpoint(tmp_path / "ckpt", {f: tmp_path / "direct" / f for f in fmts}, act_order=True)
    loaded = export_formats(load_quantized_checkpoint(tmp_path / "ckpt"), {f: tmp_path / "loaded" / f for f in fmts},
                            act_order=True)
    assert direct.keys() == loaded.keys() and all(torch.equal(direct[k].codes, loaded[k].codes) for k in direct)
    for fmt in fmts:
        a = load_file(str(tmp_path / "direct" / fmt / "model.safetensors"))
        b = load_file(str(tmp_path / "loaded" / fmt / "model.safetensors"))
        assert a.keys() == b.keys(), fmt
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), fmt
        ca, cb = (json.loads((tmp_path / d / fmt / "config.json").read_text()) for d in ("direct", "loaded"))
        assert ca == cb, fmt
    assert "model.layers.0.mlp.down_proj.weight_g_idx" in load_file(str(tmp_path / "direct" / "compressed-tensors" / "model.safetensors"))
