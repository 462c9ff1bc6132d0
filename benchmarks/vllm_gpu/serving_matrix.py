"""Which packed exports vLLM serves on this GPU, and whether it computes the quantized function.

For each weight scheme (bits x symmetric x group size) the project's own code quantizes one random-init
model with Qwen3-0.6B's layer shapes (RTN: packing, not accuracy, is under test), writes the dequantized
and the compressed-tensors export, and vLLM loads each in its own process. Both engines score the same
token sequences (teacher-forced `prompt_logprobs`, float16: 8x finer rounding than bf16), so the comparison has no greedy divergence:
the packed kernel must give the log-probabilities of the same function served dequantized.

    python benchmarks/vllm_gpu/serving_matrix.py OUT_DIR [--schemes 3:sym:128,3:asym:128,3:sym:128:act ...] [--workers 6]

A scheme is bits:sym|asym:group_size, and `:act` for act-order: each Linear's columns are dealt to the groups by a
random permutation (the layout GPTQ's act-order leaves), so the export carries `weight_g_idx`.

Writes OUT_DIR/matrix.json and matrix.md: load ok / refused (the engine's own last error line), the
kernel vLLM chose, the largest |logprob difference| against the dequantized export, and load time.
Needs a GPU and vLLM (benchmarks/vllm_gpu/install.sh); tests/evaluation/test_vllm_gpu.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_SCHEMES = ("2:sym:128", "3:sym:128", "4:sym:128", "8:sym:128", "2:asym:128", "3:asym:128", "4:asym:128",
                   "8:asym:128", "3:sym:-1", "3:sym:64")
N_SEQ, SEQ_LEN = 8, 96


def build_exports(out: Path, schemes: list[str], layers: int = 2) -> dict[str, dict[str, str]]:
    """One random-init Qwen3 (hidden 1024, 16/8 heads of 128, intermediate 3072: Qwen3-0.6B's layers),
    quantized per scheme by RTN and exported both ways. Returns {scheme: {format: dir}}."""
    import copy

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from reasoning_qat.data.tokenizer import build_char_tokenizer
    from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant
    from reasoning_qat.quant.formats import export_compressed_tensors, export_dequantized

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    base = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: logits far from flat, differences visible
        for p in base.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.06)
    dirs = {}
    for s in schemes:
        bits, sym, gs, *act = s.split(":")
        model = copy.deepcopy(base)
        scheme = QuantScheme(int(bits), int(gs), sym == "sym")
        if act:
            act_ordered(model, scheme)
        else:
            swap_in_fake_quant(model, QuantTargets(scheme))
        d = out / "exports" / s.replace(":", "-")
        export_dequantized(copy.deepcopy(model), d / "dequantized", tokenizer=tok)
        export_compressed_tensors(model, d / "compressed-tensors", tokenizer=tok)
        dirs[s] = {"dequantized": str(d / "dequantized"), "compressed-tensors": str(d / "compressed-tensors")}
    return dirs


def act_ordered(model, scheme) -> None:
    """Swap every decoder Linear for a fake-quant one whose groups are a random permutation of its columns
    (g_idx [in] = (arange(in) // group_size)[perm], as act-order GPTQ writes it), RTN within each such group."""
    import torch

    from reasoning_qat.quant.fake_quant import FakeQuantLinear, QuantizedWeight, _set_module
    from reasoning_qat.quant.formats import FUSED_SIBLINGS
    from reasoning_qat.quant.quantizer import find_group_params, quantize_weight

    fused = {leaf for group in FUSED_SIBLINGS for leaf in group}
    gen = torch.Generator().manual_seed(scheme.bits)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    perms = {}  # one permutation per input: q/k/v (and gate/up) read the same activations, so act-order GPTQ
    for name, lin in linears:  # gives them one g_idx, and vLLM's fused qkv/gate_up layers hold one g_idx
        w = lin.weight.data.float()
        gs = scheme.effective_group_size(w.shape[1])
        parent, _, leaf = name.rpartition(".")
        reads = parent if leaf in fused else name
        perm = perms.setdefault(reads, torch.randperm(w.shape[1], generator=gen))
        g_idx = (torch.arange(w.shape[1]) // gs)[perm].to(torch.int32)
        order = torch.argsort(g_idx, stable=True)  # columns sorted by group: contiguous groups for the observer
        scale, zero = find_group_params(w[:, order], scheme)
        qw = QuantizedWeight(quantize_weight(w, scale, zero, g_idx, scheme.maxq), scale, zero, g_idx, scheme)
        _set_module(model, name, FakeQuantLinear(lin, qw))


def sequences(vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(SEQ_LEN)] for _ in range(N_SEQ)]


def one_engine(model_dir: str, out_json: str) -> None:
    """Child process: load one checkpoint in vLLM, score the sequences, write JSON (errors are results)."""
    res: dict = {"model": model_dir, "ok": False}
    t0 = time.time()
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        # A fixed KV cache size skips vLLM's memory profiling, which fails when engines in other processes
        # release GPU memory meanwhile ("Error in memory profiling", seen with 6 engines at once).
        kv = {"kv_cache_memory_bytes": 2**30} if _has_gpu() else {"gpu_memory_utilization": 0.06}
        llm = LLM(model=model_dir, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256, seed=0,
                  dtype="float16", **kv)
        res["load_s"] = round(time.time() - t0, 1)
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences(vocab)], sp, use_tqdm=False)
        res["logprobs"] = [[lp[t].logprob for t, lp in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])] for o in outs]
        res["ok"] = True
    except BaseException as err:  # noqa: BLE001 (the engine's refusal is the result)
        lines = [x for x in str(err).strip().splitlines() if x.strip()]
        res["error"] = f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]
    res["wall_s"] = round(time.time() - t0, 1)
    Path(out_json).write_text(json.dumps(res))


