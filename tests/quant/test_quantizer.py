"""Quantizer math against independent NumPy references, and the fake-quant gradients."""

import numpy as np
import pytest
import torch

from reasoning_qat.quant import (
    FakeQuantLinear,
    QuantizedWeight,
    QuantScheme,
    QuantTargets,
    swap_in_fake_quant,
    swap_out_fake_quant,
)
from reasoning_qat.quant.fake_quant import moved_fraction, weight_codes
from reasoning_qat.quant.quantizer import default_g_idx, fake_quantize, find_group_params

from ..conftest import tiny_qwen3


def numpy_rtn(w: np.ndarray, bits: int, gs: int, sym: bool) -> np.ndarray:
    """Textbook min/max round-to-nearest per (row, group), written without the project's code."""
    out = np.empty_like(w)
    maxq = 2**bits - 1
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], gs):
            x = w[r, g0 : g0 + gs]
            lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
            if sym:
                hi = max(abs(lo), hi)
                lo = -hi
            scale = np.float32(np.float16((hi - lo) / maxq))
            zero = (maxq + 1) / 2 if sym else min(max(np.round(-lo / scale), 0), maxq)
            q = np.clip(np.round(x / scale) + zero, 0, maxq)
            out[r, g0 : g0 + gs] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [32, 64, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_matches_numpy_reference(bits, gs, sym):
    torch.manual_seed(bits)
    w = torch.randn(16, 128) * 0.05
    qw = QuantizedWeight.rtn(w, QuantScheme(bits, gs, sym))
    ref = numpy_rtn(w.numpy(), bits, 128 if gs == -1 else gs, sym)
    np.testing.assert_allclose(qw.dequantize().numpy(), ref, rtol=0, atol=1e-6)
    assert int(qw.codes.max()) <= 2**bits - 1
    assert qw.scale.shape == (16, 1 if gs == -1 else 128 // gs)


def test_error_falls_with_bits_and_smaller_groups():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    err = lambda s: float(((QuantizedWeight.rtn(w, s).dequantize() - w) ** 2).mean())
    assert err(QuantScheme(2, 128)) > err(QuantScheme(3, 128)) > err(QuantScheme(4, 128)) > err(QuantScheme(8, 128))
    assert err(QuantScheme(3, -1)) > err(QuantScheme(3, 128)) > err(QuantScheme(3, 32))


def test_mse_and_percentile_observers_clip_outliers():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[:, 0] = 20.0  # one huge outlier per row
    mse = lambda s: float(((QuantizedWeight.rtn(w, s).dequantize() - w)[:, 1:] ** 2).mean())
    base = mse(QuantScheme(3, 128, observer="minmax"))
    assert mse(QuantScheme(3, 128, observer="mse")) < base
    assert mse(QuantScheme(3, 128, observer="percentile", percentile=0.99)) < base


def test_symmetric_zero_is_fixed_midpoint():
    qw = QuantizedWeight.rtn(torch.randn(8, 64), QuantScheme(4, 32, symmetric=True))
    assert torch.all(qw.zero == 8)


def test_fake_quant_forward_equals_dequantized_codes():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    s = QuantScheme(3, 32)
    scale, zero = find_group_params(w, s)
    g = default_g_idx(64, s)
    qw = QuantizedWeight.rtn(w, s)
    assert torch.equal(fake_quantize(w, scale, zero, g, s.maxq), qw.dequantize())


def test_fake_quant_permuted_groups_equal_dequantized_codes():
    """Act-order g_idx (columns not in group order) takes the gather path; same result."""
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    s = QuantScheme(4, 16)
    g = default_g_idx(64, s)[torch.randperm(64)]
    scale, zero = find_group_params(w, s)
    from reasoning_qat.quant.quantizer import dequantize, quantize_weight

    ref = dequantize(quantize_weight(w, scale, zero, g, s.maxq), scale, zero, g)
    assert torch.equal(fake_quantize(w, scale, zero, g, s.maxq), ref)
    assert torch.equal(fake_quantize(w, scale, zero, default_g_idx(64, s), s.maxq, contiguous=True),
                       fake_quantize(w, scale, zero, default_g_idx(64, s), s.maxq, contiguous=False))


def test_lsq_gradients():
    """Inside the clip range the weight gets gradient 1 and the scale round(w/s) - w/s; outside, the
    weight gets none and the scale gets the clip level minus the zero point; the zero point gets
    gradient only from clipped weights (-s per clipped element)."""
    s = torch.tensor([[0.5]], requires_grad=True)
    z = torch.tensor([[2.0]], requires_grad=True)  # 2 bits: codes 0..3, grid [-1.0, 0.5]
    w = torch.tensor([[0.3, -0.2, 5.0, -5.0]], requires_grad=True)
    out = fake_quantize(w, s, z, torch.zeros(4, dtype=torch.int32), maxq=3)
    out.sum().backward()
    assert torch.allclose(out.detach(), torch.tensor([[0.5, 0.0, 0.5, -1.0]]))
    assert torch.allclose(w.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    expected_s = (round(0.6) - 0.6) + (round(-0.4) - (-0.4)) + (3 - 2) + (0 - 2)
    assert s.grad.item() == pytest.approx(expected_s, abs=1e-6)
    assert z.grad.item() == pytest.approx(-0.5 - 0.5, abs=1e-6)  # two clipped weights, -s each


def test_swap_in_and_out(tiny_model):
    x = torch.randint(0, 100, (2, 12))
    targets = QuantTargets(QuantScheme(4, 32), overrides=(("*.mlp.down_proj", {"bits": 8}),))
    plan = swap_in_fake_quant(tiny_model, targets)
    assert len(plan) == 2 * 7 and "lm_head" not in plan
    assert plan["model.layers.0.mlp.down_proj"].bits == 8 and plan["model.layers.0.mlp.up_proj"].bits == 4
    assert isinstance(tiny_model.model.layers[1].self_attn.q_proj, FakeQuantLinear)
    with torch.no_grad():
        fq_logits = tiny_model(x).logits
    swap_out_fake_quant(tiny_model)
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny_model.modules())
    with torch.no_grad():
        assert torch.equal(tiny_model(x).logits, fq_logits)


def test_moved_fraction_counts_weights_pushed_to_another_grid_point(tiny_model):
    # the latent weight lives in grid units: +1 moves a code one grid point up (below the top of the grid)
    swap_in_fake_quant(tiny_model, QuantTargets(QuantScheme(4, 32)))
    before = weight_codes(tiny_model)
    total = sum(c.numel() for c in before.values())
    name = "model.layers.1.mlp.up_proj"
    fq = tiny_model.get_submodule(name)
    below_top = (before[name] < fq.scheme.maxq).flatten().nonzero().flatten()[:5]
    with torch.no_grad():
        fq.weight.view(-1)[below_top] += 1.0
    assert moved_fraction(before, tiny_model) == pytest.approx(5 / total)
    with pytest.raises(KeyError):
        moved_fraction({k: v for k, v in before.items() if k != name}, tiny_model)


def test_bad_group_size_fails_before_work(tiny_model):
    with pytest.raises(ValueError, match="group_size: 128 does not divide the input width 64"):
        swap_in_fake_quant(tiny_model, QuantTargets(QuantScheme(4, 128)))
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny_model.modules())
    with pytest.raises(ValueError, match="^bits: 5"):
        QuantScheme(5, 32)


def test_compiled_fake_quant_matches_eager(tiny_model):
    """`qat.compile: true` runs the same math: equal outputs and gradients through a real model."""
    from reasoning_qat.quant.fake_quant import use_compiled_fake_quant

    ids = torch.randint(0, 100, (2, 16))
    results = []
    for compiled in (False, True):
        model = tiny_qwen3()
        swap_in_fake_quant(model, QuantTargets(QuantScheme(3, 32)))
        assert use_compiled_fake_quant(model, compiled) == 14
        model(input_ids=ids, labels=ids).loss.backward()
        mod = model.model.layers[1].mlp.down_proj
        results.append((mod.quantized_weight().detach(), mod.weight.grad, mod.scale.grad, mod.zero.grad))
    for eager, comp in zip(*results):
        assert torch.allclose(eager, comp, rtol=1e-4, atol=1e-6)


def test_frozen_fake_quant_generates_the_same_and_drops_its_cache(tiny_model):
    from reasoning_qat.quant.fake_quant import fake_quant_modules, frozen_fake_quant

    swap_in_fake_quant(tiny_model, QuantTargets(QuantScheme(2, 32)))
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
        with frozen_fake_quant(tiny_model):
            a = tiny_model(input_ids=ids).logits
            mod = tiny_model.model.layers[0].mlp.up_proj
            cached = mod._cache
            with torch.no_grad():
                mod.scale.add_(1.0)  # frozen: a changed step size is not seen until the block ends
            b = tiny_model(input_ids=ids).logits
        c = tiny_model(input_ids=ids).logits
    assert torch.equal(a, ref) and torch.equal(b, ref) and cached is not None
    assert all(m._cache is None and not m.frozen for m in fake_quant_modules(tiny_model).values())
    assert not torch.allclose(c, ref)  # outside the block the new scale applies again


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_asymmetric_zero_point_uses_the_whole_code_range(observer):
    """A group of non-negative weights at 2 bits needs zero point 0: [0, .3, .6, .9] is exactly the
    grid {0, 1, 2, 3} x 0.3. (With zeros clamped to >= 1, as GPTQ v1's storage needed, 0.9 became 0.6.)"""
    w = torch.tensor([[0.0, 0.3, 0.6, 0.9]])
    scheme = QuantScheme(2, group_size=-1, observer=observer)
    qw = QuantizedWeight.rtn(w, scheme)
    assert qw.zero.item() == 0
    assert torch.allclose(qw.dequantize(), w, atol=1e-3)
    # QAT's forward (the learned zero starts there and may stay at 0) computes the same
    out = fake_quantize(w, qw.scale, qw.zero, qw.g_idx, scheme.maxq)
    assert torch.equal(out, qw.dequantize())
    assert torch.equal(fake_quantize(w, qw.scale, torch.tensor([[-0.4]]), qw.g_idx, scheme.maxq), out)  # rounds to 0


def test_prepare_builds_the_quantized_model_from_a_spec_and_its_init(tiny_model):
    """quant.prepare: every targeted Linear becomes a FakeQuantLinear holding `init`'s latents where given (a
    PTQ result) and RTN of its own weight elsewhere, the spec's activation quantizers are installed on them, the
    spec is recorded on the model, and an init written under another scheme is refused."""
    from reasoning_qat.errors import UserError
    from reasoning_qat.quant import prepare
    from reasoning_qat.quant.scheme import ActivationScheme, QuantSpec

    name = "model.layers.0.mlp.down_proj"
    other = tiny_qwen3()
    spec = QuantSpec(QuantTargets(QuantScheme(4, 32)), ActivationScheme(8))
    init = {name: QuantizedWeight.rtn(torch.randn_like(other.get_submodule(name).weight), QuantScheme(4, 32))}
    plan = prepare(other, spec, init)
    layers = {n: m for n, m in other.named_modules() if isinstance(m, FakeQuantLinear)}
    assert set(layers) == set(plan) and name in plan
    assert torch.equal(layers[name].quantized_weight(), init[name].dequantize())  # the init's grid values
    rest = "model.layers.1.mlp.down_proj"
    expect = QuantizedWeight.rtn(tiny_model.get_submodule(rest).weight.data, QuantScheme(4, 32)).dequantize()
    assert torch.equal(layers[rest].quantized_weight(), expect)  # no init: RTN of the layer's own weight
    assert other.quant_spec == spec and all(m.input_quantizer is not None for m in layers.values())
    with pytest.raises(UserError, match="the checkpoint holds"):
        prepare(tiny_qwen3(), QuantSpec(QuantTargets(QuantScheme(3, 32))), init)
