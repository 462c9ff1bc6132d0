"""What a model's config says about its shapes, read without torch or transformers.

The recipe's preflight checks every quantized layer's width against the scheme, the KV-cache group
against head_dim and every rotated width against the Hadamard sizes before a run starts; for the
dense decoder families below those widths follow from config.json alone, so refusing a bad recipe
costs a JSON read instead of importing torch and transformers (~7 s). Other families (MoE, remote
code, GGUF files) are built on the meta device instead (`stages.preflight`).

The module names are transformers' (`modeling_qwen3.py`, `modeling_llama.py`, ...);
`tests/test_architecture.py` checks them against models transformers builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# model_type -> the families whose decoder layer is self_attn.{q,k,v,o}_proj + mlp.{gate,up,down}_proj
DENSE_DECODERS = ("qwen3", "qwen2", "llama", "mistral")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LinearShape:
    """One nn.Linear of a model: its module name, input and output width (features), and the index of the
    decoder layer holding it (None outside the decoder layers: lm_head, say)."""

    name: str
    in_features: int
    out_features: int | None
    layer: int | None
    type_name: str = "Linear"


def _get(config: Any, key: str, default=None):
    """A config field from a config.json dict or a transformers config object."""
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if value is None else value


def head_dim(config: Any) -> int:
    """Width of one attention head. Qwen3 sets it on its own (128 unless given; it need not be
    hidden_size / num_attention_heads); the other families derive it when it is absent or null."""
    if (given := _get(config, "head_dim")) is not None:
        return int(given)
    if _get(config, "model_type") == "qwen3":
        return 128
    return config_int(config, "hidden_size") // config_int(config, "num_attention_heads")


def config_int(config: Any, key: str) -> int:
    """An integer field of a config.json dict or a transformers config object; ValueError otherwise."""
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"model config: {key} is {value!r}, not an integer")  # noqa: TRY004 (a bad value, one error type)
    return value


def linear_shapes(config: Any) -> list[LinearShape] | None:
    """Every nn.Linear transformers builds for this config, in module order; None for a family not in
    DENSE_DECODERS (the caller builds the model on the meta device instead). Raises ValueError on a
    config missing a width."""
    if _get(config, "model_type") not in DENSE_DECODERS:
        return None
    hidden, inter = config_int(config, "hidden_size"), config_int(config, "intermediate_size")
    heads, kv_heads = config_int(config, "num_attention_heads"), _get(config, "num_key_value_heads")
    kv_heads = heads if kv_heads is None else kv_heads
    d = head_dim(config)
    widths = {"q_proj": (hidden, heads * d), "k_proj": (hidden, kv_heads * d), "v_proj": (hidden, kv_heads * d),
              "o_proj": (heads * d, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    shapes = []
    for i in range(config_int(config, "num_hidden_layers")):
        for block, names in (("self_attn", ATTENTION), ("mlp", MLP)):
            shapes += [LinearShape(f"model.layers.{i}.{block}.{n}", *widths[n], layer=i) for n in names]
    # the output head is an nn.Linear whether or not its weight is tied to the embedding
    return shapes + [LinearShape("lm_head", hidden, _get(config, "vocab_size"), layer=None)]
