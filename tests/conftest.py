import os
import shutil
import subprocess
import sys
from pathlib import Path

# Under pytest-xdist each worker (and every pipeline it launches) gets its share of the cores: torch's
# default of one OpenMP thread per core in each of two workers oversubscribes a 2-core machine, and a
# demo teacher that trains in 53 s alone then takes 5 min beside another (1 min with one thread each).
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
MATH500 = ROOT.parent / "shared" / "data" / "math500.jsonl"


# The files that take longest, started first: pytest-xdist (--dist loadfile) hands out files in collection
# order, and the longest one started last sets the suite's wall time.
LONGEST_FIRST = ("test_vllm.py", "test_rl_vllm.py", "test_qat_launch.py", "test_qat.py", "test_demo.py",
                 "test_pipeline.py", "test_fsdp2.py", "test_rotation.py", "test_analysis.py", "test_teacher.py",
                 "test_teacher_cache.py")


def pytest_configure(config):
    # xdist otherwise reorders files by their number of tests (many short tests first), which undoes the above
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


class NaNBackward(torch.autograd.Function):
    """Identity forward; the backward turns the incoming gradient into NaN (a NaN entering in the backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


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
                save_steps=5, limit=40, shared_teacher=False) -> Path:
    """A demo recipe; shared_teacher: its run starts with the teacher stage done (see `share_teacher`)."""
    rec = write_recipe(tmp_path / f"{name}.yaml", DEMO_SMALL.format(
        name=name, root=tmp_path / "runs", teacher_steps=teacher_steps, bits=bits, baselines=baselines, qat=qat,
        qat_steps=qat_steps, save_steps=save_steps, limit=limit))
    return share_teacher(rec) if shared_teacher else rec


TEACHERS = None  # the session's teacher cache (set by the `_teacher_cache` fixture)


@pytest.fixture(scope="session", autouse=True)
def _teacher_cache(tmp_path_factory):
    """One folder per test session, shared by the xdist workers (their base temps are siblings)."""
    global TEACHERS
    base = tmp_path_factory.getbasetemp()
    TEACHERS = (base.parent if base.name.startswith("popen-gw") else base) / "teachers"
    TEACHERS.mkdir(exist_ok=True)


def share_teacher(rec: Path) -> Path:
    """Put into rec's run the teacher stage its recipe names, as the pipeline itself writes it: trained by
    `rqat run --stages teacher` the first time the session needs it, then copied (the stage's manifest
    carries the recipe hash, so the run takes it as done). Tests that share a teacher pay for it once;
    what they test starts after the teacher. Returns rec."""
    from filelock import FileLock

    from reasoning_qat.pipeline import Pipeline
    from reasoning_qat.recipe import load_recipe
    from reasoning_qat.stages import STAGES

    pipe = Pipeline(load_recipe(rec), STAGES)
    cached = TEACHERS / pipe.recipe_hash("teacher")
    with FileLock(f"{cached}.lock"):
        if not cached.exists():
            subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec), "--stages", "teacher"],
                           check=True, capture_output=True)
            shutil.copytree(pipe.stage_dir("teacher"), f"{cached}.partial")
            os.rename(f"{cached}.partial", cached)
        elif not pipe.stage_dir("teacher").exists():
            shutil.copytree(cached, pipe.stage_dir("teacher"))
    assert pipe.status("teacher") == "done"
    return rec
