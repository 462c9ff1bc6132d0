"""The Python API (reasoning_qat/api.py): the README's example, run on a smaller demo."""

import re

import pytest
import torch

from .conftest import ROOT, demo_recipe


def test_the_readme_example_runs(tmp_path, capsys, monkeypatch):
    import reasoning_qat as rq
    from reasoning_qat.errors import UserError
    from reasoning_qat.quant import fake_quant_modules

    block = re.search(r"### Python API.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    rec = demo_recipe(tmp_path, bits="[2]", shared_teacher=True)
    monkeypatch.chdir(tmp_path)  # nothing of the example lands in the checkout
    exec(block.replace('"recipes/demo.yaml"', repr(str(rec))), {})  # noqa: S102 (the README's own code)
    assert re.search(r"^BF16 pass@1 \d\.\d{3} ± \d\.\d{3}$", capsys.readouterr().out, re.MULTILINE)
    run_dir = tmp_path / "runs" / "demo-api"  # the example's own run, not the recipe's
    snapshot = (run_dir / "recipe.yaml").read_text()
    assert "- 4" in snapshot and (run_dir / "ptq" / "w4-gptq").is_dir()  # the override, recorded
    model = rq.load(run_dir, "w4-gptq", device="cpu")
    assert len(fake_quant_modules(model)) == 14 and all(m.scheme.bits == 4 for m in fake_quant_modules(model).values())
    teacher = rq.load(run_dir, "bf16", device="cpu")
    ids = torch.randint(3, 40, (1, 16))
    with torch.no_grad():
        assert (model(ids).logits - teacher(ids).logits.float()).abs().max() > 0  # the quantized function
    with pytest.raises(UserError, match="no w2-qat checkpoint"):
        rq.load(run_dir, "w2-qat")
    # the same call again would re-train its teacher and re-quantize: refused, the run untouched
    manifests = {p: p.read_bytes() for p in run_dir.glob("*/manifest.json")}
    with pytest.raises(UserError, match=r"finished teacher, calibrate, ptq stages would be run again.*replace=True"):
        rq.run(rec, stages=["teacher", "calibrate", "ptq"], overrides={"name": "demo-api", "quant.bits": [4]})
    with pytest.raises(UserError, match=r"finished ptq stage would be run again"):  # another recipe: ptq goes stale
        rq.run(rec, stages=["ptq"], overrides={"name": "demo-api", "quant.bits": [3]})
    assert {p: p.read_bytes() for p in run_dir.glob("*/manifest.json")} == manifests


def test_a_bad_override_creates_nothing(tmp_path):
    import reasoning_qat as rq
    from reasoning_qat.recipe import RecipeError

    rec = demo_recipe(tmp_path, name="bad")
    with pytest.raises(RecipeError, match="quant.bits"):
        rq.run(rec, overrides={"quant.bits": [5]})
    assert not (tmp_path / "runs").exists()
