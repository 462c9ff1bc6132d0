"""Every bad input is caught before work starts, in one line (exit 2), and creates nothing; real bugs
keep their traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from reasoning_qat.errors import UserError

from .conftest import MATH500, demo_recipe


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "reasoning_qat.cli", *args], capture_output=True, text=True, env=env)


def one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    for n in needles:
        assert n in res.stderr, res.stderr


def _broken(tmp_path, old, new):
    rec = demo_recipe(tmp_path, name="bad")
    rec.write_text(rec.read_text().replace(old, new))
    return rec


@pytest.mark.parametrize("old,new,needle", [
    ("tasks: [demo_arith]", "tasks: [demo_arith, math5000]", "eval.tasks: unknown task 'math5000' (known: "),
    ("data: {source: demo}", "data: {source: /nonexistent/qat.jsonl}", "qat.data.source: no such file or directory '/nonexistent/qat.jsonl'"),
    ("calibration: {", "calibration: {generic_source: ./missing.txt, ", "calibration.generic_source: no such file or directory './missing.txt'"),
    ("eval: {", "eval: {data: {demo_arith: ./nope.jsonl}, ", "eval.data.demo_arith: no such file or directory './nope.jsonl'"),
])
def test_bad_references_fail_before_any_work_and_create_nothing(tmp_path, old, new, needle):
    rec = _broken(tmp_path, old, new)
    assert new in rec.read_text()
    one_line_error(cli("run", str(rec)), needle)
    assert not (tmp_path / "runs").exists()  # no run directory, no lock file


def test_an_attention_kernel_this_machine_lacks_is_refused_before_the_run(tmp_path):
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    rec = _broken(tmp_path, "  dtype: float32", "  dtype: float32\n  attn_implementation: flash_attention_2")
    one_line_error(cli("run", str(rec)), "model.attn_implementation: flash_attention_2 needs the flash-attn package "
                                         "and a CUDA GPU, which this machine lacks; use sdpa")
    assert not (tmp_path / "runs").exists()


def _with_model_id(tmp_path, model_id):
    rec = demo_recipe(tmp_path, name="bad")
    text = rec.read_text()  # swap the demo teacher for a model path; the data then comes from a file
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    text = text[: text.index("model:\n")] + f"model:\n  id: {model_id}\n" + text[text.index("  dtype: float32"):]
    rec.write_text(text.replace("data: {source: demo}", f"data: {{source: {tmp_path / 'd.jsonl'}}}")
                   .replace("tasks: [demo_arith]", f"tasks: [math500], data: {{math500: {tmp_path / 'd.jsonl'}}}"))
    return rec


def test_a_missing_local_model_path_is_not_taken_for_a_hub_id(tmp_path):
    one_line_error(cli("run", str(_with_model_id(tmp_path, "/nonexistent/dir"))),
                   "model.id: no such local model directory '/nonexistent/dir'")
    assert not (tmp_path / "runs").exists()


def test_a_local_directory_without_a_model_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(cli("run", str(_with_model_id(tmp_path, tmp_path / "empty"))), "holds no readable model config")
    assert not (tmp_path / "runs").exists()


def test_a_model_path_with_spaces_is_not_taken_for_a_hub_id(tmp_path):
    one_line_error(cli("run", str(_with_model_id(tmp_path, "my local teacher"))),
                   "model.id: no such local model directory 'my local teacher'")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("old,new,needle", [
    # a KV-cache group that does not divide the demo teacher's head_dim (32), or no group at all
    ("quant: {bits: [2], group_size: 32}", "quant: {bits: [2], group_size: 32, kv_cache: {group_size: 24}}",
     "quant.kv_cache.group_size: 24 does not divide the model's head_dim 32"),
    ("quant: {bits: [2], group_size: 32}", "quant: {bits: [2], group_size: 32, kv_cache: {group_size: 0}}",
     "quant.kv_cache.group_size: 0 is not a group size"),
    # a LiveCodeBench window that ends before it starts, and a date that is not one
    ("eval: {", "eval: {task_options: {livecodebench: {release_start: 2025-02-01, release_end: 2025-01-01}}, ",
     "eval.task_options.livecodebench: release_end 2025-01-01 is not after release_start 2025-02-01"),
    ("eval: {", "eval: {task_options: {livecodebench: {release_start: 2025-02-30}}, ",
     "eval.task_options.livecodebench.release_start: Input should be a valid date"),
    # a section given twice: PyYAML would keep the last one silently
    ("rl: {enabled: false}", "rl: {enabled: false}\nquant: {bits: [3]}",
     "not valid YAML at line 22: key 'quant' is given twice in one section"),
])
def test_values_a_later_stage_cannot_use_are_refused_before_the_run(tmp_path, old, new, needle):
    rec = _broken(tmp_path, old, new)
    assert new in rec.read_text()
    if "livecodebench" in new:
        rec.write_text(rec.read_text().replace("tasks: [demo_arith]", "tasks: [demo_arith, livecodebench]"))
    if "kv_cache" in new:
        rec.write_text(rec.read_text().replace("formats: [dequantized, compressed-tensors]", "formats: [dequantized]"))
    one_line_error(cli("run", str(rec)), needle)
    assert not (tmp_path / "runs").exists()


def test_an_offline_hub_id_is_refused_in_one_line_before_the_run(tmp_path):
    """A recipe for a hub model, run with the hub off: one line saying what to do, nothing created
    (it used to spend a minute on retries, then leave a lock, a recipe and a partial teacher stage)."""
    import os

    res = cli("run", str(_with_model_id(tmp_path, "Qwen/Qwen3-0.6B")), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    one_line_error(res, "model.id: 'Qwen/Qwen3-0.6B' is a hub id that is not in the local cache, and the hub is off",
                   "give a local model directory")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["eval", "analyze"])
@pytest.mark.parametrize("model,needle", [
    ("./no_such_model", "no such local model directory './no_such_model'"),
    ("EMPTY", "holds no readable model config (config.json)"),
    ("my local teacher", "no such local model directory 'my local teacher'"),
])
def test_eval_and_analyze_name_a_model_they_cannot_load(tmp_path, command, model, needle):
    if model == "EMPTY":
        model = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    args = ["--task", "math500", "--out", str(tmp_path / "out")] if command == "eval" else ["--out", str(tmp_path / "out")]
    one_line_error(cli(command, model, *args), needle)
    assert not (tmp_path / "out").exists()


def test_eval_says_what_a_demo_task_and_repeated_greedy_samples_need(saved_tiny, tmp_path):
    one_line_error(cli("eval", str(saved_tiny), "--task", "demo_arith"),
                   "--task demo_arith evaluates a demo run's test split: give --demo-data RUN/teacher/data")
    one_line_error(cli("eval", str(saved_tiny), "--task", "demo_arith", "--demo-data", str(tmp_path), "--samples", "2"),
                   "--samples 2: demo_arith decodes greedily (temperature 0)")


def test_eval_results_of_two_exports_with_the_same_name_go_to_different_folders(tmp_path):
    from reasoning_qat.api import default_eval_dir

    for variant in ("w4-gptq", "w4-rtn"):
        (tmp_path / variant / "dequantized").mkdir(parents=True)
    a, b = (default_eval_dir(str(tmp_path / v / "dequantized")) for v in ("w4-gptq", "w4-rtn"))
    assert (a, b) == (tmp_path / "w4-gptq" / "dequantized-eval", tmp_path / "w4-rtn" / "dequantized-eval")
    hub = default_eval_dir("Qwen/Qwen3-0.6B")  # no local copy: the user's cache, not the working directory
    assert hub.name == "Qwen--Qwen3-0.6B" and hub.is_relative_to(Path.home() / ".cache")


def test_verified_selection_without_answers_is_refused_before_the_teacher_trains(tmp_path):
    rec = _with_model_id(tmp_path, tmp_path)  # d.jsonl rows have prompt and response only
    rec.write_text(rec.read_text().replace("data: {source: " + str(tmp_path / "d.jsonl"),
                                           "data: {select: verified, source: " + str(tmp_path / "d.jsonl")))
    one_line_error(cli("run", str(rec)), "qat.data.select: verified grades each trace against 'answer'",
                   "(fields: prompt, response)")


def test_a_schema_error_is_refused_without_importing_torch(tmp_path):
    """Refusing a recipe the schema rejects imports neither torch nor transformers (it took ~7 s of
    CPU when `rqat run` imported them first)."""
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: {id: a}\nquant: {bits: 7}\n")
    code = ("import sys; from reasoning_qat.cli import main; rc = main(['run', sys.argv[1]]); "
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); print(rc, heavy)")
    res = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True)
    assert res.stdout.strip() == "2 []", res.stdout + res.stderr
    assert "quant.bits[0]: Input should be 2, 3, 4 or 8 (got 7)" in res.stderr


def test_a_run_root_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    (tmp_path / "qat.jsonl").write_text('{"prompt": "1+1?", "response": "2"}\n')
    (tmp_path / "broken.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?" "answer": "4"}\n')
    rec = demo_recipe(tmp_path, name="bad")
    one_line_error(cli("run", str(rec), "--run-root", str(tmp_path / "afile" / "runs")),
                   f"run_root: '{tmp_path / 'afile' / 'runs'}' lies under '{tmp_path / 'afile'}', which is a file")


def test_binary_recipe_names_the_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    one_line_error(cli("run", str(p)), f"{p}: not a UTF-8 text file")


def test_offline_eval_says_how_to_use_a_local_copy(saved_tiny, tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = cli("eval", str(saved_tiny), "--task", "math500", "--limit", "2", "--backend", "transformers",
              "--out", str(tmp_path / "out"), env=env)
    one_line_error(res, "task math500: source: cannot load 'HuggingFaceH4/MATH-500'", "eval.data: {math500: FILE.jsonl}",
                   "rqat eval --data FILE.jsonl")


@pytest.mark.skipif(not MATH500.is_file(), reason="../shared/data/math500.jsonl not present")
def test_offline_eval_with_a_local_copy(saved_tiny, tmp_path):
    import json
    import os

    res = cli("eval", str(saved_tiny), "--task", "math500", "--data", str(MATH500), "--limit", "3", "--samples", "1",
              "--max-new-tokens", "4", "--backend", "transformers", "--out", str(tmp_path / "out"),
              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "math500" / "metrics.json").read_text())["problems"] == 3


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: {id: a}\nquant: {bits: 7}\n")
    res = cli("--debug", "run", str(p))
    assert res.returncode != 0 and "Traceback" in res.stderr and "RecipeError" in res.stderr


def test_a_bug_is_not_turned_into_a_one_line_error(monkeypatch):
    """Only UserError is reported in one line: a ValueError from a library or our own invariant is a bug."""
    from reasoning_qat import cli as rqat_cli

    def broken(args):
        raise ValueError("an invariant broke")

    parser = rqat_cli.build_parser()
    monkeypatch.setattr(rqat_cli, "build_parser", lambda: parser)
    for action in parser._subparsers._group_actions[0].choices.values():
        action.set_defaults(fn=broken)
    with pytest.raises(ValueError, match="an invariant broke"):
        rqat_cli.main(["status", "runs/x"])
    action.set_defaults(fn=lambda a: (_ for _ in ()).throw(UserError("bad input")))
    assert rqat_cli.main(["compare", "runs/x"]) == 2


# A value the schema or a later stage rejects, per recipe key of the demo recipe: (dotted key, bad value, the
# field the one-line error must name, whether refusing it needs the model's shapes: read from config.json's
# fields, torch-free, for the dense decoder families). Keys are distinct.
MUTATIONS = [
    ("quant.bits", [5], "quant.bits", False),
    ("quant.group_size", 100, "quant.group_size", False),
    ("qat.lr", -1, "qat.lr", False),
    ("qat.kd.loss", "mse", "qat.kd.loss", False),
    ("qat.data.source", "/nonexistent/qat.jsonl", "qat.data.source", False),
    ("calibration.generic_source", "./missing.txt", "calibration.generic_source", False),
    ("calibration.num_samples", 0, "calibration.num_samples", False),
    ("eval.tasks", ["demo_arith", "math5000"], "eval.tasks", False),
    ("eval.data", {"demo_arith": "./nope.jsonl"}, "eval.data.demo_arith", False),
    ("eval.task_options", {"gsm8k": {"samples": 2}}, "eval.task_options", False),
    ("eval.backend", "sglang", "eval.backend", False),
    ("export.formats", ["gptq"], "export.formats", False),
    ("ptq.method", "awq", "ptq.method", False),
    ("run_root", "{tmp}/afile/runs", "run_root", False),
    ("quant.kv_cache", {"group_size": 24}, "quant.kv_cache.group_size", True),
    ("quant.ignore", ["no_such_layer"], "quant.ignore", True),
    ("quant.overrides", [{"pattern": "*.down_proj", "group_size": 96}], "quant.overrides", True),
    ("model.demo.intermediate_size", 80, "quant.group_size", True),
    # QAT / RL data that cannot serve, read in the preflight (files written by the test below)
    ("qat.data.source", "{tmp}/adir", "qat.data.source", False),
    (("qat.data.source", "qat.data.prompt_field"), ("{tmp}/qat.jsonl", "question"), "qat.data.prompt_field", False),
    (("rl.enabled", "rl.data.source"), (True, "{tmp}/broken.jsonl"), "rl.data.source", False),
    ("qat.kd.temperature", float("inf"), "qat.kd.temperature", False),
    (("calibration.generic_source", "ptq.baselines"), ("{tmp}/afile", ["gptq_generic"]), "calibration.generic_source",
     False),
    ("report_to", ["tensorbord"], "report_to", False),
    ("qat.report_to", ["neptune"], "qat.report_to", False),  # known, not installed
    ("quant.overrides", [{"pattern": "*.no_such_proj", "bits": 8}], "quant.overrides", True),
] + ([("qat.distributed", "fsdp2", "qat.distributed", False)] if not Path("/proc/driver/nvidia/gpus").is_dir() else [])

HARNESS = r"""
import contextlib, io, json, sys
from reasoning_qat.cli import main
out = []
for path in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["run", path])
    out.append({"rc": rc, "stderr": err.getvalue(), "heavy": sorted(m for m in ("torch", "transformers", "trl", "vllm",
                                                                                "math_verify") if m in sys.modules)})
