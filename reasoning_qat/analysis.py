"""Quantization diagnostics (`rqat analyze`): which layers hurt, and why.

For one quantization of a model (RTN on the fly, or a ptq checkpoint) on calibration tokens:
- weight statistics per Linear: kurtosis and max/median of |w| (the outlier metrics);
- reconstruction error per Linear on its full-precision calibration inputs, ||(W - Q)X||^2 / ||WX||^2;
- error through depth per decoder block: the quantized network's hidden-state error (`network`)
  next to the error the block adds alone when fed the full-precision input (`local`);
- per-layer KL: KL(teacher || model with only that Linear quantized) over the calibration tokens,
  the end-to-end damage each layer does, which ranks the layers for mixed precision;
- how well each cheap statistic predicts that damage (Spearman rank correlation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .quant.fake_quant import layer_input
from .quant.gptq import HessianAccumulator, weighted_error
from .quant.ptq import capture_layer_inputs, decoder_layers, layer_out, linears_by_layer

PROXIES = ("kurtosis", "max_median", "recon_error")


def weight_stats(w: torch.Tensor) -> tuple[float, float]:
    """(kurtosis, max|w| / median|w|) of a weight matrix."""
    w = w.detach().float().flatten()
    c = w - w.mean()
    var = (c**2).mean().clamp_min(1e-30)
    a = w.abs()
    return float((c**4).mean() / var**2), float(a.max() / a.median().clamp_min(1e-30))


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (scipy.stats.spearmanr: average ranks for ties); nan when either side is constant."""
    import warnings

    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(x, y).statistic)


class _Swapped:
    """Temporarily give some Linear layers their quantized weights."""

    def __init__(self, model: nn.Module, weights: dict[str, torch.Tensor]):
        self.model, self.weights, self.saved = model, weights, {}

    def __enter__(self):
        for n, w in self.weights.items():
            lin = self.model.get_submodule(n)
            self.saved[n] = lin.weight.data
            lin.weight.data = w.to(lin.weight.device, lin.weight.dtype)

    def __exit__(self, *exc):
        for n, w in self.saved.items():
            self.model.get_submodule(n).weight.data = w


def _rel(a: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float(((x.float() - r.float()) ** 2).sum()) for x, r in zip(a, ref))
    den = sum(float((r.float() ** 2).sum()) for r in ref)
    return num / max(den, 1e-30)


