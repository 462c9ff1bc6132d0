"""Staged pipeline: plan, staleness, --stages, atomic stages, and resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from reasoning_qat.pipeline import Pipeline, Stage
from reasoning_qat.recipe import RecipeError, parse_recipe

from .conftest import demo_recipe


def toy_pipeline(tmp_path, calls, fail_at=None, recipe_extra=None):
    """Three cheap stages over a real recipe, to test the engine without training anything."""

    def make(name):
        def run(ctx):
            calls.append(name)
            (ctx.out / "artifact.txt").write_text(name)
            if fail_at == name:
                raise RuntimeError(f"boom in {name}")
            return {"value": len(calls)}
        return run

    data = {"name": "toy", "run_root": str(tmp_path / "runs"), "model": {"id": "a"}, **(recipe_extra or {})}
    stages = [
        Stage("a", make("a"), (), ("model",)),
        Stage("b", make("b"), ("a",), ("quant",)),
        Stage("c", make("c"), ("b",), ("eval",), enabled=lambda r: r.qat.enabled),
    ]
    return Pipeline(parse_recipe(data), stages)


def test_runs_missing_then_nothing(tmp_path):
    calls = []
    p = toy_pipeline(tmp_path, calls)
    assert p.run() == ["a", "b", "c"]
    assert p.run() == []
    m = json.loads((tmp_path / "runs/toy/b/manifest.json").read_text())
    assert m["status"] == "done" and m["inputs"]["a"] == json.loads((tmp_path / "runs/toy/a/manifest.json").read_text())["fingerprint"]
    assert "torch" in m["versions"] and m["metrics"]["value"] == 2


def test_changed_section_reruns_that_stage_and_downstream(tmp_path):
    calls = []
    toy_pipeline(tmp_path, calls).run()
    calls.clear()
    p = toy_pipeline(tmp_path, calls, recipe_extra={"quant": {"bits": 3}})
    assert [p.status(s) for s in "abc"] == ["done", "stale", "stale"]
    p.run()
    assert calls == ["b", "c"]


def test_stages_option_and_missing_input(tmp_path):
    calls = []
    p = toy_pipeline(tmp_path, calls)
    with pytest.raises(RecipeError, match="--stages: b needs the a stage, which has not run"):
        p.run(["b"])
    assert calls == [] and not (tmp_path / "runs/toy/b").exists()
    # every missing input at once, the ones it needs through others too, and the command that runs them
    with pytest.raises(RecipeError, match=r"--stages: c needs the a, b stages, which have not run in .*"
                                          r"`rqat run RECIPE --stages a,b,c`"):
        p.run(["c"])
    with pytest.raises(RecipeError, match="unknown stage 'zz'"):
        p.plan(["zz"])
    p.run()
    calls.clear()
    p.run(["b"])
    assert calls == ["b"]
    assert p.status("c") == "stale"  # its input changed


def test_disabled_stage_is_skipped_and_refused(tmp_path):
    calls = []
    p = toy_pipeline(tmp_path, calls, recipe_extra={"qat": {"enabled": False}})
    assert p.run() == ["a", "b"]
    with pytest.raises(RecipeError, match="stage 'c' is disabled"):
        p.run(["c"])


def test_failed_stage_leaves_no_done_directory_and_keeps_the_old_one(tmp_path):
    calls = []
    toy_pipeline(tmp_path, calls).run()
    old = (tmp_path / "runs/toy/b/manifest.json").read_text()
    p = toy_pipeline(tmp_path, calls, fail_at="b", recipe_extra={"quant": {"bits": 2}})
    with pytest.raises(RuntimeError, match="boom in b"):
        p.run()
    assert (tmp_path / "runs/toy/b/manifest.json").read_text() == old  # earlier result untouched
    assert (tmp_path / "runs/toy/.b.partial/artifact.txt").exists()  # partial work kept for resume
    assert p.status("b") == "stale"


def _wait_for(predicate, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_kill_mid_qat_then_resume_matches_uninterrupted(tmp_path):
    """Kill the real CLI once QAT has written a checkpoint; re-running resumes only the unfinished
    stages, continues from the checkpoint, and ends where an uninterrupted run ends."""
    steps = dict(teacher_steps=40, qat_steps=30, save_steps=10, limit=20)
    base = demo_recipe(tmp_path, name="straight", **steps)
    subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(base)], check=True, capture_output=True)

    rec = demo_recipe(tmp_path, name="killed", **steps)
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = run_dir / ".qat.partial" / "w2-qat" / "trainer" / "checkpoint-10" / "trainer_state.json"
    assert _wait_for(ckpt.exists, 900), "QAT never wrote its first checkpoint"  # a bound, not a wait: 2 workers share 2 cores
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "qat").exists()
    done_before = {s: (run_dir / s / "manifest.json").read_text() for s in ("teacher", "calibrate", "ptq")}

    out = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec)], check=True, capture_output=True, text=True)
    assert "qat, export, eval" in out.stdout.splitlines()[0]  # only the unfinished stages
    assert "resuming" in out.stdout
    for s, text in done_before.items():
        assert (run_dir / s / "manifest.json").read_text() == text

    def final(run):
        log = json.loads((tmp_path / "runs" / run / "qat" / "w2-qat" / "log_history.json").read_text())
        return [h["loss"] for h in log if "loss" in h][-1]

    assert final("killed") == pytest.approx(final("straight"), rel=1e-4)
    a = json.loads((tmp_path / "runs/killed/eval/manifest.json").read_text())["metrics"]["w2-qat"]
    b = json.loads((tmp_path / "runs/straight/eval/manifest.json").read_text())["metrics"]["w2-qat"]
    assert a == b
    status = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "status", str(run_dir)], capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.count("done") >= 6


def test_a_second_run_on_a_busy_run_directory_is_refused(tmp_path):
    from reasoning_qat.pipeline import run_lock

    rec = demo_recipe(tmp_path, name="busy")
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    with run_lock(run_dir):
        out = subprocess.run([sys.executable, "-m", "reasoning_qat.cli", "run", str(rec)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {run_dir} is in use by another rqat run (pid {os.getpid()}); wait for it to finish or stop it, then re-run"
    assert not (run_dir / "teacher").exists()


def test_a_demo_teacher_with_its_own_seed_is_shared_by_runs_of_other_seeds():
    """model.demo.seed set: the teacher stage does not depend on the run's seed (two seeds share one
    teacher, and a copy of it is accepted); unset, it does. QAT depends on the run's seed either way."""
    from reasoning_qat.stages import STAGES

    def hashes(seed, demo_seed):
        demo = {"train_steps": 5} | ({"seed": demo_seed} if demo_seed is not None else {})
        p = Pipeline(parse_recipe({"name": "s", "seed": seed, "model": {"demo": demo}}), STAGES)
        return p.recipe_hash("teacher"), p.recipe_hash("qat")

    assert hashes(0, 0)[0] == hashes(1, 0)[0] and hashes(0, 0)[1] != hashes(1, 0)[1]
    assert hashes(0, None)[0] != hashes(1, None)[0]
    assert hashes(0, 0)[0] != hashes(0, 1)[0]


def test_rl_from_ptq_depends_on_ptq_not_qat():
    from reasoning_qat.stages import STAGES

    base = {"name": "r", "model": {"demo": {}}, "rl": {"enabled": True}}
    p = Pipeline(parse_recipe(base), STAGES)
    assert p.active_deps("rl") == ["teacher", "qat"]
    q = Pipeline(parse_recipe(base | {"qat": {"enabled": False}, "rl": {"enabled": True, "init": "ptq"}}), STAGES)
    assert q.active_deps("rl") == ["teacher", "ptq"] and not q.enabled("qat")
    # which PTQ checkpoint RL starts from is part of what the rl stage means
    r = Pipeline(parse_recipe(base | {"qat": {"enabled": False}, "ptq": {"method": "rtn"},
                                      "rl": {"enabled": True, "init": "ptq"}}), STAGES)
    assert r.recipe_hash("rl") != q.recipe_hash("rl")