def _run_child(model_dir: str, out_json: Path, log: Path, timeout: int) -> dict:
    with open(log, "w") as f:
        try:
            subprocess.run([sys.executable, __file__, "--one", model_dir, str(out_json)], stdout=f, stderr=subprocess.STDOUT,
                           timeout=timeout, env={**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0"}, check=False)
        except subprocess.TimeoutExpired:
            return {"model": model_dir, "ok": False, "error": f"timeout after {timeout} s"}
    res = json.loads(out_json.read_text()) if out_json.is_file() else {"model": model_dir, "ok": False}
    text = log.read_text(errors="replace")
    if m := re.search(r"Using (\w+) for CompressedTensorsWNA16", text):
        res["kernel"] = m.group(1)
    if not res["ok"] and ("error" not in res or "Engine core initialization failed" in res["error"]):
        # the engine core died in another process: its root cause (and the kernels' reasons) is in the log
        lines = [re.sub(r"^\(.*?\) (ERROR|WARNING|INFO) .*?\] ", "", x) for x in text.splitlines()]
        at = next((i for i, x in enumerate(lines) if re.match(r"\w+(Error|Exception): ", x)
                   and "Engine core initialization failed" not in x), None)
        cause = " ".join(x.strip() for x in lines[at:at + 4]) if at is not None else "no result (see log)"
        res["error"] = re.split(r" \(EngineCore| Process EngineCore| Traceback", cause)[0][:400]
    return res


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?")
    p.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--one", nargs=2, metavar=("MODEL", "OUT_JSON"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return one_engine(*a.one)
    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    schemes = a.schemes.split(",")
    t0 = time.time()
    dirs = build_exports(out, schemes)
    print(f"exports: {time.time() - t0:.0f} s", flush=True)
    jobs = [(s, fmt, d) for s in schemes for fmt, d in dirs[s].items()]
    with ThreadPoolExecutor(a.workers) as pool:
        futs = {(s, fmt): pool.submit(_run_child, d, out / "logs" / f"{s.replace(':', '-')}_{fmt}.json",
                                      out / "logs" / f"{s.replace(':', '-')}_{fmt}.log", a.timeout) for s, fmt, d in jobs}
        results = {k: f.result() for k, f in futs.items()}
    rows = []
    for s in schemes:
        bits, sym, gs, *act = s.split(":")
        dq, ct = results[(s, "dequantized")], results[(s, "compressed-tensors")]
        row = {"bits": int(bits), "symmetric": sym == "sym", "group_size": int(gs), "act_order": bool(act),
               "loads": ct["ok"],
               "kernel": ct.get("kernel"), "error": ct.get("error"), "load_s": ct.get("load_s"),
               "dequantized_loads": dq["ok"]}
        if ct["ok"] and dq["ok"]:
            row["max_abs_dlogprob"] = round(max_abs_diff(ct["logprobs"], dq["logprobs"]), 4)
            row["mean_logprob"] = round(sum(map(sum, dq["logprobs"])) / sum(map(len, dq["logprobs"])), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"vllm": _version("vllm"), "torch": _version("torch"), "gpu": _gpu(), "sequences": f"{N_SEQ} x {SEQ_LEN} tokens",
            "model": "random-init Qwen3, 2 layers of Qwen3-0.6B's shapes, RTN", "wall_s": round(time.time() - t0)}
    (out / "matrix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    head = "| bits | symmetric | group | act-order | loads | kernel | max abs dlogprob vs dequantized | mean logprob | load s | error |\n|---|---|---|---|---|---|---|---|---|---|\n"
    md = "".join(f"| {r['bits']} | {r['symmetric']} | {r['group_size']} | {r['act_order']} | {r['loads']} | {r['kernel'] or ''} | "
                 f"{r.get('max_abs_dlogprob', '')} | {r.get('mean_logprob', '')} | {r['load_s'] or ''} | {r['error'] or ''} |\n"
                 for r in rows)
    (out / "matrix.md").write_text(f"{json.dumps(meta)}\n\n{head}{md}")
    print(head + md)


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:  # noqa: BLE001 (not installed)
        return "absent"


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


if __name__ == "__main__":
    main()
