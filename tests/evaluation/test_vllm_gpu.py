"""vLLM on a GPU serves the packed exports as the project's serving table says, computing the quantized
function: each compressed-tensors export against the same model's dequantized export, by teacher-forced
log-probabilities (benchmarks/vllm_gpu/serving_matrix.py). Runs on a GPU after
benchmarks/vllm_gpu/install.sh; skipped where there is no GPU or no vLLM. RQAT_GPU_OUT keeps the matrix."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reasoning_qat.serving import vllm_refuses_packed

from ..conftest import ROOT

if not torch.cuda.is_available():
    pytest.skip("needs a GPU (run on a GPU: README 'vLLM on the GPU')", allow_module_level=True)
pytest.importorskip("vllm")

SCHEMES = ["2:sym:128", "3:sym:128", "4:sym:128", "8:sym:128", "2:asym:128", "3:asym:128", "4:asym:128", "8:asym:128",
           # act-order (`weight_g_idx`, groups a permutation of the columns): Machete takes it at 4/8 bits, nothing at 2/3
           "2:sym:128:act", "3:sym:128:act", "4:asym:128:act", "8:sym:128:act"]
TOLERANCE = 0.15  # a packing error moves log-probabilities by nats; kernels differ by a few float16 rounding steps (<= 0.08 measured)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = Path(os.environ.get("RQAT_GPU_OUT") or tmp_path_factory.mktemp("matrix"))
    extra = os.environ.get("RQAT_GPU_EXTRA_SCHEMES", "3:sym:-1,3:sym:64")  # recorded, not asserted
    subprocess.run([sys.executable, str(ROOT / "benchmarks/vllm_gpu/serving_matrix.py"), str(out),
                    "--schemes", ",".join(SCHEMES + ([extra] if extra else []))], check=True, timeout=900)
    rows = json.loads((out / "matrix.json").read_text())["rows"]
    return {f"{r['bits']}:{'sym' if r['symmetric'] else 'asym'}:{r['group_size']}" + (":act" if r.get("act_order") else ""): r
            for r in rows}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_vllm_serves_what_the_serving_table_says(matrix, scheme):
    row = matrix[scheme]
    assert row["dequantized_loads"], row
    refused = vllm_refuses_packed(row["bits"], row["symmetric"], row.get("act_order", False))
    assert row["loads"] is (refused is None), row
    if row["loads"]:
        assert row["max_abs_dlogprob"] < TOLERANCE, row
    else:
        assert "not supported" in row["error"] or "Supported" in row["error"], row
