"""The eval stage at Qwen3 size through both backends (issue 28 item 3): `rqat run` of the same recipe twice,
`eval.backend: transformers` and `eval.backend: vllm`, on the same variants (BF16 and W4G128 symmetric RTN).

The model has Qwen3-0.6B's decoder (28 layers, hidden 1024, 16/8 heads of 128, MLP 3072), random init, with the
project's character tokenizer (no hub here), so its LM head has the tokenizer's ~100 rows instead of 151,936: the
tokens/s are of the decoder stack. A random model never ends its answer, so every response runs to
`--max-new-tokens` and both backends decode the same number of tokens. Prompts: the first `--problems` MATH-500
problems (a local copy, `--math500`), sampled as the task says (temperature 0.6, top-p 0.95, top-k 20).
vLLM runs the W4 variant from its packed compressed-tensors export (Machete on Hopper), transformers from the
dequantized export. Each run's eval manifest gives the stage's wall time; each variant's metrics.json the
generation tokens/s (engine start excluded).

    python benchmarks/vllm_gpu/eval_stage_qwen3.py --math500 PATH --out benchmarks/results/vllm-gpu/eval-stage-qwen3
Needs a GPU and vLLM (benchmarks/vllm_gpu/install.sh). Runs resume: a second call finishes what a first one left.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def build_model(path: Path, layers: int) -> int:
    """Random-init Qwen3-0.6B-shaped model + the character tokenizer, saved as a local model directory."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from reasoning_qat.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def calibration_data(path: Path) -> None:
    """Rows {prompt, response} in the chat/thinking format: the calibrate stage's source (RTN reads none of it)."""
    rows = [{"prompt": f"Compute {i}+{i}.", "response": f"<think>\n{i}+{i}={2 * i}\n</think>\n\\boxed{{{2 * i}}}"}
            for i in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def recipe(name: str, root: Path, backend: str, a) -> dict:
    return {
        "name": name, "run_root": str(root / "runs"),
        "model": {"id": str(root / "model"), "dtype": "bfloat16"},
        "quant": {"bits": [4], "group_size": 128, "symmetric": True},
        "calibration": {"domain": "reasoning", "num_samples": 4, "seq_len": 256},
        "ptq": {"method": "rtn", "baselines": []},
        "qat": {"enabled": False, "data": {"source": str(root / "data.jsonl"), "max_length": 512,
                                            "prompt_field": "prompt", "response_field": "response"}},
        "rl": {"enabled": False},
        "export": {"formats": ["dequantized", "compressed-tensors"]},
        "eval": {"tasks": ["math500"], "data": {"math500": str(Path(a.math500).resolve())}, "backend": backend,
                 "samples": 1, "limit": a.problems, "max_new_tokens": a.max_new_tokens, "batch_size": a.batch_size,
                 "max_model_len": 4096, "gpu_memory_utilization": 0.5,
                 "export_format": "compressed-tensors" if backend == "vllm" else "dequantized"},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--math500", required=True, help="local MATH-500 jsonl (../shared/data/math500.jsonl)")
    p.add_argument("--out", default="benchmarks/results/vllm-gpu/eval-stage-qwen3")
    p.add_argument("--root", default="/tmp/es", help="model, data and run directories")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--problems", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256, help="transformers backend: prompts per generate call")
    p.add_argument("--backends", nargs="+", default=["transformers", "vllm"])
    a = p.parse_args()
    root, out = Path(a.root), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (root / "model" / "config.json").is_file():
        params = build_model(root / "model", a.layers)
        print(f"model: {params / 1e6:.0f}M parameters", flush=True)
    calibration_data(root / "data.jsonl")
    rows = []
    for backend in a.backends:
        name = f"es-{backend}"
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe(name, root, backend, a), sort_keys=False))
        t0 = time.time()
        with open(out / f"{name}.log", "a") as log:
            rc = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(path)], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, check=False).returncode
        print(f"{name}: rc {rc}, {time.time() - t0:.0f} s", flush=True)
        run = root / "runs" / name
        (out / f"{name}.recipe.yaml").write_text(path.read_text())
        for stage in ("ptq", "export", "eval"):
            m = run / stage / "manifest.json"
            if m.is_file():
                (out / f"{name}.{stage}.manifest.json").write_text(m.read_text())
        if not (run / "eval" / "manifest.json").is_file():
            continue
        eval_s = json.loads((run / "eval" / "manifest.json").read_text())["wall_time_s"]
        for variant in sorted(d.name for d in (run / "eval").iterdir() if d.is_dir()):
            for mf in (run / "eval" / variant).glob("*/metrics.json"):
                m = json.loads(mf.read_text())
                rows.append({"backend": backend, "variant": variant, "eval_stage_s": round(eval_s, 1),
                             "tokens_per_s": round(m["tokens_per_s"]), "problems": m["problems"],
                             "mean_response_tokens": round(m["mean_response_tokens"], 1),
                             "truncation_rate": m["truncation_rate"], "engine": m["backend"]})
    (out / "eval_stage.json").write_text(json.dumps(rows, indent=1))
    head = "| backend | variant | engine | generation tok/s | mean response tokens | whole eval stage s |\n|---|---|---|---|---|---|\n"
    md = "".join(f"| {r['backend']} | {r['variant']} | {r['engine']} | {r['tokens_per_s']:,} | {r['mean_response_tokens']} | "
                 f"{r['eval_stage_s']} |\n" for r in rows)
    (out / "eval_stage.md").write_text(head + md)
    print(head + md)


if __name__ == "__main__":
    main()
