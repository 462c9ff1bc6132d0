"""Shared benchmark helpers: the real Qwen3 architectures (random weights), device facts, results."""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ARCHS = {  # from the published Qwen3 configs
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-4b": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True},
    "qwen3-8b": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False},
    # a CPU-sized smoke-test architecture: `--arch tiny` checks a script before it spends GPU time
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=True),
}
RESULTS = Path(os.environ.get("BENCH_RESULTS", Path(__file__).parent / "results"))  # smoke runs write elsewhere
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scratch_dir(prefix: str, keep: str | None = None) -> Path:
    """A working directory: `keep` when given (kept, e.g. to resume on the GPU), else a temporary one removed at exit.

    Why: the export and QAT benchmarks write multi-GB checkpoints; a leaked temporary folder per run filled this
    machine's disk (and the CI run that followed on it) once.
    """
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def qwen3(arch: str, dtype=torch.bfloat16, device=DEVICE, seed=0, layers: int | None = None):
    """A random-init Qwen3 of the named architecture (`layers`: only that many decoder layers)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    shape = {**ARCHS[arch], **({"num_hidden_layers": layers} if layers else {})}
    cfg = Qwen3Config(**shape, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    return model


def device_info() -> dict:
    from importlib.metadata import version

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers")}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return info


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup=2, iters=5) -> float:
    """Mean seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t) / iters


def peak_memory(fn) -> tuple[float, float]:
    """(seconds for one call, peak GiB allocated during it) on CUDA."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t, (torch.cuda.max_memory_allocated() - base) / 2**30


def bf16_matmul_tflops(n=8192, iters=10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    s = timed(lambda: a @ b, warmup=3, iters=iters)
    return 2 * n**3 / s / 1e12


def save(name: str, rows: list[dict], extra: dict | None = None) -> None:
    name += os.environ.get("BENCH_TAG", "")  # e.g. "-1.7b": a partial re-run keeps the earlier file
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": name, "command": "python " + " ".join(sys.argv), "env": device_info(), **(extra or {}), "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    cols = list(rows[0])
    md = [f"# {name}", "", f"command: `{out['command']}`", f"env: {json.dumps(out['env'])}", ""]
    md += [json.dumps(extra)] if extra else []
    md += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
