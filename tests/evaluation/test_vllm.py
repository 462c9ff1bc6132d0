"""vLLM for real: the engine (vLLM's CPU build in CI) generates for eval, and its own config parsing
accepts the compressed-tensors exports. CI installs vLLM and sets RQAT_REQUIRE_VLLM=1, so these
tests fail there, rather than skip, when vLLM is missing."""

import json
import os
import subprocess
import sys

import pytest
import torch

from reasoning_qat.evaluation.backends import (
    EngineSettings,
    VLLMBackend,
    pick_backend,
    request_seed,
    vllm_problem,
)
from reasoning_qat.evaluation.runner import evaluate
from reasoning_qat.evaluation.tasks import load_task

from ..conftest import demo_recipe

if vllm_problem() is not None:
    if os.environ.get("RQAT_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"RQAT_REQUIRE_VLLM=1 but {vllm_problem()}")
    pytest.skip(f"vLLM not usable here: {vllm_problem()}", allow_module_level=True)

SETTINGS = EngineSettings(gpu_memory_utilization=0.3)


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    """A trained demo teacher, its 4-bit GPTQ and RTN exports, and the eval stage run through vLLM."""
    tmp = tmp_path_factory.mktemp("vllm")
    rec = demo_recipe(tmp, name="v", teacher_steps=300, bits="[4]", baselines="[rtn]", qat="false", limit=40,
                      shared_teacher=True)
    # the tests read the BF16 and GPTQ rows (and the RTN export): one CPU engine start fewer
    rec.write_text(rec.read_text().replace("backend: transformers", "backend: vllm, gpu_memory_utilization: 0.3, "
                                                                    "methods: [bf16, gptq]"))
    subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec)], check=True, capture_output=True)
    return tmp / "runs" / "v"