@torch.no_grad()
def error_through_depth(model: nn.Module, qweights: dict[str, torch.Tensor], calib: torch.Tensor, device, batch_size: int = 8,
                        progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Per-Linear reconstruction errors and per-block local/network hidden-state errors, in one
    pass over the blocks that carries a full-precision and a quantized stream side by side."""
    layers = decoder_layers(model)
    fp = capture_layer_inputs(model, layers, calib, device, batch_size)
    q = [(h.clone(), kw) for h, kw in fp]
    recon, blocks = {}, []
    members = linears_by_layer(model, layers, qweights)
    for i, (layer, names) in enumerate(tqdm(zip(layers, members), total=len(layers), desc="error through depth",
                                            disable=not progress, leave=False)):
        accs = {n: HessianAccumulator(model.get_submodule(n).in_features, device) for n in names}
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, acc=accs[n]: acc.add(layer_input(m, a[0])))
                 for n in names]
        y_fp = [layer_out(layer(h, **kw)) for h, kw in fp]
        for h in hooks:
            h.remove()
        for n in names:
            recon[n] = weighted_error(model.get_submodule(n).weight.data, qweights[n].to(device), accs[n].H)
        del accs
        with _Swapped(model, {n: qweights[n] for n in names}):
            local = _rel([layer_out(layer(h, **kw)) for h, kw in fp], y_fp)
            y_q = [layer_out(layer(h, **kw)) for h, kw in q]
        blocks.append({"block": i, "local_error": local, "network_error": _rel(y_q, y_fp)})
        fp = [(y, kw) for y, (_, kw) in zip(y_fp, fp)]
        q = [(y, kw) for y, (_, kw) in zip(y_q, q)]
    return recon, blocks


def _kl(t_logp: torch.Tensor, s_logits: torch.Tensor) -> float:
    """Mean per-token KL(teacher || student) in nats."""
    s_logp = F.log_softmax(s_logits.float(), dim=-1)
    return float((t_logp.exp() * (t_logp - s_logp)).sum(-1).mean())


@torch.no_grad()
def layer_kl(model: nn.Module, qweights: dict[str, torch.Tensor], calib: torch.Tensor, device, batch_size: int = 4,
             progress: bool = True) -> tuple[dict[str, float], float]:
    """KL to the unquantized model with one Linear at a time quantized, and with all of them."""
    names = list(qweights)
    kl = dict.fromkeys(names, 0.0)
    total, batches = 0.0, 0
    steps = math.ceil(len(calib) / batch_size) * (len(names) + 1)
    with tqdm(total=steps, desc="per-layer KL", disable=not progress, leave=False) as bar:
        for i in range(0, len(calib), batch_size):
            ids = calib[i : i + batch_size].to(device)
            t_logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            for n in names:
                with _Swapped(model, {n: qweights[n]}):
                    kl[n] += _kl(t_logp, model(input_ids=ids, use_cache=False).logits)
                bar.update()
            with _Swapped(model, qweights):
                total += _kl(t_logp, model(input_ids=ids, use_cache=False).logits)
            bar.update()
            batches += 1
    return {n: v / batches for n, v in kl.items()}, total / batches


def analyze(model: nn.Module, qweights: dict[str, torch.Tensor], calib: torch.Tensor, kl_calib: torch.Tensor | None = None,
            device: str = "cpu", batch_size: int = 8, promote: int | None = None, promote_bits: int = 4,
            progress: bool = True) -> dict:
    """The full report as a dict (see the module docstring); `qweights` maps Linear names to their
    dequantized quantized weights."""
    model.eval()
    stats = {n: weight_stats(model.get_submodule(n).weight) for n in qweights}
    recon, blocks = error_through_depth(model, qweights, calib, device, batch_size, progress)
    kl, full_kl = layer_kl(model, qweights, calib if kl_calib is None else kl_calib, device, max(1, batch_size // 2), progress)
    members = linears_by_layer(model, decoder_layers(model), qweights)
    block_of = {n: i for i, names in enumerate(members) for n in names}
    layers = [{"name": n, "block": block_of.get(n), "kurtosis": stats[n][0], "max_median": stats[n][1],
               "recon_error": recon.get(n), "kl": kl[n]} for n in qweights]
    ranking = sorted(qweights, key=lambda n: -kl[n])
    k = promote if promote is not None else max(1, round(0.1 * len(ranking)))
    predictors = {p: spearman([row[p] for row in layers], [row["kl"] for row in layers]) for p in PROXIES}
    return {
        "layers": layers,
        "blocks": blocks,
        "full_model_kl": full_kl,
        "sum_layer_kl": sum(kl.values()),
        "ranking": ranking,
        "predictors_spearman_vs_kl": predictors,
        "overrides": [{"pattern": n, "bits": promote_bits} for n in ranking[:k]],
        "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                        "kl_samples": int((calib if kl_calib is None else kl_calib).shape[0])},
    }


def write_report(report: dict, out_dir: str | Path, plot: bool = True) -> Path:
    """analysis.json, overrides.yaml (paste under `quant:`) and analysis.png into out_dir."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "analysis.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "analysis.json")
    (out / "overrides.yaml").write_text(
        "# the most damaging layers by per-layer KL, promoted; paste under `quant:` in a recipe\n"
        + yaml.safe_dump({"overrides": report["overrides"]}, sort_keys=False))
    if plot:
        _plot(report, out / "analysis.png")
    return out


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, blocks = report["layers"], report["blocks"]
    fig, ax = plt.subplots(2, 2, figsize=(13, 8))
    kls = [row["kl"] for row in layers]
    ax[0, 0].bar(range(len(layers)), kls, color="tab:red")
    ax[0, 0].set(title="KL to the teacher, one layer quantized", xlabel="Linear layer (model order)", ylabel="KL (nats/token)",
                 yscale="log" if min(kls) > 0 else "linear")
    b = [x["block"] for x in blocks]
    ax[0, 1].plot(b, [x["network_error"] for x in blocks], "o-", label="quantized network (propagated)")
    ax[0, 1].plot(b, [x["local_error"] for x in blocks], "s--", label="block alone, full-precision input")
    ax[0, 1].set(title="hidden-state error through depth", xlabel="decoder block", ylabel="relative MSE", yscale="log")
    ax[0, 1].legend()
    rho = report["predictors_spearman_vs_kl"]
    for a, key, label in ((ax[1, 0], "kurtosis", "weight kurtosis"), (ax[1, 1], "recon_error", "reconstruction error")):
        a.scatter([row[key] for row in layers], kls, s=14)
        a.set(xscale="log" if key == "recon_error" else "linear", yscale="log" if min(kls) > 0 else "linear", xlabel=label, ylabel="per-layer KL",
              title=f"{label} vs damage: Spearman {rho[key]:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze_target(target: str, *, bits: int | None = None, group_size: int | None = None, method: str = "auto",
                   samples: int | None = None, kl_samples: int = 16, seq_len: int = 512, calib_source: str | None = None,
                   promote: int | None = None, promote_bits: int | None = None, out: str | None = None,
                   batch_size: int = 8, trust_remote_code: bool = False, plot: bool = True) -> tuple[dict, Path]:
    """`rqat analyze`: a run directory (its teacher, calibration set, quant scheme and ptq results)
    or a model directory / hub id (calibration from calib_source, scheme from the arguments)."""
    from safetensors.torch import load_file

    from .data.calibration import domain_calibration, generic_calibration, tokenized_rows
    from .data.qat_data import load_rows
    from .data.reasoning import select_fields
    from .models import best_device, load_model, load_tokenizer
    from .pipeline import recipe_from_run
    from .quant import QuantizedWeight, QuantScheme, QuantTargets
    from .quant.formats import read_quantized_weights
    from .recipe import RecipeError
    from .run_layout import ModelSource, RunLayout, Variant

    device = best_device()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    run = Path(target)
    if RunLayout(run).recipe_file.is_file():
        r = recipe_from_run(run)
        bits = bits or r.quant.bits[0]
        if bits not in r.quant.bits:
            raise RecipeError(f"--bits: {bits} is not one of the run's quant.bits {r.quant.bits}")
        from .stages.specs import quant_spec

        if group_size is not None:
            r = r.model_copy(update={"quant": r.quant.model_copy(update={"group_size": group_size})})
        targets = quant_spec(r, bits).weights
        layout = RunLayout(run)
        if not layout.calibration_file().is_file():
            raise RecipeError(f"{run}: the calibrate stage has not finished; run `rqat run <recipe> --stages calibrate`")
        ptq_dir = layout.ptq(Variant(bits, r.ptq.method))
        if method == "auto":
            method = "ptq" if ptq_dir.is_dir() and group_size is None else "rtn"
        if method == "ptq" and not ptq_dir.is_dir():
            raise RecipeError(f"--method ptq: {ptq_dir} does not exist; run the ptq stage or use --method rtn")
        calib = load_file(str(layout.calibration_file()))["main"]
        model = ModelSource.teacher(layout, r.model).model(dtype, device)
        out_dir = Path(out) if out else layout.analysis(Variant(bits, r.ptq.method if method == "ptq" else "rtn"))
        label = {"model": r.model.id or "demo", "run": str(run)}
    else:
        from .errors import UserError
        from .models import resolve_model

        try:  # a model directory or a hub id, or one line
            resolve_model(target, "model", trust_remote_code)
        except UserError as err:
            raise RecipeError(f"analyze: {target!r} is neither a run directory (no recipe.yaml) nor a usable model: {err}") from None
        if method == "ptq":
            raise RecipeError("--method ptq needs a run directory; for a model use --method rtn")
        method = "rtn"
        bits = bits or 4
        targets = QuantTargets(QuantScheme(bits, 128 if group_size is None else group_size))
        tok = load_tokenizer(target, trust_remote_code)
        n = samples or 32
        if calib_source and calib_source.endswith(".jsonl"):
            rows = select_fields(load_rows(calib_source), "prompt", "response")
            calib = domain_calibration(tokenized_rows(tok, rows), n, seq_len)
        else:
            calib = generic_calibration(tok, calib_source or "builtin", n, seq_len)
        model = load_model(target, dtype, trust_remote_code, device=device)
        out_dir = Path(out) if out else Path("analysis") / run.name / str(Variant(bits, "rtn"))
        label = {"model": target}
    calib = calib[:samples] if samples else calib
    plan = targets.resolve(model)
    if method == "ptq":
        qws, _, _ = read_quantized_weights(ptq_dir)
        weights = {n: qws[n].dequantize() for n in plan}
    else:
        weights = {n: QuantizedWeight.rtn(model.get_submodule(n).weight.data.float(), s).dequantize() for n, s in plan.items()}
    promote_bits = promote_bits or {2: 4, 3: 4, 4: 8, 8: 8}[bits]
    report = analyze(model, weights, calib, calib[:kl_samples], device, batch_size, promote, promote_bits)
    report = {**label, "bits": bits, "method": method, "scheme": targets.default.to_dict(), **report}
    return report, write_report(report, out_dir, plot)
