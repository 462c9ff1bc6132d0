"""What each engine version serves, as measured; imports nothing heavy (the recipe checks use it).

vLLM's compressed-tensors path (`CompressedTensorsWNA16`) on a GPU, vLLM 0.26 (torch 2.11 + CUDA 13.0,
measured on an H200 with the project's exports (research/README.md, "Serving"):
- symmetric 4/8 bits: Machete; symmetric 2/3 bits: Humming (JIT on first load);
- zero points (asymmetric) only at 4/8 bits: 2/3 bits are refused at load
  (`ValueError: Asymmetric quantization not supported for num_bits = 3. Supported: [4, 8]`);
- act-order (`actorder: group`, `weight_g_idx`) only at 4/8 bits (Machete): at 2/3 bits no kernel takes it
  (`Failed to find a kernel that can implement the WNA16 linear layer`: `Quant type (uint3b4) not supported by
  Machete`, `Humming does not support act-order (g_idx)`). vLLM fuses q/k/v and gate/up into one
  layer holding one g_idx, so the fused layers must share it (GPTQ gives layers that read one input one order;
  the export refuses others: quant/formats.py).
vLLM 0.32/0.33's scheme code accepts zero points at 2-8 bits (Humming takes `has_zero_point`), but
those releases need torch 2.13/2.14 and were not run on a GPU here.
vLLM's `gptq` path: symmetric 4/8-bit only.
"""

from __future__ import annotations

VLLM_GPU_VERSION = "0.26"
VLLM_PACKED_BITS = (2, 3, 4, 8)          # compressed-tensors WNA16, symmetric
VLLM_ZERO_POINT_BITS = (4, 8)            # compressed-tensors WNA16 with zero points
VLLM_ACT_ORDER_BITS = (4, 8)             # compressed-tensors WNA16 with act-order (weight_g_idx)
GPTQ_SERVED = {"bits": (4, 8), "symmetric": True}


def vllm_refuses_packed(bits: int, symmetric: bool, act_order: bool = False) -> str | None:
    """Why vLLM (the GPU release above) cannot serve a compressed-tensors export of this scheme, or None.
    `act_order`: the export's groups are a permutation of the columns (GPTQ's act-order)."""
    if bits not in VLLM_PACKED_BITS:
        return f"vLLM {VLLM_GPU_VERSION} serves packed compressed-tensors weights at {list(VLLM_PACKED_BITS)} bits"
    if not symmetric and bits not in VLLM_ZERO_POINT_BITS:
        return (f"vLLM {VLLM_GPU_VERSION} serves zero points (asymmetric) only at {list(VLLM_ZERO_POINT_BITS)} bits, "
                f"not {bits}; symmetric {bits}-bit is served (quant.symmetric: true)")
    if act_order and bits not in VLLM_ACT_ORDER_BITS:
        return (f"vLLM {VLLM_GPU_VERSION} has no {bits}-bit kernel for act-order groups (only {list(VLLM_ACT_ORDER_BITS)} "
                f"bits); {bits}-bit without act-order is served (ptq.act_order: false)")
    return None


def vllm_refuses_gptq(bits: set[int], symmetric: bool) -> str | None:
    """Why vLLM cannot serve a GPTQ v1 export of these bit widths, or None: its GPTQ kernels are symmetric
    4/8-bit only."""
    if symmetric is not GPTQ_SERVED["symmetric"] or not bits <= set(GPTQ_SERVED["bits"]):
        return (f"gptq is served by vLLM only for symmetric 4- or 8-bit weights (this recipe: bits {sorted(bits)}, "
                f"symmetric {symmetric})")
    return None


def vllm_refuses_variant(bits: int, override_bits: set[int], symmetric: bool, act_order: bool = False) -> str | None:
    """Why vLLM cannot serve one variant's compressed-tensors export packed (its own bit width, or a width
    some layers' overrides set), or None."""
    return next((why for b in sorted({bits} | override_bits)
                 if (why := vllm_refuses_packed(b, symmetric, act_order))), None)


def act_ordered_export(ct_dir) -> bool:
    """Whether a compressed-tensors checkpoint directory holds act-order groups (any config group with
    `actorder` set in its config.json); False where there is no such checkpoint."""
    import json
    from pathlib import Path

    cfg = Path(ct_dir) / "config.json"
    if not cfg.is_file():
        return False
    groups = json.loads(cfg.read_text()).get("quantization_config", {}).get("config_groups", {})
    return any((g.get("weights") or {}).get("actorder") for g in groups.values())
