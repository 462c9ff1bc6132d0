import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
MATH500 = ROOT.parent / "shared" / "data" / "math500.jsonl"


def tiny_qwen3(vocab_size=102, hidden=64, inter=128, layers=2, tie=False, seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    return Qwen3ForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_qwen3()


@pytest.fixture
def tokenizer():
    from reasoning_qat.data.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture
def saved_tiny(tmp_path, tokenizer):
    """A tiny Qwen3 model and the local tokenizer saved as a transformers checkpoint directory."""
    model = tiny_qwen3(vocab_size=len(tokenizer))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


DEMO_SMALL = """
name: {name}
run_root: {root}
seed: 0
model:
  demo: {{hidden_size: 64, intermediate_size: 128, num_layers: 2, train_steps: {teacher_steps}, batch_size: 32, lr: 3.0e-3}}
  dtype: float32
quant: {{bits: {bits}, group_size: 32}}
calibration: {{num_samples: 8, seq_len: 128}}
ptq: {{method: gptq, baselines: {baselines}}}
qat:
  enabled: {qat}
  data: {{source: demo}}
  max_steps: {qat_steps}
  batch_size: 16
  lr: 1.0e-5         # ordinary parameters (absolute)
  latent_lr: 1.0e-2  # quantized latents, grid steps per update
  scale_lr: 1.0e-2   # step sizes and zeros, grid steps at the grid's edge
  save_steps: {save_steps}
  logging_steps: 5
rl: {{enabled: false}}
export: {{formats: [dequantized, compressed-tensors]}}
eval: {{tasks: [demo_arith], backend: transformers, batch_size: 256, limit: {limit}}}
"""


def demo_recipe(tmp_path, name="t", teacher_steps=60, bits="[2]", baselines="[rtn]", qat="true", qat_steps=10,
                save_steps=5, limit=40) -> Path:
    return write_recipe(tmp_path / f"{name}.yaml", DEMO_SMALL.format(
        name=name, root=tmp_path / "runs", teacher_steps=teacher_steps, bits=bits, baselines=baselines, qat=qat,
        qat_steps=qat_steps, save_steps=save_steps, limit=limit))
