"""Post-training quantization drivers: RTN, and sequential layer-by-layer GPTQ.

GPTQ runs one decoder layer at a time on the calibration activations (so only one layer's inputs
and Hessians are held), quantizes its Linear layers in execution order ("true sequential": q/k/v,
then o, then gate/up, then down), and feeds the quantized layer's outputs to the next layer. A model
that lives on the CPU stays there: what runs before the first layer (embeddings, rotary tables) moves to
the compute device, and each decoder layer visits it in turn (as GPTQModel and llm-compressor's sequential
pipeline do), so a model larger than the GPU quantizes on it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architecture import LinearShape
from ..errors import SpecError, UserError
from .fake_quant import QuantizedWeight, layer_input
from .gptq import HessianAccumulator, dead_inputs, gptq_quantize, participation_ratio, weighted_error
from .scheme import QuantScheme

SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def rtn_quantize_model(model: nn.Module, plan: dict[str, QuantScheme], device: str | None = None
                       ) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """Round-to-nearest of every planned Linear of `model`: (QuantizedWeight by name, relative weight error by
    name). `device`: where each weight is quantized (one at a time; the results come back to the weight's
    device); default: where it lives."""
    qws, errors = {}, {}
    for name, scheme in plan.items():
        home = model.get_submodule(name).weight.data
        w = home.to(device) if device else home
        qw = QuantizedWeight.rtn(w, scheme)
        errors[name] = float(((w.float() - qw.dequantize()) ** 2).sum() / (w.float() ** 2).sum().clamp_min(1e-12))
        qws[name] = qw.to(home.device)
    return qws, errors


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (model.model.layers for the dense families). Raises UserError when there is
    none."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UserError(f"ptq: cannot find the decoder layers of {type(model).__name__}")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, calib: torch.Tensor, device, batch_size: int):
    """Run the model up to layer 0 and keep each batch's hidden states and layer kwargs."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(calib), batch_size):
            try:
                model(input_ids=calib[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def linears_by_layer(model: nn.Module, layers: nn.ModuleList, names) -> list[list[str]]:
    """For each decoder layer, the given module names that live inside it (model order kept)."""
    prefix = {id(module): name for name, module in model.named_modules()}
    return [[n for n in names if n.startswith(prefix[id(layer)] + ".")] for layer in layers]


def linear_shapes_of(model: nn.Module) -> list[LinearShape]:
    """Every nn.Linear of a model (built on the meta device, say) as the shapes
    `architecture.linear_shapes` reads from config.json: name, widths, decoder layer index or None."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    by_layer = linears_by_layer(model, decoder_layers(model), linears)
    layer_of = {name: i for i, names in enumerate(by_layer) for name in names}
    return [LinearShape(name, m.in_features, m.out_features, layer_of.get(name), type(m).__name__)
            for name, m in linears.items()]


def outside_decoder_layers(plan, by_layer: list[list[str]]) -> list[str]:
    """The planned layers that no decoder layer holds (lm_head, say), sorted: GPTQ cannot quantize them."""
    return sorted(set(plan) - {n for names in by_layer for n in names})


def layer_out(out):
    """A decoder layer's output hidden states (transformers returns a tensor or a tuple, by version)."""
    return out[0] if isinstance(out, tuple) else out


def _sequential_groups(names: list[str], true_sequential: bool) -> list[list[str]]:
    if not true_sequential:
        return [names]
    groups, left = [], list(names)
    for suffixes in SEQUENTIAL_GROUPS:
        g = [n for n in left if n.rsplit(".", 1)[-1] in suffixes]
        if g:
            groups.append(g)
            left = [n for n in left if n not in g]
    return groups + ([left] if left else [])


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device) -> None:
    """Move every parameter and buffer of `model` that no decoder layer holds to `device` (embeddings, rotary
    tables, final norm), leaving the layers where they are. An untied output head stays too: GPTQ stops before
    it (2.3 GiB in float32 for Qwen3-8B's)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is not getattr(model.get_input_embeddings(), "weight", None):
        inside.add(id(head))
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, p in module.named_parameters(recurse=False):
            p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            module._buffers[name] = b.to(device)


def _states_home(states: list, device) -> torch.device:
    """Where the calibration activations between layers are kept: on the compute device, or on the CPU
    (moved in per batch) when they would take more than a quarter of its free memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    size = sum(h.numel() * h.element_size() for h, _ in states)
    free, _ = torch.cuda.mem_get_info(device)
    return device if size < free / 4 else torch.device("cpu")


@contextlib.contextmanager
def _tf32():
    """TF32 matmuls for the float32 layer forwards that collect Hessians (several times faster on
    GPUs; the inputs' rounding is far below the 2-8 bit grid). The GPTQ solve itself stays float32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    plan: dict[str, QuantScheme],
    calib: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    true_sequential: bool = True,
    device: str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    input_ranks: dict[str, float] | None = None,
    dead_columns: dict[str, int] | None = None,
) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """Quantize the planned Linear layers with GPTQ (Frantar et al. 2023) on `device`; the model's weights
    are replaced by the dequantized result as it goes (so later layers see quantized inputs). A model on
    another device (the CPU) stays there, each decoder layer moved to `device` for its turn; its codes then
    come back on the model's device too. Returns codes and the relative output error of each layer on its
    calibration inputs; `input_ranks`, when given, is filled with each layer's input participation ratio
    (effective number of input directions), and `dead_columns` with the number of its input columns the
    calibration never activated (they keep their RTN value). Raises UserError when a layer's calibration
    inputs hold inf or nan."""
    model.eval()
    layers = decoder_layers(model)
    by_layer = linears_by_layer(model, layers, plan)
    outside = outside_decoder_layers(plan, by_layer)
    if outside:  # before any calibration work: GPTQ runs decoder layer by layer
        raise SpecError("ignore", f"GPTQ quantizes the decoder layers only; {len(outside)} targeted layer(s) are outside "
                                  f"them, e.g. {outside[0]}; add them to ignore, or quantize them with RTN")
    home = next(model.parameters()).device
    offload = home.type != torch.device(device).type
    if offload:
        _move_outside_layers(model, layers, device)
    states = capture_layer_inputs(model, layers, calib, device, batch_size)
    keep = _states_home(states, device)
    states = [(h.to(keep), kw) for h, kw in states]
    qws, errors = {}, {}
    for layer, local in tqdm(zip(layers, by_layer), total=len(layers), desc="gptq layers",
                             disable=not progress, leave=False):
        if offload:
            layer.to(device)
        for group in _sequential_groups(local, true_sequential):
            accs = {n: HessianAccumulator(model.get_submodule(n).in_features, device) for n in group}
            # the Hessian of what the layer computes with: its input after its activation quantizer (W4A4)
            handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: accs[n].add(layer_input(m, a[0])))
                       for n in group]
            with _tf32():
                for hidden, kwargs in states:
                    layer(hidden.to(device), **kwargs)
            for h in handles:
                h.remove()
            for n in group:
                lin = model.get_submodule(n)
                if not bool(torch.isfinite(accs[n].H).all()):
                    raise UserError(f"ptq: the calibration inputs of {n} hold inf or nan (the model overflows on them in "
                                    f"{lin.weight.dtype}?); check the teacher in float32 and the calibration data")
                if dead_columns is not None:
                    dead_columns[n] = dead_inputs(accs[n].H)
                qw = gptq_quantize(lin.weight.data, accs[n].H, plan[n], block_size, damp, act_order)
                w_hat = qw.dequantize()
                errors[n] = weighted_error(lin.weight.data, w_hat, accs[n].H)
                if input_ranks is not None:
                    input_ranks[n] = participation_ratio(accs[n].H)
                lin.weight.data.copy_(w_hat.to(lin.weight.dtype))
                qws[n] = qw.to(home) if offload else qw
                del accs[n]
        with _tf32():
            states = [(layer_out(layer(hidden.to(device), **kwargs)).to(keep), kwargs) for hidden, kwargs in states]
        if offload:
            layer.to(home)
    if offload:
        _move_outside_layers(model, layers, home)
    return qws, errors