print(json.dumps(out))
"""


def _with_tmp(value, tmp):
    if isinstance(value, tuple):
        return tuple(_with_tmp(v, tmp) for v in value)
    return value.format(tmp=tmp) if isinstance(value, str) else value


def _mutated(base: dict, changes) -> dict:
    import copy

    data = copy.deepcopy(base)
    for keys, values, *_ in changes:  # a mutation sets one key, or several together (a tuple of each)
        for key, value in zip(*((keys, values) if isinstance(keys, tuple) else ((keys,), (values,)))):
            *parents, last = key.split(".")
            node = data
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
    return data


def test_every_recipe_a_later_stage_rejects_is_refused_before_anything_is_created(tmp_path):
    """Property: recipes drawn at random (seeded) from the demo recipe with one to three bad values each are
    all refused with exit 2, in one line that names one of the bad fields, with nothing created under
    run_root; all before torch, transformers, TRL, vLLM or math-verify is imported (the first ~0.5 s of a
    run instead of ~7 s), those that need the model's widths included (read from its config's fields)."""
    import json
    import random

    import yaml

    from .conftest import DEMO_SMALL

    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    (tmp_path / "qat.jsonl").write_text('{"prompt": "1+1?", "response": "2"}\n')
    (tmp_path / "broken.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?" "answer": "4"}\n')
    base = yaml.safe_load(DEMO_SMALL.format(name="p", root=tmp_path / "runs", teacher_steps=60, bits="[2]",
                                            baselines="[rtn]", qat="true", qat_steps=10, save_steps=5, limit=40))
    base["export"]["formats"] = ["dequantized"]  # what KV-cache quantization needs: the kv_cache case is its group
    rng = random.Random(0)
    light = [m for m in MUTATIONS if not m[3]]
    cases = [[m] for m in MUTATIONS]  # every mutation alone, then random combinations
    cases += [rng.sample(light, rng.randint(2, 3)) for _ in range(12)]
    cases += [rng.sample(light, rng.randint(1, 2)) + [rng.choice([m for m in MUTATIONS if m[3]])] for _ in range(4)]
    paths = []
    for i, changes in enumerate(cases):
        changes = [(k, _with_tmp(v, tmp_path), f, heavy) for k, v, f, heavy in changes]
        p = tmp_path / f"r{i}.yaml"
        p.write_text(yaml.safe_dump(_mutated(base, changes)))
        paths.append((p, changes))
    res = subprocess.run([sys.executable, "-c", HARNESS, *map(str, (p for p, _ in paths))], capture_output=True,
                         text=True, timeout=600)
    results = json.loads(res.stdout.strip().splitlines()[-1])
    for (p, changes), r in zip(paths, results):
        fields = [f for _, _, f, _ in changes]
        assert r["rc"] == 2, (fields, r)
        line = r["stderr"].strip()
        assert "\n" not in line and "Traceback" not in line, (fields, line)
        assert any(line.startswith(f"error: {f}") or f"r{paths.index((p, changes))}.yaml: {f}" in line
                   for f in fields), (fields, line)
        assert r["heavy"] == [], (fields, r["heavy"])
    assert not (tmp_path / "runs").exists()  # no run directory, no lock, no recipe snapshot


def test_sizes_the_model_cannot_take_and_a_gguf_without_its_package_are_refused_first(tmp_path):
    """A real model's own limits, read from its config.json (torch-free): calibration windows longer than its
    context and a cached teacher keeping more tokens than its vocabulary; and a .gguf model id where the gguf
    package is missing says `pip install gguf` instead of ending in transformers' ImportError."""
    import json

    import yaml

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2,
        "vocab_size": 300, "max_position_embeddings": 512}))
    (tmp_path / "qat.jsonl").write_text('{"prompt": "1+1?", "response": "2"}\n')
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    base = {"name": "m", "run_root": str(tmp_path / "runs"), "model": {"id": str(model)}, "quant": {"group_size": 32},
            "calibration": {"seq_len": 256}, "qat": {"data": {"source": str(tmp_path / "qat.jsonl")}},
            "eval": {"tasks": ["math500"], "data": {"math500": str(tmp_path / "qat.jsonl")}}}
    cases = {"calibration.seq_len: 1024 tokens is over the model's context of 512": {"calibration": {"seq_len": 1024}},
             "qat.kd.cache_top_k: 400 is more tokens than the model's vocabulary of 300":
                 {"qat": {**base["qat"], "kd": {"teacher": "cached", "cache_top_k": 400}}},
             f"model.id: {tmp_path / 'm.gguf'} is a GGUF file, which transformers reads through the gguf package; "
             "pip install gguf": {"model": {"id": str(tmp_path / "m.gguf")}}}
    paths = []
    for i, change in enumerate([{}, *cases.values()]):
        paths.append(tmp_path / f"c{i}.yaml")
        paths[-1].write_text(yaml.safe_dump({**base, **change}))
    # gguf marked missing (as where it is not installed); --dry-run: the base recipe plans, nothing runs
    harness = "import sys; sys.modules['gguf'] = None\n" + HARNESS.replace('["run", path]', '["run", path, "--dry-run"]')
    res = subprocess.run([sys.executable, "-c", harness, *map(str, paths)], capture_output=True, text=True, timeout=300)
    ok, *refused = json.loads(res.stdout.strip().splitlines()[-1])
    assert ok["rc"] == 0 and ok["heavy"] == [], ok  # the base recipe itself passes, torch-free
    for expected, r in zip(cases, refused):
        line = r["stderr"].strip()
        assert r["rc"] == 2 and line.startswith(f"error: {expected}") and "\n" not in line, r
        assert r["heavy"] == [], r
    assert not (tmp_path / "runs" / "m" / "teacher").exists()


