"""GPTQ against a plain column-by-column reference (no lazy blocks, no Cholesky tricks)."""

import pytest
import torch

from reasoning_qat.quant import QuantizedWeight, QuantScheme
from reasoning_qat.quant.gptq import HessianAccumulator, gptq_quantize, weighted_error
from reasoning_qat.quant.quantizer import find_params


def reference_gptq(W, H, scheme, damp=0.01):
    """The GPTQ recursion as in the paper: quantize column i, then update the remaining columns with
    the error scaled by the inverse Hessian of the remaining columns (recomputed explicitly)."""
    W = W.clone().double()
    H = H.clone().double()
    n = W.shape[1]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=torch.float64)
    gs = scheme.effective_group_size(n)
    out = torch.zeros_like(W)
    scale = zero = None
    for i in range(n):
        if i % gs == 0:
            scale, zero = find_params(W[:, i : i + gs].float(), scheme)
            scale, zero = scale.double(), zero.double()
        Hinv = torch.linalg.inv(H[i:, i:])  # inverse Hessian of the not-yet-quantized columns
        q = torch.clamp(torch.round(W[:, i] / scale) + zero, 0, scheme.maxq)
        out[:, i] = (q - zero) * scale
        err = (W[:, i] - out[:, i]) / Hinv[0, 0]
        W[:, i:] -= err[:, None] * Hinv[0, :][None, :]
    return out.float()


def correlated_inputs(n_features=64, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_features, n_features, generator=g) / n_features**0.5
    return torch.randn(n, n_features, generator=g) @ (torch.eye(n_features) + 2 * mix)


