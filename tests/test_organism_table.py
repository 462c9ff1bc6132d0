"""benchmarks/organism_table.py: seeds pooled per problem, and the findings' reading."""

import importlib.util
import math

from .conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("organism_table", ROOT / "benchmarks" / "organism_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seeds_pool_per_problem():
    t = _module()
    seed0 = {"a": [1], "b": [0], "c": [1], "d": [1]}
    seed1 = {"a": [1], "b": [1], "c": [0], "d": [1]}
    mean, ci = t.pooled([seed0, seed1])
    vals = [1.0, 0.5, 0.5, 1.0]  # each problem's mean over the two seeds
    sd = math.sqrt(sum((v - 0.75) ** 2 for v in vals) / 3)
    assert mean == 0.75 and abs(ci - 1.96 * sd / 2) < 1e-12


def test_a_difference_inside_the_combined_interval_is_not_separated():
    t = _module()
    assert t.compare_rows({"mean": 0.95, "ci": 0.01}, {"mean": 0.90, "ci": 0.01}).endswith("holds")
    assert t.compare_rows({"mean": 0.90, "ci": 0.01}, {"mean": 0.95, "ci": 0.01}).endswith("reversed")
    assert t.compare_rows({"mean": 0.95, "ci": 0.04}, {"mean": 0.93, "ci": 0.04}).endswith("not separated")
    assert t.compare_rows(None, {"mean": 0.9, "ci": 0.0}) == "not measured"


def test_variant_overrides_set_nested_keys_parsed_as_yaml():
    spec = importlib.util.spec_from_file_location("organism_runs", ROOT / "benchmarks" / "organism_runs.py")
    runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runs)
    base = {"name": "o", "qat": {"kd": {"loss": "forward_kl"}}, "eval": {"tasks": ["demo_arith"]}}
    out = runs.apply_overrides(base, ["qat.kd.loss=ce", "eval.methods=[qat]", "rl.enabled=false", "seed=1"])
    assert out == {"name": "o", "qat": {"kd": {"loss": "ce"}}, "eval": {"tasks": ["demo_arith"], "methods": ["qat"]},
                   "rl": {"enabled": False}, "seed": 1}
    assert base["qat"]["kd"]["loss"] == "forward_kl"  # the base recipe is left as it was
