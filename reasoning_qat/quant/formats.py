"""The one place that knows the on-disk formats.

1. `rqat` quantized checkpoint (what ptq, qat and rl write): a transformers config and tokenizer,
   `model.safetensors` with every non-quantized tensor plus, for each quantized Linear,
   `<name>.codes` (uint8), `<name>.scale`, `<name>.zero` (float32) and `<name>.g_idx` (int32), and
   `quant_meta.json` with each module's scheme. Loading it gives a fake-quant model whose forward is
   the quantized function (the PTQ -> QAT bridge).
2. Dequantized export: a plain transformers checkpoint holding w_hat = (q - zero) * scale, which any
   engine runs (used for evaluating every bit width; vLLM serves GPTQ only at 4/8 bits).
3. compressed-tensors `pack-quantized` export (llm-compressor's format): what vLLM's WNA16 path
   serves (WNA16: 2/3/4/8 bits; zero points only at 4/8 bits in vLLM 0.26: serving.py). The
   config is written by the compressed-tensors library; the tensors (its `compression_param_names`)
   come from our codes directly, packed in the format's dense layout (`_dense_packed`: the pinned
   0.17 library pads 3-bit codes).
   Signed convention: q_ct = q - 2^(b-1), zero_ct = zero - 2^(b-1), w = (q_ct - zero_ct) * scale.
4. GPTQ v1 export: `qweight`/`qzeros`/`scales`/`g_idx` with `quantization_config` in config.json.
   Codes are packed as a little-endian bit stream into int32 words (qweight along the input
   dimension, qzeros along the output dimension); zeros are stored minus one; scales are float16.
   vLLM serves it only for symmetric 4/8-bit weights (`serving.GPTQ_SERVED`), so recipes refuse it otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import SpecError, UserError
from .fake_quant import FakeQuantLinear, QuantizedWeight, _set_module, fake_quant_modules, swap_out_fake_quant
from .ptq import SEQUENTIAL_GROUPS
from .quantizer import is_contiguous_groups
from .runtime import install_quant_spec, read_quant_spec, write_quant_spec
from .scheme import QuantScheme

QUANT_META = "quant_meta.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = "rqat-fakequant-v1"
_PARTS = ("codes", "scale", "zero", "g_idx")


def is_quantized_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds an rqat quantized checkpoint (quant_meta.json)."""
    return (Path(path) / QUANT_META).is_file()


def _dedup_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied embeddings); safetensors refuses them."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    return out


def _for_inference(model: nn.Module) -> None:
    """A saved checkpoint is for generation: transformers' Trainer switches the KV cache off in the
    config (TrainingArguments.use_cache defaults to False), and a config saved that way makes every
    later `generate` recompute the whole prefix at every token (the GPU organism's RL variants never
    finished their eval). Every writer here saves the config with the cache on."""
    model.config.use_cache = True
    if getattr(model, "generation_config", None) is not None:  # derived from the config when the model was built
        model.generation_config.use_cache = True


def save_quantized_checkpoint(model: nn.Module, out_dir: str | Path, tokenizer=None, extra_meta: dict | None = None):
    """Write a fake-quant model (FakeQuantLinear modules) in the rqat format."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fq = fake_quant_modules(model)
    if not fq:
        raise ValueError("save_quantized_checkpoint: the model has no FakeQuantLinear module")
    skip = tuple(f"{n}.{p}" for n in fq for p in FakeQuantLinear.STATE)
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    modules = {}
    for name, m in fq.items():
        qw = m.export()
        for part in _PARTS:
            state[f"{name}.{part}"] = getattr(qw, part)
        modules[name] = qw.scheme.to_dict()
    save_file(_dedup_shared(state), str(out_dir / WEIGHTS), metadata={"format": FORMAT_VERSION})
    _for_inference(model)
    model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    meta = {"format": FORMAT_VERSION, "modules": modules, **(extra_meta or {})}
    (out_dir / QUANT_META).write_text(json.dumps(meta, indent=1))
    write_quant_spec(model, out_dir)


def read_quantized_weights(path: str | Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict]:
    """(QuantizedWeight per module, the other tensors, the metadata) of an rqat checkpoint. Raises UserError
    on another format version."""
    path = Path(path)
    meta = json.loads((path / QUANT_META).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: unknown quantized checkpoint format {meta.get('format')!r}")
    state = load_file(str(path / WEIGHTS))
    qws = {}
    for name, scheme in meta["modules"].items():
        parts = {p: state.pop(f"{name}.{p}") for p in _PARTS}
        qws[name] = QuantizedWeight(scheme=QuantScheme(**scheme), **parts)
    return qws, state, meta


def load_quantized_checkpoint(path: str | Path, dtype=torch.float32, device="cpu", trust_remote_code: bool = False,
                              attn_implementation: str | None = None):
    """Load an rqat checkpoint as a fake-quant transformers model (forward = the quantized function).
    attn_implementation: transformers' attention kernel (None: its default)."""
    qws, rest, _ = read_quantized_weights(path)
    return _model_from_checkpoint(Path(path), qws, rest, dtype, device, trust_remote_code, fake_quant=True,
                                  attn_implementation=attn_implementation)