def test_a_base_model_without_a_chat_template_is_refused_before_anything_runs(tmp_path, tokenizer):
    """Every stage formats text through the chat template: a model without one (a base model, as Gemma-3-270M's
    GGUF file) is one line in the preflight, not a traceback in the calibrate stage. Read from the files: a
    local directory's tokenizer files, a GGUF file's metadata."""
    import json

    from .conftest import tiny_qwen3

    model = tmp_path / "base"
    tiny_qwen3(vocab_size=len(tokenizer)).save_pretrained(model)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(model)
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1?", "response": "2"}\n')
    rec = tmp_path / "r.yaml"
    rec.write_text(json.dumps({"name": "b", "run_root": str(tmp_path / "runs"), "model": {"id": str(model)},
                               "quant": {"group_size": 32}, "calibration": {"seq_len": 128},
                               "qat": {"data": {"source": str(tmp_path / "d.jsonl")}},
                               "eval": {"tasks": ["math500"], "data": {"math500": str(tmp_path / "d.jsonl")}}}))
    one_line_error(cli("run", str(rec)), f"model.id: {model} has no chat template (a base model?)")
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(tmp_path / "base.gguf", "llama")  # metadata only: what the check reads
    writer.add_tokenizer_model("llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    one_line_error(cli("run", str(rec), f"model.id={tmp_path / 'base.gguf'}"),
                   f"model.id: {tmp_path / 'base.gguf'} has no chat template")
    assert not (tmp_path / "runs").exists()


