"""The run directory as one module sees it: variant names, staleness that survives schema changes,
old runs that still read, reads that never write, and compare as a stage."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from pydantic import Field, create_model

from reasoning_qat.pipeline import Pipeline, recipe_from_run
from reasoning_qat.recipe import QATConfig, Recipe, load_recipe
from reasoning_qat.run_layout import BF16, RUN_FORMAT, RunLayout, Variant
from reasoning_qat.stages import STAGES

from .conftest import demo_recipe


def cli(*args):
    return subprocess.run([sys.executable, "-m", "reasoning_qat.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("v", [Variant(4, "gptq"), Variant(2, "gptq_generic"), Variant(3, "qat_rl"), BF16])
def test_variant_names_round_trip(v):
    assert Variant.parse(str(v)) == v
    assert str(Variant(4, "gptq")) == "w4-gptq" and str(BF16) == "bf16"
    with pytest.raises(ValueError, match="not a variant name"):
        Variant.parse("w4gptq")


def test_layout_paths_and_the_working_view(tmp_path):
    lay = RunLayout(tmp_path / "run")
    v = Variant(3, "qat")
    assert lay.checkpoint(v) == tmp_path / "run" / "qat" / "w3-qat" / "model"
    assert lay.checkpoint(Variant(3, "rtn")) == tmp_path / "run" / "ptq" / "w3-rtn"
    assert lay.checkpoint(Variant(3, "qat_rl")) == tmp_path / "run" / "rl" / "w3-qat_rl" / "model"
    assert lay.export(v, "compressed-tensors") == tmp_path / "run" / "export" / "w3-qat" / "compressed-tensors"
    work = lay.working("qat")  # the running stage writes into its partial directory, reads the others finished
    assert work.checkpoint(v) == tmp_path / "run" / ".qat.partial" / "w3-qat" / "model"
    assert work.ptq(Variant(3, "gptq")) == tmp_path / "run" / "ptq" / "w3-gptq"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout")
    rec = demo_recipe(tmp, name="lay", teacher_steps=20, bits="[4]", baselines="[]", qat_steps=2, limit=5)
    out = cli("run", str(rec))
    assert out.returncode == 0, out.stderr[-2000:]
    return rec, tmp / "runs" / "lay"


def test_compare_is_a_stage_with_a_manifest(small_run):
    rec, run = small_run
    m = json.loads((run / "compare" / "manifest.json").read_text())
    assert m["status"] == "done" and m["run_format"] == RUN_FORMAT and (run / "compare" / "compare.md").is_file()
    assert m["inputs"]["eval"] == json.loads((run / "eval" / "manifest.json").read_text())["fingerprint"]
    assert all(row["status"] == "done" for row in Pipeline(load_recipe(rec), STAGES).status_rows() if row["stage"] != "rl")


def test_a_new_defaulted_field_leaves_finished_stages_done(small_run):
    rec, run = small_run
    data = yaml.safe_load(rec.read_text())
    # Tomorrow's schema: the qat section grows a knob with a default.
    NewQAT = create_model("QATConfigNext", __base__=QATConfig, new_knob=(int, 3))
    NewRecipe = create_model("RecipeNext", __base__=Recipe, qat=(NewQAT, Field(default_factory=NewQAT)))
    recipe = NewRecipe.model_validate(data)
    assert recipe.qat.new_knob == 3
    pipe = Pipeline(recipe, STAGES)
    assert {r["stage"]: r["status"] for r in pipe.status_rows()}["qat"] == "done"
    assert pipe.plan() == []
    # ...while setting it to something else is a change of meaning.
    changed = NewRecipe.model_validate({**data, "qat": {**data["qat"], "new_knob": 4}})
    assert Pipeline(changed, STAGES).plan() == ["qat", "export", "eval", "compare"]


def test_a_run_written_before_the_run_format_still_reads(small_run, tmp_path):
    """Format-1 manifests (no run_format, every field hashed) are judged by their own hash; a recipe
    snapshot with a key this version dropped still reads."""
    rec, run = small_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    recipe = recipe_from_run(old)
    pipe = Pipeline(recipe.model_copy(update={"run_root": str(tmp_path)}), STAGES)
    for stage in pipe.order:
        path = old / stage / "manifest.json"
        if path.is_file():
            m = json.loads(path.read_text())
            del m["run_format"]
            m["recipe_hash"] = pipe.recipe_hash(stage, run_format=1)
            path.write_text(json.dumps(m))
    snap = yaml.safe_load((old / "recipe.yaml").read_text())
    snap["qat"]["knob_from_an_older_version"] = 1
    (old / "recipe.yaml").write_text(yaml.safe_dump(snap))
    res = cli("status", str(old))
    assert res.returncode == 0, res.stderr
    assert "stale" not in res.stdout and res.stdout.count("done") >= 7


def test_status_never_writes_and_run_recovers_an_interrupted_rename(small_run, tmp_path):
    rec, run = small_run
    crashed = tmp_path / "runs" / "lay"
    shutil.copytree(run, crashed)
    (crashed / "ptq").rename(crashed / ".ptq.old")  # killed between moving the old result away and the new one in
    before = sorted(p.name for p in crashed.iterdir())
    res = cli("status", str(crashed))
    assert res.returncode == 0 and "partial" not in res.stdout
    assert sorted(p.name for p in crashed.iterdir()) == before  # nothing renamed by a read
    text = rec.read_text().replace(str(run.parent), str(crashed.parent))
    (tmp_path / "r.yaml").write_text(text)
    res = cli("run", str(tmp_path / "r.yaml"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert (crashed / "ptq" / "manifest.json").is_file() and not (crashed / ".ptq.old").exists()
    assert "nothing to do" in res.stdout
    assert "| run | task | bits | method | pass@1 |" in res.stdout  # a finished run shows its table again


def test_status_can_tell_a_run_in_progress_from_a_crashed_one(tmp_path):
    """`rqat status` says a run holds the lock (its partial stage is being written now); a lock file
    left by a run that ended names no one."""
    import os

    from reasoning_qat.pipeline import lock_holder, run_lock

    assert lock_holder(tmp_path) is None
    with run_lock(tmp_path):
        assert lock_holder(tmp_path) == str(os.getpid())
    assert (tmp_path / ".lock").is_file() and lock_holder(tmp_path) is None


def test_the_attention_kernel_changes_how_not_what(small_run):
    """model.attn_implementation reaches every loader (the teacher, the run's checkpoints, the fake-quant
    checkpoint, the transformers eval backend), computes the same function to rounding, and marks no
    finished stage stale."""
    import torch

    from reasoning_qat.evaluation.backends import EngineSettings, TransformersBackend
    from reasoning_qat.quant.formats import load_quantized_checkpoint
    from reasoning_qat.run_layout import ModelSource
    from reasoning_qat.stages.specs import engine_settings

    rec, run = small_run
    data = yaml.safe_load(rec.read_text())
    data["model"]["attn_implementation"] = "eager"
    recipe = Recipe.model_validate(data)
    assert Pipeline(recipe, STAGES).plan() == []  # nothing to re-run
    export = str(run / "export" / "w4-gptq" / "dequantized")

    def loaded(model_cfg, settings):
        """The teacher, the teacher again through ModelSource.at, the fake-quant checkpoint, the eval backend's model."""
        src = ModelSource.teacher(RunLayout(run), model_cfg)
        return [src.model(torch.float32), src.at(run / "teacher" / "model").model(torch.float32),
                load_quantized_checkpoint(run / "ptq" / "w4-gptq", attn_implementation=model_cfg.attn_implementation),
                TransformersBackend(export, device="cpu", settings=settings).model]

    eager = loaded(recipe.model, engine_settings(recipe))
    default = loaded(load_recipe(rec).model, EngineSettings())
    assert [m.config._attn_implementation for m in eager] == ["eager"] * 4
    assert [m.config._attn_implementation for m in default] == ["sdpa"] * 4
    x = torch.randint(0, 100, (2, 24))
    mask = torch.ones_like(x)
    mask[1, :5] = 0  # left padding: the masked path of both kernels
    with torch.no_grad():
        for a, b in zip(eager, default):
            torch.testing.assert_close(a(x, attention_mask=mask).logits[:, 5:], b(x, attention_mask=mask).logits[:, 5:],
                                       atol=1e-4, rtol=1e-4)