def _model_from_checkpoint(path: Path, qws: dict[str, QuantizedWeight], rest: dict[str, torch.Tensor], dtype, device,
                           trust_remote_code: bool, fake_quant: bool, attn_implementation: str | None = None) -> nn.Module:
    """The checkpoint's architecture holding its weights: each quantized Linear a FakeQuantLinear of its codes
    (`fake_quant`), or a plain Linear of the dequantized weight (what the export writes from); its QuantSpec
    installed. Raises UserError where the checkpoint does not match the architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device(device), _no_init_weights():  # every weight is loaded below: random init is wasted time
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 attn_implementation=attn_implementation)
    state = dict(rest)
    for name, qw in qws.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise UserError(f"{path}: {name} is not a Linear layer in this architecture")
        if fake_quant:
            _set_module(model, name, FakeQuantLinear(linear, qw.to(device)))
        else:
            state[f"{name}.weight"] = qw.dequantize().to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    quant_keys = {f"{n}.{p}" for n in qws for p in FakeQuantLinear.STATE} if fake_quant else set()
    missing = [k for k in missing if k not in quant_keys and not _is_tied(model, k)]
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    install_quant_spec(model, read_quant_spec(path))  # rotations, activation and KV quantizers (W4A4KV4)
    return model


def _no_init_weights():
    """transformers' own switch that skips weight initialisation (5.x: transformers.initialization; 4.x:
    modeling_utils); a no-op where neither exists."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _is_tied(model, key: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.startswith("lm_head.")


def export_formats(model: nn.Module, outs: dict[str, str | Path], tokenizer=None, dtype=torch.bfloat16,
                   act_order: bool = False) -> dict[str, QuantizedWeight]:
    """Every format in `outs` ({"dequantized" | "compressed-tensors" | "gptq": directory}) from one fake-quant
    model, its fake-quant layers swapped out once (the model is consumed); returns the quantized weights.
    Raises ValueError for an unknown format, SpecError for a scheme a format cannot hold."""
    _check_formats(outs)
    qws = swap_out_fake_quant(model)
    _write_formats(model, qws, outs, tokenizer, dtype, act_order)
    return qws


def export_checkpoint(path: str | Path, outs: dict[str, str | Path], tokenizer=None, dtype=torch.bfloat16,
                      act_order: bool = False, trust_remote_code: bool = False) -> dict[str, QuantizedWeight]:
    """Every format in `outs` straight from the rqat checkpoint at `path` (what the export stage calls): the
    stored integer codes are packed as they are and dequantized once into a plain model, where loading the
    checkpoint as a fake-quant model (`load_quantized_checkpoint`) and swapping it out would recompute every
    code from its latent weight and dequantize twice. The files equal `export_formats(load_quantized_checkpoint
    (path), ...)`'s (tests/quant/test_formats.py). Returns the quantized weights; raises as export_formats and,
    for a checkpoint that does not match its config's architecture, UserError."""
    _check_formats(outs)
    qws, rest, _ = read_quantized_weights(path)
    # GPTQ stores the unquantized tensors in float16: cast from the float32 model, as export_formats does
    model = _model_from_checkpoint(Path(path), qws, rest, torch.float32 if "gptq" in outs else dtype, "cpu",
                                   trust_remote_code, fake_quant=False)
    _write_formats(model, qws, outs, tokenizer, dtype, act_order)
    return qws


