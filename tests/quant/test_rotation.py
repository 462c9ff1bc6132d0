"""W4A4KV4 building blocks: Hadamard transforms, the QuaRot rotation of a Qwen3 model, activation and
KV-cache fake quantization, and cached generation under KV quantization."""

import pytest
import torch

from reasoning_qat.errors import SpecError, UserError
from reasoning_qat.quant.act_quant import ActQuantizer, KVQuantizer, install_quant_attention
from reasoning_qat.quant.rotation import (
    fwht,
    hadamard_matrix,
    install_online_rotations,
    random_hadamard,
    rotate,
)
from reasoning_qat.quant.runtime import install_quant_spec
from reasoning_qat.quant.scheme import (
    ActivationScheme,
    KVCacheScheme,
    QuantScheme,
    QuantSpec,
    QuantTargets,
    RotationScheme,
)

from ..conftest import tiny_qwen3


@pytest.mark.parametrize("n", [1, 2, 16, 64, 12, 24, 96, 3072])
def test_fast_hadamard_equals_the_dense_product(n):
    h = hadamard_matrix(n, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)  # orthonormal
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))  # a Hadamard matrix, scaled
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ h, atol=1e-10)
    q = random_hadamard(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_unsupported_hadamard_size_is_a_clear_error():
    with pytest.raises(SpecError, match="rotation: a Hadamard transform of size 20 is not built here.*use rotation: none"):
        hadamard_matrix(20)


@pytest.mark.parametrize("tie", [False, True])
def test_rotation_without_quantization_keeps_the_function(tie):
    """Norm folding, residual and V/O rotations, and the online Hadamards on down_proj's input and on
    q/k: the rotated model's logits equal the original's (float32 tolerance). MLP width 96 = 12*8
    exercises the non-power-of-two transform."""
    model = tiny_qwen3(vocab_size=50, hidden=64, inter=96, layers=2, tie=tie).float()
    with torch.no_grad():  # non-trivial norm weights, so folding them matters
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
        rotate(model, seed=1)
        install_online_rotations(model)
        install_quant_attention(model, kv=None)
        out = model(ids).logits
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()
    # the rotation did change the weights (it is not a no-op)
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, tiny_qwen3(50, 64, 96, 2, tie).model.layers[0].mlp.down_proj.weight)


def _reference_asym(x, bits, clip=1.0):
    """Independent per-row reference with Python floats."""
    out = torch.empty_like(x)
    qmax = 2**bits - 1
    for idx in range(x.shape[0]):
        row = [float(v) for v in x[idx]]
        lo, hi = min(row) * clip, max(row) * clip
        scale = max(hi - lo, 1e-8) / qmax
        zero = round(-lo / scale)
        out[idx] = torch.tensor([(min(max(round(v / scale) + zero, 0), qmax) - zero) * scale for v in row])
    return out


def _reference_sym(x, bits):
    out = torch.empty_like(x)
    qmax = 2 ** (bits - 1) - 1
    for idx in range(x.shape[0]):
        row = [float(v) for v in x[idx]]
        scale = max(max(abs(v) for v in row), 1e-8) / qmax
        out[idx] = torch.tensor([min(max(round(v / scale), -qmax - 1), qmax) * scale for v in row])
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_quantizer_matches_a_reference(bits):
    torch.manual_seed(0)
    x = torch.randn(7, 32, dtype=torch.float64) * torch.linspace(0.1, 3, 32, dtype=torch.float64)
    assert torch.allclose(ActQuantizer(bits, symmetric=False)(x), _reference_asym(x, bits), atol=1e-9)
    assert torch.allclose(ActQuantizer(bits, symmetric=True)(x), _reference_sym(x, bits), atol=1e-9)
    assert torch.allclose(ActQuantizer(bits, clip_ratio=0.9)(x), _reference_asym(x, bits, 0.9), atol=1e-9)
    # 2^bits levels per token at most, and a straight-through gradient
    assert all(len(set(r.tolist())) <= 2**bits for r in ActQuantizer(bits)(x))
    x.requires_grad_(True)
    ActQuantizer(bits)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_kv_quantizer_groups_per_head():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    q = KVQuantizer(4, group_size=8)(k)
    ref = _reference_asym(k.reshape(-1, 8), 4).reshape(k.shape)
    assert torch.allclose(q, ref, atol=1e-9)
    whole = KVQuantizer(4, group_size=-1)(k)
    assert torch.allclose(whole, _reference_asym(k.reshape(-1, 16), 4).reshape(k.shape), atol=1e-9)