def test_a_hub_id_while_the_hub_cannot_be_reached_fails_at_once(tmp_path):
    """An uncached hub id with the hub unreachable (here: its endpoint a closed port on this machine) is one line
    from one connection attempt, not the hub client's five retries with backoff (27 s), --dry-run included."""
    import os
    import socket

    with socket.socket() as s:  # a free loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1?", "response": "2"}\n')
    rec = tmp_path / "hub.yaml"
    rec.write_text(f"name: hub\nrun_root: {tmp_path / 'runs'}\nmodel: {{id: org/not-cached}}\n"
                   f"qat: {{data: {{source: {tmp_path / 'd.jsonl'}}}}}\n"
                   f"eval: {{tasks: [math500], data: {{math500: {tmp_path / 'd.jsonl'}}}}}\n")
    res = cli("run", str(rec), "--dry-run", env=env)
    one_line_error(res, "model.id: 'org/not-cached' is a hub id that is not in the local cache, and 127.0.0.1 cannot "
                        "be reached")
    assert "Retry" not in res.stdout + res.stderr and not (tmp_path / "runs").exists()


def test_status_imports_no_torch(tmp_path):
    """`rqat status` reads manifests only: it answers without importing torch, transformers or the stages'
    engines (it took over a minute beside a running stage when listing the stages imported them)."""
    rec = demo_recipe(tmp_path, name="st")
    run = tmp_path / "runs" / "st"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(rec.read_text())
    code = ("import sys; from reasoning_qat.cli import main; rc = main(['status', sys.argv[1]]); "
            "print(rc, sorted(m for m in ('torch', 'transformers', 'trl', 'vllm') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
    assert res.stdout.strip().splitlines()[-1] == "0 []", res.stdout + res.stderr
    assert "teacher" in res.stdout and "missing" in res.stdout


def test_dry_run_says_what_vllm_will_not_serve_under_the_plan(tmp_path):
    """The demo's asymmetric 2-bit compressed-tensors export is valid (transformers loads it) but vLLM 0.26
    refuses zero points at 2 bits: one note under the plan, nothing created."""
    rec = demo_recipe(tmp_path, name="dry")
    res = cli("run", str(rec), "--dry-run")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("run dry in ") and "export" in lines[0]
    assert lines[1] == ("note: export.formats: the 2-bit compressed-tensors export is written, but vLLM 0.26 serves "
                        "zero points (asymmetric) only at [4, 8] bits, not 2; symmetric 2-bit is served (quant.symmetric: true)")
    assert not (tmp_path / "runs").exists()