def _check_formats(outs) -> None:
    unknown = set(outs) - {"dequantized", "compressed-tensors", "gptq"}
    if unknown:
        raise ValueError(f"export_formats: unknown format(s) {sorted(unknown)}")


# Linears that read one input (GPTQ's sequential groups of more than one), which engines fuse into one layer
# (vLLM's qkv_proj / gate_up_proj) holding a single column -> group map
FUSED_SIBLINGS = tuple(group for group in SEQUENTIAL_GROUPS if len(group) > 1)


def check_fused_g_idx(qws: dict[str, QuantizedWeight]) -> None:
    """Raise UserError where Linears an engine fuses (FUSED_SIBLINGS under one parent) have act-order groups that
    differ: vLLM loads the fused layer's `g_idx` once for all of them, so it would serve another function
    (measured on vLLM 0.26: log-probabilities off by 3-5 nats). GPTQ's act-order gives them one order: they share
    the input, so their Hessians are equal."""
    for name, qw in qws.items():
        parent, _, leaf = name.rpartition(".")
        for group in FUSED_SIBLINGS:
            if leaf != group[0]:
                continue
            for other in (f"{parent}.{x}" for x in group[1:]):
                if other in qws and not torch.equal(qws[other].g_idx.cpu(), qw.g_idx.cpu()):
                    raise UserError(f"export: {name} and {other} read the same input but have different act-order "
                                    f"groups (g_idx); engines fuse them into one layer with one g_idx and would compute "
                                    f"another function. Quantize them with one column order (GPTQ's act_order does) "
                                    f"or export dequantized only")


def _write_formats(model: nn.Module, qws: dict[str, QuantizedWeight], outs: dict[str, str | Path], tokenizer,
                   dtype, act_order: bool) -> None:
    """Write `outs` from a plain model (no fake-quant layers) whose quantized Linears `qws` names. Raises
    UserError for packed formats whose fused layers disagree on their act-order groups (check_fused_g_idx)."""
    if {"gptq", "compressed-tensors"} & set(outs):
        check_fused_g_idx(qws)
    if "gptq" in outs:
        quantized = {f"{n}.weight" for n in qws}
        _write_gptq(model, {k: v for k, v in model.state_dict().items() if k not in quantized}, qws, outs["gptq"],
                    tokenizer, act_order)
    model.to(dtype)
    if "dequantized" in outs:
        _write_dequantized(model, outs["dequantized"], tokenizer)
    if "compressed-tensors" in outs:
        _write_compressed_tensors(model, qws, outs["compressed-tensors"], tokenizer, dtype)


def export_dequantized(model: nn.Module, out_dir: str | Path, tokenizer=None, dtype=torch.bfloat16):
    """Plain transformers checkpoint with the dequantized weights; returns the quantized weights."""
    return export_formats(model, {"dequantized": out_dir}, tokenizer, dtype)


def _write_dequantized(model: nn.Module, out_dir: str | Path, tokenizer=None) -> None:
    _for_inference(model)
    model.save_pretrained(out_dir)
    write_quant_spec(model, out_dir)  # what it computes beyond these weights (W4A4KV4), for every loader
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ---- compressed-tensors pack-quantized ------------------------------------------------------------


def _ct_args(scheme: QuantScheme, act_order: bool):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
        strategy="channel" if scheme.group_size == -1 else "group",
        group_size=None if scheme.group_size == -1 else scheme.group_size,
        actorder="group" if act_order else None,
    )


def export_compressed_tensors(model: nn.Module, out_dir: str | Path, tokenizer=None, dtype=torch.bfloat16) -> None:
    """compressed-tensors `pack-quantized` checkpoint from a fake-quant model (the model is consumed:
    its fake-quant layers are swapped out). Scales are stored in `dtype`, as llm-compressor does."""
    export_formats(model, {"compressed-tensors": out_dir}, tokenizer, dtype)