def _quantized_model():
    model = tiny_qwen3(vocab_size=50, hidden=64, inter=96, layers=2).double()
    rotate(model, seed=0)
    spec = QuantSpec(QuantTargets(QuantScheme(4)), ActivationScheme(4), KVCacheScheme(4, group_size=8),
                     RotationScheme("hadamard", 0))
    assert install_quant_spec(model, spec)
    assert not install_quant_spec(model, spec)  # once per model
    return model.eval()


def test_kv_quantization_acts_during_cached_generation():
    """Greedy generation with the KV cache equals a full recompute of every prefix under the same
    quantization, and differs from the unquantized model's: KV and activation quantization are
    active in the cached decode steps."""
    torch.manual_seed(0)
    model = _quantized_model()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                use_cache=True, pad_token_id=0)
        seq = ids
        for _ in range(12):  # full recompute, no cache
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        plain = tiny_qwen3(vocab_size=50, hidden=64, inter=96, layers=2).double().eval()
        unquantized = plain(seq, use_cache=False).logits
        quantized = model(seq, use_cache=False).logits
    assert torch.equal(cached, seq)
    assert (quantized - unquantized).abs().max() > 1e-3  # the quantizers do change the function


def _generate_logits(model, ids, steps=10):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits)


def test_kv_cache_stores_transformed_entries_once_and_computes_the_same():
    """The KV cache stores keys rotated and keys/values quantized, written once: each decode step quantizes
    only its new token, not the whole cache. Generation is the same as the per-step whole-cache path (the
    write hook removed) to the last bit."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 6))
    model = _quantized_model()
    kv = model.get_decoder().layers[0].self_attn.kv_quantizer
    seen = []

    class Counting(type(kv)):
        def __call__(self, x):
            seen.append(x.shape[-2])
            return super().__call__(x)

    counting = Counting(kv.bits, kv.group_size, kv.symmetric, kv.clip_ratio)
    for layer in model.get_decoder().layers:
        layer.self_attn.kv_quantizer = counting
    with torch.no_grad():
        seqs, logits = _generate_logits(model, ids)
    layers = len(model.get_decoder().layers)
    assert seen == [6] * 2 * layers + [1] * 2 * layers * 9  # prefill (K and V per layer), then 1 token a step

    plain = _quantized_model()
    plain.kv_write_hook.remove()  # the whole cache transformed at every step
    with torch.no_grad():
        plain_seqs, plain_logits = _generate_logits(plain, ids)
    assert torch.equal(seqs, plain_seqs) and torch.equal(logits, plain_logits)


def test_a_cache_filled_before_the_hook_could_transform_it_is_left_alone():
    """A cache that reaches the model already holding untransformed entries (the model built it inside a forward
    call) keeps them: the attention function transforms the whole cache, and continuing from it gives the
    full-recompute logits. A copy of a transforming cache keeps transforming, into the same attention modules."""
    import copy

    from transformers import DynamicCache

    torch.manual_seed(0)
    model = _quantized_model()
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :5], use_cache=True)  # the cache is created inside the decoder, past the hook
        assert not hasattr(first.past_key_values, "_rqat_attention")
        rest = model(ids[:, 5:], past_key_values=first.past_key_values, use_cache=True).logits
        assert torch.allclose(rest, full[:, 5:], atol=1e-10)

        cache = DynamicCache(config=model.config)
        head = model(ids[:, :5], past_key_values=cache, use_cache=True).past_key_values
        assert head is cache and type(cache).__name__ == "KVTransformingDynamicCache"
        twin = copy.deepcopy(cache)
        assert type(twin) is type(cache) and twin._rqat_attention[0] is model.get_decoder().layers[0].self_attn
        for c in (cache, twin):
            tail = model(ids[:, 5:], past_key_values=c, use_cache=True).logits
            assert torch.allclose(tail, full[:, 5:], atol=1e-10)


def test_a_left_padded_row_computes_what_it_computes_alone():
    """transformers builds no attention mask for an attention function it has no mask function for, so a
    W4A4KV4 model once let a left-padded row attend to its pad tokens: in a batch (eval, GRPO rollouts) it
    generated other tokens than alone. The quantized attention registers SDPA's mask: a padded row's logits and
    its greedy generation are those of the row alone.

    Equal within float64 rounding, not bitwise: the padded row goes through SDPA with an explicit mask, the row
    alone through its causal kernel, and transformers 5.25 orders those sums differently (1.1e-16 apart). A row
    that sees its pads (what the missing mask function did) is ~0.5 away: the tolerance is 1e8 times tighter."""
    torch.manual_seed(0)
    model = _quantized_model()
    a, b = torch.randint(3, 50, (1, 8)), torch.randint(3, 50, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = (torch.arange(8) >= torch.tensor([[0], [3]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone_logits = model(b).logits[0]
        padded = model(batch, attention_mask=mask, position_ids=positions).logits[1, 3:]
        torch.testing.assert_close(padded, alone_logits, atol=1e-9, rtol=0)
        # the leak this guards against: the same row attending to its pad tokens is far outside that tolerance
        leaked = model(batch, attention_mask=torch.ones_like(mask), position_ids=positions).logits[1, 3:]
        assert (leaked - alone_logits).abs().max() > 1e-3
        together = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        alone = model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=12, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(together[1, 8:], alone[0, 5:])


def test_w4a4kv4_demo_end_to_end(tmp_path):
    """The demo at w4a4kv4 with Hadamard rotation: ptq (GPTQ and RTN on rotated weights), KD-QAT
    with activation and KV fake-quant, export, eval through transformers, compare. The export
    carries its QuantSpec beside its weights (quant_spec.json): our loader reproduces the QAT student's function, a plain
    AutoModelForCausalLM load (weights only) does not, and vLLM is refused with one line."""
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from reasoning_qat.evaluation.backends import make_backend
    from reasoning_qat.models import load_model
    from reasoning_qat.quant.formats import load_quantized_checkpoint

    from ..conftest import demo_recipe

    rec = demo_recipe(tmp_path, name="w4a4", teacher_steps=150, bits="[4]", baselines="[rtn]", qat_steps=10, limit=30)
    text = rec.read_text().replace("quant: {bits: [4], group_size: 32}",
                                   "quant: {bits: [4], group_size: 32, preset: w4a4kv4, kv_cache: {group_size: 16}}")
    text = text.replace("ptq: {method: gptq, baselines: [rtn]}", "ptq: {method: gptq, baselines: [rtn], rotation: hadamard}")
    rec.write_text(text.replace("formats: [dequantized, compressed-tensors]", "formats: [dequantized]"))
    subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec)], check=True, capture_output=True)
    run = tmp_path / "runs" / "w4a4"
    ev = json.loads((run / "eval" / "manifest.json").read_text())["metrics"]
    assert {"bf16", "w4-rtn", "w4-gptq", "w4-qat"} <= set(ev)
    assert all(m["demo_arith"]["backend"] == "TransformersBackend" for m in ev.values())
    table = (run / "compare" / "compare.md").read_text()
    assert "KD-QAT (Hadamard, A4, KV4)" in table and "GPTQ (domain calib) (Hadamard, A4, KV4)" in table
    export = run / "export" / "w4-qat" / "dequantized"
    spec = json.loads((export / "quant_spec.json").read_text())
    assert spec["rotation"]["kind"] == "hadamard" and spec["activations"]["bits"] == 4 and spec["kv_cache"]["bits"] == 4
    ids = torch.randint(3, 60, (2, 20))
    student = load_quantized_checkpoint(run / "qat" / "w4-qat" / "model").eval()
    served = load_model(str(export), torch.float32).eval()
    raw = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        s, e, w = student(ids).logits, served(ids).logits, raw(ids).logits
    assert torch.allclose(e, s, atol=1e-3), (e - s).abs().max()
    assert (w - s).abs().max() > 1e-2  # the weights alone are another function: the config says what else runs
    with pytest.raises(UserError, match="vllm cannot run"):
        make_backend("vllm", str(export))


def test_rotation_of_an_unsupported_width_is_refused_before_the_run_starts(tmp_path):
    from reasoning_qat.recipe import Recipe, RecipeError
    from reasoning_qat.stages import preflight

    recipe = Recipe.model_validate({"name": "r", "model": {"demo": {"hidden_size": 64, "intermediate_size": 160}},
                                    "quant": {"group_size": -1}, "ptq": {"rotation": "hadamard"},
                                    "export": {"formats": ["dequantized"]}, "eval": {"tasks": ["demo_arith"]},
                                    "run_root": str(tmp_path / "runs")})
    with pytest.raises(RecipeError, match="ptq.rotation: the model.s intermediate_size is 160; a Hadamard transform of size 160 is not built here"):
        preflight(recipe)
    assert not (tmp_path / "runs").exists()