def _samples(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_greedy_vllm_equals_transformers_on_the_same_exports(vllm_run, tmp_path):
    """The eval stage ran on vLLM; transformers on the same checkpoints writes the same completions."""
    manifest = json.loads((vllm_run / "eval" / "manifest.json").read_text())["metrics"]
    task = load_task("demo_arith")
    for name, path in [("bf16", vllm_run / "teacher" / "model"), ("w4-gptq", vllm_run / "export" / "w4-gptq" / "dequantized")]:
        assert manifest[name]["demo_arith"]["backend"] == "VLLMBackend"
        m = evaluate(str(path), task, tmp_path / name, backend="transformers", limit=40,
                     demo_dir=vllm_run / "teacher" / "data")
        ours, theirs = _samples(tmp_path / name / "samples.jsonl"), _samples(vllm_run / "eval" / name / "demo_arith" / "samples.jsonl")
        assert [r["response"] for r in ours] == [r["response"] for r in theirs], name
        assert [r["num_tokens"] for r in ours] == [r["num_tokens"] for r in theirs], name
        assert m["pass@1"] == manifest[name]["demo_arith"]["pass@1"] > 0.3
    # Special tokens survive: the demo teacher thinks inside <think>...</think>, and the grader reads after it.
    assert all("</think>" in r["response"] for r in theirs if r["correct"])


@pytest.mark.slow
def test_sampled_pass_at_1_is_reproducible_per_seed(vllm_run, tmp_path):
    task = load_task("demo_arith").model_copy(update={"samples": 4})
    task = task.model_copy(update={"sampling": task.sampling.model_copy(update={"temperature": 1.5})})
    model = str(vllm_run / "export" / "w4-rtn" / "dequantized")
    data = vllm_run / "teacher" / "data"

    def run(seed, out, engine=None):
        m = evaluate(model, task, tmp_path / out, limit=30, demo_dir=data, seed=seed, settings=SETTINGS, engine=engine,
                     backend="vllm")
        return m, [r["response"] for r in _samples(tmp_path / out / "samples.jsonl")]

    m0, s0 = run(0, "a")  # an engine of its own, closed after the run
    engine = VLLMBackend(model, seed=123, settings=SETTINGS)  # another engine, another engine seed
    try:
        m0b, s0b = run(0, "b", engine)
        m1, s1 = run(1, "c", engine)
    finally:
        engine.close()
    assert m0["samples_per_problem"] == 4
    assert s0 == s0b and m0["pass@1"] == m0b["pass@1"]
    assert s0 != s1
    # The 4 samples of a problem are not copies of each other (one seed per (problem, sample)).
    assert any(len(set(s0[i : i + 4])) > 1 for i in range(0, len(s0), 4))


@pytest.mark.slow
def test_a_published_dequantized_folder_serves_alone_in_vllm(vllm_run, tmp_path):
    """`rqat publish --format dequantized` writes a folder vLLM (its CPU build here) serves as it is,
    the model card beside the weights: greedy completions equal the eval stage's on the same export."""
    from reasoning_qat.publish import publish

    out = publish(vllm_run, "w4-gptq", tmp_path / "published", fmt="dequantized")
    assert (out / "README.md").is_file() and not (out / "quant_meta.json").exists()
    m = evaluate(str(out), load_task("demo_arith"), tmp_path / "served", backend="vllm", limit=20,
                 demo_dir=vllm_run / "teacher" / "data", settings=SETTINGS)
    ours = _samples(tmp_path / "served" / "samples.jsonl")
    theirs = _samples(vllm_run / "eval" / "w4-gptq" / "demo_arith" / "samples.jsonl")[:20]
    assert m["backend"] == "VLLMBackend"
    assert [r["response"] for r in ours] == [r["response"] for r in theirs]


@pytest.mark.slow
def test_vllm_prompt_logprobs_write_the_cache_transformers_writes(vllm_run, tmp_path):
    """The cached teacher written through vLLM's prompt_logprobs holds what the transformers
    path computes (same top tokens, log-probabilities within the engines' rounding)."""
    from reasoning_qat.data.qat_data import load_tokenized
    from reasoning_qat.data.teacher_cache import TeacherCache, write_teacher_cache
    from reasoning_qat.models import load_model

    data = load_tokenized(vllm_run / "calibrate" / "qat_data").select(range(12))
    teacher = str(vllm_run / "teacher" / "model")
    engine = VLLMBackend(teacher, settings=SETTINGS, max_logprobs=8)
    try:
        m = write_teacher_cache(engine, data, tmp_path / "vllm", top_k=8, batch_size=6, shard_examples=5, progress=False)
    finally:
        engine.close()
    write_teacher_cache(load_model(teacher, torch.float32, device="cpu").eval(), data, tmp_path / "tf", top_k=8,
                        batch_size=6, shard_examples=5, progress=False)
    a, b = TeacherCache(tmp_path / "vllm"), TeacherCache(tmp_path / "tf")
    assert m["rows"] == b.manifest["rows"] > 0
    for i in range(len(data)):
        (va, ia, ta), (vb, ib, tb) = a.rows(i), b.rows(i)
        assert torch.equal(ia[:, 0], ib[:, 0])  # the teacher's top token at every position
        assert torch.allclose(va, vb, atol=2e-2)  # float16 on disk, the engines' own kernels
        finite = torch.isfinite(tb)
        assert torch.equal(finite, torch.isfinite(ta)) and torch.allclose(ta[finite], tb[finite], atol=5e-2)


def test_request_seeds_differ_per_problem_and_sample():
    seeds = {request_seed(0, p, j) for p in range(50) for j in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert request_seed(0, 3, 1) == request_seed(0, 3, 1) != request_seed(1, 3, 1)


def test_auto_picks_the_faster_engine_for_the_device():
    """vLLM where it runs on a GPU; on a CPU, transformers (vLLM's CPU build is the slower one), with the reason."""
    import torch

    from reasoning_qat.evaluation.backends import auto_backend

    name, why = auto_backend()
    assert pick_backend("auto") == name == ("vllm" if torch.cuda.is_available() else "transformers")
    assert why and (torch.cuda.is_available() or "faster than vLLM's CPU build" in why)


def test_vllm_start_failure_is_one_line(tmp_path):
    from reasoning_qat.errors import UserError

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="vllm could not start on") as err:
        VLLMBackend(str(tmp_path), settings=SETTINGS)
    assert "\n" not in str(err.value)


def _vllm_schemes(path):
    """vLLM's own parsing: the quantization method it reads from the checkpoint, and the scheme it
    assigns to each (fused) Linear layer of its Qwen3 implementation."""
    from vllm.config import LoadConfig, ModelConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    mc = ModelConfig(model=str(path), dtype="float32")
    qc = get_quant_config(mc, LoadConfig())
    qc.packed_modules_mapping = dict(Qwen3ForCausalLM.packed_modules_mapping)
    probe = torch.nn.Linear(1, 1)
    n_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    names = [f"model.layers.{i}.{m}" for i in range(n_layers)
             for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    return mc.quantization, {n: qc.get_scheme(probe, n) for n in names + ["lm_head"]}


@pytest.mark.parametrize("bits,gs,sym", [(2, 32, False), (3, 32, False), (4, 32, True), (4, -1, False), (8, 32, False),
                                         (8, -1, True), (3, -1, True)])
def test_vllm_maps_every_compressed_tensors_layer_to_wna16(tmp_path, bits, gs, sym):
    from reasoning_qat.quant.formats import export_compressed_tensors

    from ..quant.test_formats import _quantized_tiny

    export_compressed_tensors(_quantized_tiny(bits, gs, sym=sym), tmp_path / "ct", dtype=torch.float32)
    method, schemes = _vllm_schemes(tmp_path / "ct")
    assert method == "compressed-tensors"
    assert schemes.pop("lm_head") is None  # lm_head stays BF16
    for name, scheme in schemes.items():
        assert type(scheme).__name__ == "CompressedTensorsWNA16", name
        assert (scheme.num_bits, scheme.symmetric, scheme.group_size) == (bits, sym, gs), name


def test_vllm_maps_mixed_precision_exports_layer_by_layer(tmp_path):
    from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant
    from reasoning_qat.quant.formats import export_compressed_tensors

    from ..conftest import tiny_qwen3

    model = tiny_qwen3()
    swap_in_fake_quant(model, QuantTargets(QuantScheme(2, 32), overrides=(("model.layers.1.mlp.*", {"bits": 4}),)))
    export_compressed_tensors(model, tmp_path / "ct", dtype=torch.float32)
    _, schemes = _vllm_schemes(tmp_path / "ct")
    assert schemes["model.layers.1.mlp.gate_up_proj"].num_bits == 4 and schemes["model.layers.1.mlp.down_proj"].num_bits == 4
    assert schemes["model.layers.0.mlp.gate_up_proj"].num_bits == 2 and schemes["model.layers.1.self_attn.qkv_proj"].num_bits == 2


def test_vllm_stops_at_every_end_token(tmp_path, name="qwen3"):
    """The same model as the transformers backend's test (tests/test_families.py): vLLM stops on
    Qwen3's second end token (<|endoftext|>) too, and the two backends agree on text, length and
    truncation. (One family: each CPU engine start costs about a minute.)"""
    from ..families import FAMILIES
    from ..test_families import _always_emits_id0

    path, tok = _always_emits_id0(FAMILIES[name], tmp_path)
    engine = VLLMBackend(str(path), settings=SETTINGS)
    try:
        assert engine.end_ids == tok.convert_tokens_to_ids(list(FAMILIES[name].end_tokens))
        from reasoning_qat.data.reasoning import generation_prompt

        (c,), = engine.generate([generation_prompt(tok, "What is 3+5?")], 1, 0.0, 1.0, -1, 16)
    finally:
        engine.close()
    assert (c.text, c.num_tokens, c.truncated) == ("", 1, False)


@pytest.mark.parametrize("bits,gs,sym", [(3, 32, True), (3, 32, False), (3, -1, True), (2, 32, False), (4, 32, True)])
def test_export_tensors_have_the_shapes_vllm_allocates(tmp_path, monkeypatch, bits, gs, sym):
    """vLLM's WNA16 scheme allocates each packed tensor before loading the checkpoint into it (shape
    asserted at load: the 3-bit failure on the GPU was `param_data.shape == loaded_weight.shape`). Its
    own `create_weights` here, layer by layer, against what the export wrote. The kernel choice needs a
    GPU and the parameters ask for the tensor-parallel group, so those calls are replaced; the shapes are
    the scheme's own arithmetic."""
    from safetensors.torch import load_file
    from vllm.model_executor import parameter as vllm_parameter
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        compressed_tensors_wNa16 as wna16,
    )

    from reasoning_qat.quant.fake_quant import fake_quant_modules
    from reasoning_qat.quant.formats import export_compressed_tensors

    from ..quant.test_formats import _quantized_tiny

    class NoKernel:
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(wna16, "choose_mp_linear_kernel", lambda config: NoKernel)
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_rank", lambda: 0)  # one process, no TP group
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_world_size", lambda: 1)
    model = _quantized_tiny(bits, gs, sym=sym)
    shapes = {n: tuple(m.weight.shape) for n, m in fake_quant_modules(model).items()}
    assert len(shapes) == 14
    export_compressed_tensors(model, tmp_path / "ct", dtype=torch.float32)
    _, schemes = _vllm_schemes(tmp_path / "ct")
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    scheme = schemes["model.layers.0.self_attn.o_proj"]
    for name, (out_f, in_f) in shapes.items():
        layer = torch.nn.Module()
        scheme.create_weights(layer, out_f, in_f, [out_f], in_f, torch.float32, weight_loader=None)
        for param in ("weight_packed", "weight_scale", "weight_zero_point"):
            if hasattr(layer, param):
                assert tuple(state[f"{name}.{param}"].shape) == tuple(getattr(layer, param).shape), (name, param)
            else:
                assert f"{name}.{param}" not in state, (name, param)