def _write_compressed_tensors(model: nn.Module, qws: dict[str, QuantizedWeight], out_dir: str | Path, tokenizer,
                              dtype) -> None:
    """The pack-quantized checkpoint of a model whose fake-quant layers were swapped out into `qws`."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict())
    groups: dict[tuple, list[str]] = {}
    for name, qw in qws.items():
        act_order = not is_contiguous_groups(qw.g_idx, qw.scale.shape[1])
        groups.setdefault((qw.scheme, act_order), []).append(name)
    config_groups = {}
    for i, ((scheme, act_order), names) in enumerate(groups.items()):
        # One scheme for every layer: target the class (what llm-compressor writes); mixed precision:
        # exact module names, which vLLM also matches inside its fused qkv / gate_up layers.
        targets = ["Linear"] if len(groups) == 1 else [f"re:^{n.replace('.', '[.]')}$" for n in names]
        ct_scheme = QuantizationScheme(targets=targets, weights=_ct_args(scheme, act_order), format="pack-quantized")
        config_groups[f"group_{i}"] = ct_scheme
        for name in names:
            qw = qws[name]
            state.pop(f"{name}.weight")
            # The tensors the library's `PackedQuantizationCompressor.compress` writes (its parameter names,
            # `compression_param_names`), from our integer codes directly: the library would dequantize
            # and re-quantize every weight to get the same codes, then pack 3-bit codes its own way.
            packed = {"weight_scale": qw.scale.to(dtype), "weight_shape": torch.tensor(qw.codes.shape),
                      **_dense_packed(qw)}
            if act_order:
                packed["weight_g_idx"] = qw.g_idx.to(torch.int32)
            assert set(packed) == set(PackedQuantizationCompressor.compression_param_names(ct_scheme)), packed.keys()
            state.update({f"{name}.{k}": v for k, v in packed.items()})
    quantized = set(qws)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    save_file(_dedup_shared(state), str(out_dir / WEIGHTS), metadata={"format": "pt"})
    _for_inference(model)
    if not getattr(model.config, "architectures", None):  # save_pretrained sets it; config.save_pretrained does not,
        model.config.architectures = [type(model).__name__]  # and vLLM then resolves a pooling model, not generation
    model.config.dtype = dtype  # the dtype of the unquantized tensors and scales (save_pretrained would set it too)
    model.config.save_pretrained(out_dir)
    qcfg = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed",
                              ignore=ignore)
    ModelCompressor(quantization_config=qcfg).update_config(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _dense_packed(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The format's dense layout, written here rather than by the pinned compressed-tensors 0.17.

    compressed-tensors 0.17 packs `32 // bits` codes per int32 word: the same stream as the dense
    layout at 2, 4 and 8 bits, but at 3 bits ten codes per word with 2 bits unused. The format moved
    to the dense stream (compressed-tensors 0.18's `pack_to_int32`: ceil(n * bits / 32) words), and
    vLLM allocates that size (`CompressedTensorsWNA16.create_weights`: ceil(in * bits / 32) packed
    columns, packed zero points ceil(out * bits / 32) rows), so a 0.17-packed 3-bit checkpoint fails
    to load there. Codes are stored unsigned (q_ct + 2^(b-1) = our q), as the library stores them.

    Returns weight_packed int32 [out, ceil(in*b/32)] and, for asymmetric schemes, weight_zero_point
    int32 [ceil(out*b/32), groups] (packed along the output dimension, as the library packs it)."""
    bits = qw.scheme.bits
    out = {"weight_packed": pack_bits(qw.codes, bits, pad=True)}
    if not qw.scheme.symmetric:
        zero = qw.zero.round().to(torch.int64)
        out["weight_zero_point"] = pack_bits(zero.t(), bits, pad=True).t().contiguous()
    return out


# ---- GPTQ v1 packing ---------------------------------------------------------------------------