@pytest.mark.parametrize("bits,gs", [(4, 16), (3, 32), (2, -1)])
def test_gptq_matches_reference(bits, gs):
    torch.manual_seed(1)
    X = correlated_inputs()
    acc = HessianAccumulator(64, "cpu")
    acc.add(X[:1000])
    acc.add(X[1000:])  # two batches: the running average must equal one pass
    assert torch.allclose(acc.H, 2 * X.T @ X / len(X), rtol=1e-4, atol=1e-4)
    W = torch.randn(24, 64)
    scheme = QuantScheme(bits, gs)
    ours = gptq_quantize(W, acc.H, scheme, block_size=32).dequantize()
    ref = reference_gptq(W, acc.H, scheme)
    mismatch = (ours != ref).float().mean().item()
    assert mismatch < 0.01, f"{mismatch:.2%} of weights differ from the reference"
    assert weighted_error(W, ours, acc.H) == pytest.approx(weighted_error(W, ref, acc.H), rel=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_output_error(bits):
    torch.manual_seed(2)
    X = correlated_inputs(128, 4096)
    acc = HessianAccumulator(128, "cpu")
    acc.add(X)
    W = torch.randn(64, 128)
    scheme = QuantScheme(bits, 32)
    gptq_err = weighted_error(W, gptq_quantize(W, acc.H, scheme).dequantize(), acc.H)
    rtn_err = weighted_error(W, QuantizedWeight.rtn(W, scheme).dequantize(), acc.H)
    assert gptq_err < 0.8 * rtn_err


def test_act_order_records_groups_in_g_idx():
    torch.manual_seed(3)
    X = correlated_inputs(64, 1024) * torch.linspace(0.1, 3, 64)  # distinct Hessian diagonal
    acc = HessianAccumulator(64, "cpu")
    acc.add(X)
    W = torch.randn(8, 64)
    qw = gptq_quantize(W, acc.H, QuantScheme(4, 16), act_order=True)
    perm = torch.argsort(torch.diag(acc.H), descending=True)
    assert torch.equal(qw.g_idx[perm], torch.arange(64, dtype=torch.int32) // 16)
    assert weighted_error(W, qw.dequantize(), acc.H) < weighted_error(W, QuantizedWeight.rtn(W, QuantScheme(4, 16)).dequantize(), acc.H)


def test_gptq_driver_builds_no_autograd_graph(tiny_model):
    """The layer forwards must run without autograd: a graph kept alive across layers held every
    calibration batch's activations and ran a 1.7B model out of GPU memory."""
    from reasoning_qat.quant import QuantScheme, QuantTargets
    from reasoning_qat.quant.ptq import gptq_quantize_model

    seen = []
    tiny_model.model.layers[1].register_forward_hook(lambda m, a, o: seen.append(torch.is_grad_enabled()))
    plan = QuantTargets(QuantScheme(4, 32)).resolve(tiny_model)
    gptq_quantize_model(tiny_model, plan, torch.randint(0, 100, (4, 16)), batch_size=2, progress=False)
    assert seen and not any(seen)


def test_participation_ratio_counts_the_input_directions_used():
    """Inputs confined to k directions give a ratio of at most k (exactly k when the k carry equal
    variance); isotropic inputs give nearly the full width."""
    from reasoning_qat.quant.gptq import HessianAccumulator, participation_ratio

    torch.manual_seed(0)
    d, k = 64, 5
    basis = torch.linalg.qr(torch.randn(d, k))[0]  # k orthonormal directions
    low, full = HessianAccumulator(d, "cpu"), HessianAccumulator(d, "cpu")
    for _ in range(4):
        low.add(torch.randn(512, k) @ basis.T)
        full.add(torch.randn(512, d))
    assert abs(participation_ratio(low.H) - k) < 0.5
    assert participation_ratio(full.H) > 0.85 * d
    skewed = HessianAccumulator(d, "cpu")
    skewed.add(torch.randn(2048, k) * torch.tensor([10.0, 1, 1, 1, 1]) @ basis.T)
    assert participation_ratio(skewed.H) < 1.2  # one direction dominates the energy


def test_dead_input_columns_keep_their_rtn_value():
    """Inputs that are exactly zero in every calibration sample leave their columns to RTN on the
    group's grid (the reference GPTQ zeroes them); an all-zero Hessian is RTN exactly."""
    scheme = QuantScheme(3, group_size=16)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 64, generator=g)
    X = correlated_inputs(64)
    X[:, 8:12] = 0  # four dead inputs
    acc = HessianAccumulator(64, "cpu")
    acc.add(X)
    qw = gptq_quantize(W, acc.H, scheme)
    w_hat = qw.dequantize()
    s, z = qw.scale[:, 0:1], qw.zero[:, 0:1]  # columns 8-11 are in group 0
    rtn_on_grid = (torch.clamp(torch.round(W[:, 8:12] / s) + z, 0, scheme.maxq) - z) * s
    assert torch.equal(w_hat[:, 8:12], rtn_on_grid) and w_hat[:, 8:12].abs().sum() > 0
    everything_dead = gptq_quantize(W, torch.zeros(64, 64), scheme)
    assert torch.equal(everything_dead.dequantize(), QuantizedWeight.rtn(W, scheme).dequantize())


def test_gptq_driver_counts_dead_columns_and_names_a_layer_with_nan_inputs(tiny_model):
    from reasoning_qat.errors import UserError
    from reasoning_qat.quant import QuantTargets
    from reasoning_qat.quant.ptq import gptq_quantize_model

    plan = QuantTargets(QuantScheme(4, group_size=32)).resolve(tiny_model)
    calib = torch.randint(0, 100, (4, 32))
    with torch.no_grad():
        tiny_model.model.layers[0].input_layernorm.weight[:5] = 0  # q/k/v of layer 0 never see inputs 0-4
    dead = {}
    gptq_quantize_model(tiny_model, plan, calib, dead_columns=dead, progress=False)
    assert dead["model.layers.0.self_attn.q_proj"] == dead["model.layers.0.self_attn.v_proj"] == 5
    assert dead["model.layers.0.mlp.down_proj"] == 0
    with torch.no_grad():
        tiny_model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    with pytest.raises(UserError, match=r"^ptq: the calibration inputs of model\.layers\.1\.mlp\.gate_proj hold inf or nan"):
        gptq_quantize_model(tiny_model, plan, calib, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gptq_of_a_cpu_resident_model_layer_by_layer_equals_gptq_on_the_gpu():
    """A model left on the CPU, each decoder layer brought to the GPU for its turn, gets the
    codes GPTQ gives the same model held on the GPU, stays on the CPU, and holds less GPU memory."""
    import copy

    from reasoning_qat.quant import QuantScheme, QuantTargets
    from reasoning_qat.quant.ptq import gptq_quantize_model

    from ..conftest import tiny_qwen3

    model = tiny_qwen3(layers=4, hidden=256, inter=512)
    plan = QuantTargets(QuantScheme(4, 64)).resolve(model)
    calib = torch.randint(0, 100, (8, 64))
    peaks = []
    results = []
    for where in ("cuda", "cpu"):
        m = copy.deepcopy(model).to(where)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        results.append(gptq_quantize_model(m, plan, calib, device="cuda", batch_size=4, progress=False))
        peaks.append(torch.cuda.max_memory_allocated())
        if where == "cpu":
            assert {p.device.type for p in m.parameters()} == {"cpu"}
            assert {qw.codes.device.type for qw in results[-1][0].values()} == {"cpu"}
        del m
    (on_gpu, err_gpu), (offloaded, err_off) = results
    same = sum((on_gpu[n].codes.cpu() == offloaded[n].codes).sum().item() for n in plan)
    assert same / sum(offloaded[n].codes.numel() for n in plan) > 0.999
    assert max(abs(err_gpu[n] - err_off[n]) / err_gpu[n] for n in plan) < 1e-3
    assert peaks[1] < peaks[0]
