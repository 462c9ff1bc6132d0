"""The `rqat` command line: recipe overrides, the generated key list, one-line errors."""

import json

import yaml

from reasoning_qat import cli
from reasoning_qat.recipe_reference import recipe_fields, reference_markdown

from .conftest import ROOT, write_recipe


def _local_recipe(tmp_path, model_dir) -> object:
    data = tmp_path / "traces.jsonl"
    data.write_text(json.dumps({"prompt": "1+1?", "response": "<think>1+1=2</think>\\boxed{2}", "answer": "2"}) + "\n")
    return write_recipe(tmp_path / "local.yaml", f"""
name: local
run_root: {tmp_path / 'runs'}
model: {{id: {model_dir}, dtype: float32}}
quant: {{bits: [4], group_size: 32}}
calibration: {{seq_len: 128}}  # within the tiny model's context of 256
qat: {{data: {{source: {data}}}}}
eval: {{tasks: [math500], data: {{math500: {data}}}}}
""")


def test_overrides_are_typed_checked_and_recorded_in_the_run(tmp_path, saved_tiny):
    rec = _local_recipe(tmp_path, saved_tiny)
    assert cli.main(["run", str(rec), "seed=7", "quant.bits=[2, 3]", "calibration.num_samples=3", "--stages", "teacher"]) == 0
    run = tmp_path / "runs" / "local"
    snapshot = yaml.safe_load((run / "recipe.yaml").read_text())
    assert (snapshot["seed"], snapshot["quant"]["bits"], snapshot["calibration"]["num_samples"]) == (7, [2, 3], 3)
    assert yaml.safe_load(rec.read_text()).get("seed") is None  # the file itself is not touched
    # `rqat status` reads the run through its snapshot: the overridden run's teacher is done there
    from reasoning_qat.pipeline import Pipeline, recipe_from_run
    from reasoning_qat.stages import STAGES

    assert Pipeline(recipe_from_run(run), STAGES, run_dir=run).status("teacher") == "done"


def test_a_bad_override_is_one_line_and_creates_nothing(tmp_path, saved_tiny, capsys):
    rec = _local_recipe(tmp_path, saved_tiny)
    for args, expected in ((["qat.max_stepz=3"], "qat.max_stepz: unknown key"),
                           (["qat.max_steps=-1"], "qat.max_steps: Input should be greater than or equal to 1 (got -1)"),
                           (["name.x=1"], "name.x: name is a value ('local'), not a section"),
                           (["quant.bits"], "'quant.bits': an override is KEY=VALUE"),
                           (["quant.bits=[2"], "quant.bits: the value '[2' is not valid YAML")):
        assert cli.main(["run", str(rec), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0, (args, err)
    assert not (tmp_path / "runs").exists()


def test_run_help_lists_every_recipe_key(capsys):
    try:
        cli.main(["run", "--help"])
    except SystemExit as done:
        assert done.code == 0
    text = " ".join(capsys.readouterr().out.split())
    keys = [f.key for f in recipe_fields() if f.type != "section"]
    assert len(keys) > 100
    assert [k for k in keys if k not in text] == []


def test_readme_recipe_reference_is_generated():
    """The README's recipe table is the schema's: regenerate it with
    `python -m reasoning_qat.recipe_reference --write docs/recipe-reference.md`."""
    assert reference_markdown() in (ROOT / "docs" / "recipe-reference.md").read_text()


def test_every_recipe_field_is_described():
    assert [f.key for f in recipe_fields() if not f.description] == []