def pack_bits(values: torch.Tensor, bits: int, pad: bool = False) -> torch.Tensor:
    """Pack unsigned integers along the last axis into int32 words as a little-endian bit stream:
    value j occupies bits [j*bits, (j+1)*bits) of the stream, split across two words where it
    crosses a word boundary (3 bits: 32 values in 3 words, value 10 split 2/1 bits). This is
    AutoGPTQ's layout and compressed-tensors' dense `pack-quantized` layout (>= 0.18).

    values: integer tensor [..., n] in [0, 2^bits). Returns int32 [..., ceil(n * bits / 32)].
    pad: pad with zeros to whole words (compressed-tensors); without it, raises ValueError when
    n * bits is not a multiple of 32 (GPTQ v1 needs whole words)."""
    n = values.shape[-1]
    if (n * bits) % 32 and not pad:
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole 32-bit words")
    per_period = 32 // math.gcd(32, bits)  # values per run of whole words (3 bits: 32 values, 3 words)
    words_per_period = per_period * bits // 32
    if n % per_period:
        values = torch.nn.functional.pad(values, (0, per_period - n % per_period))
        packed = pack_bits(values, bits)
        return packed[..., : math.ceil(n * bits / 32)].contiguous()
    v = values.to(torch.int64).reshape(*values.shape[:-1], n // per_period, per_period)
    words = torch.zeros(*v.shape[:-1], words_per_period, dtype=torch.int64, device=values.device)
    for j in range(per_period):
        pos = j * bits
        w, off = divmod(pos, 32)
        words[..., w] |= (v[..., j] << off) & 0xFFFFFFFF
        if off + bits > 32:
            words[..., w + 1] |= v[..., j] >> (32 - off)
    words = words.reshape(*values.shape[:-1], -1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """qweight [in*b/32, out], qzeros [groups, out*b/32], scales [groups, out] fp16, g_idx [in]."""
    bits = qw.scheme.bits
    if bool((qw.zero < 1).any()):  # GPTQ v1 stores zero - 1 as an unsigned b-bit code
        raise SpecError("formats", "gptq cannot store a zero point of 0 (it writes zero - 1); GPTQ v1 is for "
                        "symmetric schemes (symmetric: true)")
    return {
        "qweight": pack_bits(qw.codes, bits).t().contiguous(),  # packed along the input dimension
        "qzeros": pack_bits((qw.zero.t().round().to(torch.int64) - 1).contiguous(), bits),
        "scales": qw.scale.t().contiguous().half(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def gptq_config(schemes: dict[str, QuantScheme], act_order: bool = False) -> dict:
    """The `quantization_config` of a GPTQ v1 export (what transformers and vLLM read): bits, group size,
    desc_act, sym."""
    first = next(iter(schemes.values()))
    if any((s.bits, s.group_size, s.symmetric) != (first.bits, first.group_size, first.symmetric) for s in schemes.values()):
        # GPTQ's config has one global scheme plus per-module "dynamic" overrides (GPTQModel's key).
        dynamic = {
            f"+:^{name.replace('.', '[.]')}$": {"bits": s.bits, "group_size": s.group_size}
            for name, s in schemes.items()
            if (s.bits, s.group_size) != (first.bits, first.group_size)
        }
    else:
        dynamic = None
    cfg = {
        "quant_method": "gptq",
        "bits": first.bits,
        "group_size": first.group_size,
        "desc_act": act_order,
        "sym": first.symmetric,
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "lm_head": False,
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


def export_gptq(model: nn.Module, out_dir: str | Path, tokenizer=None, act_order: bool = False,
                dtype=torch.float16) -> None:
    """GPTQ v1 checkpoint from a fake-quant model (the model is left unchanged). Raises SpecError where a
    layer's width does not pack into whole 32-bit words or a zero point is 0."""
    fq = fake_quant_modules(model)
    skip = tuple(f"{n}.{p}" for n in fq for p in FakeQuantLinear.STATE)
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    _write_gptq(model, state, {name: m.export() for name, m in fq.items()}, out_dir, tokenizer, act_order, dtype)


def _write_gptq(model: nn.Module, state: dict[str, torch.Tensor], qws: dict[str, QuantizedWeight], out_dir,
                tokenizer, act_order: bool, dtype=torch.float16) -> None:
    """The GPTQ v1 files: `state` (the model's tensors but the quantized weights) in `dtype` plus each of `qws` packed."""
    for name, qw in qws.items():
        out_f, in_f = qw.codes.shape
        for what, width in (("input", in_f), ("output", out_f)):
            if (width * qw.scheme.bits) % 32:
                raise SpecError("formats", f"gptq packs {qw.scheme.bits}-bit codes into 32-bit words, but {name} has "
                                 f"{what} width {width}; drop gptq from export.formats (the dequantized export works)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    for name, qw in qws.items():
        for k, v in gptq_tensors(qw).items():
            state[f"{name}.{k}"] = v
    save_file(_dedup_shared(state), str(out_dir / WEIGHTS), metadata={"format": "pt"})
    qcfg = gptq_config({name: qw.scheme for name, qw in qws.items()}, act_order)
    _for_inference(model)
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def directory_size(path: str | Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
