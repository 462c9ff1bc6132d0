"""The staged pipeline: which stages run, in what order, and the run directory they share.

Each stage writes into `runs/<name>/.<stage>.partial/` and, on success, a `manifest.json` is written
and the directory is renamed to `runs/<name>/<stage>/`: a crash never leaves a half stage that looks
done, and a stage that crashed resumes from what its partial directory holds (QAT checkpoints,
finished eval variants). A stage is stale when what it depends on changed in meaning: a recipe value
that was set or changed (fields left at their defaults are not hashed, so a new defaulted field in
the schema leaves finished stages done), the stage's own version (bumped when its code changes what
a recipe means), or an input stage. Reading a run (status, plan) never writes to it; a rename that a
crash interrupted is finished only by `rqat run`, under the run lock. Paths: run_layout.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .errors import UserError
from .recipe import Recipe, RecipeError, parse_recipe
from .run_layout import MANIFEST, RUN_FORMAT, RunLayout


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One `rqat run` per run directory at a time: two would write the same partial stages. The
    lock is the kernel's (flock), so a killed run never leaves it behind, and the holder's pid sits in the
    locked file itself (`lock_holder`), which filelock's lock file does not keep."""
    path = RunLayout(run_dir).lock_file
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise StageFailed(f"{run_dir} is in use by another rqat run (pid {f.read().strip() or '?'}); wait for it "
                              "to finish or stop it, then re-run") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(run_dir: Path) -> str | None:
    """The pid written by the `rqat run` that holds the run's lock now, or None when no run holds it
    (the kernel releases a killed run's lock, so a stale pid in the file is not reported)."""
    path = RunLayout(run_dir).lock_file
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "?"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


class StageFailed(UserError):
    """A stage stopped for a reason its message explains in one line (e.g. a launched child failed)."""


@dataclass
class StageContext:
    """What a stage's run function gets: the recipe, the run directory, its own working directory `out`, its
    input stages' finished directories."""
    recipe: Recipe
    run_dir: Path
    out: Path  # the stage's working directory (renamed into place on success)
    inputs: dict[str, Path]  # input stage name -> its finished directory
    metrics: dict = field(default_factory=dict)
    stage: str = ""

    @property
    def layout(self) -> RunLayout:
        """Paths as this stage sees them: its own output in `out`, every other stage finished."""
        return RunLayout(self.run_dir, {self.stage: self.out} if self.stage else {})

    def input(self, stage: str) -> Path:
        """The finished directory of input stage `stage`. Raises RuntimeError for a stage that is not an
        input."""
        if stage not in self.inputs:
            raise RuntimeError(f"stage input {stage!r} is not available")
        return self.inputs[stage]


@dataclass(frozen=True)
class Stage:
    """One stage: its run function, the stages it reads, the recipe keys it depends on (hashed), whether the
    recipe enables it, its version."""
    name: str
    run: Callable[[StageContext], dict | None]
    deps: tuple[str, ...] | Callable[[Recipe], tuple[str, ...]]  # stages whose outputs it reads
    recipe_keys: tuple[str, ...] | Callable[[Recipe], tuple[str, ...]]  # the recipe fields it depends on
    enabled: Callable[[Recipe], bool] = lambda r: True
    help: str = ""
    version: int = 1  # bump when the stage's code changes what a recipe means: finished runs go stale


def package_versions() -> dict[str, str]:
    """Versions of python and the packages that change results, for each manifest."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("reasoning-qat", "torch", "transformers", "accelerate", "trl", "peft", "deepspeed", "vllm", "math-verify"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


class Pipeline:
    """The stages of a recipe over one run directory: status, plan and run (see the module docstring)."""
    def __init__(self, recipe: Recipe, stages: list[Stage], console=None, run_dir: Path | None = None):
        self.recipe = recipe
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.run_dir = Path(run_dir) if run_dir else recipe.run_dir  # a run read where it lies (moved or renamed)
        self.layout = RunLayout(self.run_dir)
        self.console = console

    # ---- state (read-only) ------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        """The finished directory of stage `name`."""
        return self.layout.stage(name)

    def partial_dir(self, name: str) -> Path:
        """The directory stage `name` works in until it is done."""
        return self.layout.partial(name)

    def enabled(self, name: str) -> bool:
        """Whether the recipe runs stage `name`."""
        return self.stages[name].enabled(self.recipe)

    def manifest(self, name: str) -> dict | None:
        """Stage `name`'s manifest, or None when it has not finished."""
        return self.layout.manifest(name)

    def recipe_hash(self, name: str, run_format: int = RUN_FORMAT) -> str:
        """The hash of the recipe values stage `name` depends on (and its version), as its manifest records
        it."""
        stage = self.stages[name]
        keys = stage.recipe_keys(self.recipe) if callable(stage.recipe_keys) else stage.recipe_keys
        if run_format < 2:  # manifests written before run format 2 hashed every field, defaults included
            return self.recipe.section_hash(*keys, exclude_defaults=False)
        return self.recipe.section_hash(*keys, f"version={stage.version}")

    def active_deps(self, name: str) -> list[str]:
        """The enabled stages stage `name` reads."""
        deps = self.stages[name].deps
        return [d for d in (deps(self.recipe) if callable(deps) else deps) if self.enabled(d)]

    def status(self, name: str) -> str:
        """done | stale | missing | partial | disabled"""
        if not self.enabled(name):
            return "disabled"
        manifest = self.manifest(name)
        if manifest is None:
            return "partial" if self.partial_dir(name).exists() else "missing"
        if manifest.get("recipe_hash") != self.recipe_hash(name, manifest.get("run_format", 1)):
            return "stale"
        for dep in self.active_deps(name):
            dep_manifest = self.manifest(dep)
            if dep_manifest is None or manifest.get("inputs", {}).get(dep) != dep_manifest.get("fingerprint"):
                return "stale"
            if self.status(dep) == "stale":
                return "stale"
        return "done"

    def _recover(self) -> None:
        """Finish renames a crash interrupted (old moved away, new not yet in place). Under the lock."""
        for name in self.order:
            old, final = self.layout.replaced(name), self.layout.stage(name)
            if old.exists() and not final.exists():
                old.rename(final)

    # ---- running --------------------------------------------------------------------------------
    def plan(self, only: list[str] | None = None, force: bool = False) -> list[str]:
        """The stages to run, in order: `only` (and compare after eval), or every missing, stale or downstream
        stage. Raises RecipeError for an unknown or disabled stage, or one whose input never ran."""
        if only:
            unknown = [s for s in only if s not in self.stages]
            if unknown:
                raise RecipeError(f"--stages: unknown stage {unknown[0]!r} (stages: {', '.join(self.order)})")
            disabled = [s for s in only if not self.enabled(s)]
            if disabled:
                raise RecipeError(f"--stages: stage {disabled[0]!r} is disabled in the recipe ({disabled[0]}.enabled: false)")
            if "eval" in only and "compare" in self.stages:
                only = [*only, "compare"]  # the table follows the numbers it shows
            chosen = [s for s in self.order if s in only]
            if missing := self._missing_inputs(chosen):  # all of them at once, not one per try
                names = ", ".join(missing)
                raise RecipeError(
                    f"--stages: {', '.join(chosen)} need{'s' if len(chosen) == 1 else ''} the {names} "
                    f"stage{'s' if len(missing) > 1 else ''}, which {'have' if len(missing) > 1 else 'has'} not run in "
                    f"{self.run_dir}; run `rqat run RECIPE --stages {','.join(missing + chosen)}` or `rqat run RECIPE`")
            return chosen
        chosen = []
        for s in self.order:
            if not self.enabled(s):
                continue
            if force or self.status(s) != "done" or any(d in chosen for d in self.active_deps(s)):
                chosen.append(s)
        return chosen

    def _missing_inputs(self, chosen: list[str]) -> list[str]:
        """The stages, in order, that `chosen` needs (transitively) and that neither ran nor are chosen."""
        missing, todo = set(), list(chosen)
        while todo:
            for dep in self.active_deps(todo.pop()):
                if dep not in chosen and dep not in missing and self.manifest(dep) is None:
                    missing.add(dep)
                    todo.append(dep)
        return [s for s in self.order if s in missing]

    def finished_in(self, chosen: list[str]) -> list[str]:
        """The stages of a plan that finished before: running the plan replaces their results."""
        return [s for s in chosen if self.manifest(s) is not None]

    def run(self, only: list[str] | None = None, force: bool = False) -> list[str]:
        """Run the plan under the run lock; each stage in its partial directory, renamed into place after its
        manifest. Returns the stages run. Raises StageFailed when another run holds the lock."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(self.run_dir):  # plan under the lock: another run may have just finished stages
            self._recover()
            chosen = self.plan(only, force)
            self.layout.recipe_file.write_text(yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))
            for name in chosen:
                self._run_stage(name, fresh=force)
        return chosen

    def _run_stage(self, name: str, fresh: bool) -> None:
        stage = self.stages[name]
        partial = self.partial_dir(name)
        if fresh and partial.exists():
            shutil.rmtree(partial)
        resuming = partial.exists()
        partial.mkdir(parents=True, exist_ok=True)
        inputs = {d: self.stage_dir(d) for d in self.active_deps(name)}
        ctx = StageContext(self.recipe, self.run_dir, partial, inputs, stage=name)
        self._say(f"[bold cyan]stage {name}[/]" + (" (resuming)" if resuming else ""))
        started = time.time()
        metrics = stage.run(ctx) or {}
        manifest = {
            "stage": name,
            "status": "done",
            "run_format": RUN_FORMAT,
            "recipe_hash": self.recipe_hash(name),
            "inputs": {d: self.manifest(d)["fingerprint"] for d in inputs},
            "versions": package_versions(),
            "metrics": {**ctx.metrics, **metrics},
            "wall_time_s": round(time.time() - started, 2),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        manifest["fingerprint"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        final, old = self.stage_dir(name), self.layout.replaced(name)
        if final.exists():
            final.rename(old)
        partial.rename(final)
        if old.exists():
            shutil.rmtree(old)
        self._say(f"  [green]done[/] {name} in {manifest['wall_time_s']:.1f}s")

    def _say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    def status_rows(self) -> list[dict]:
        """One row per stage for `rqat status`: status, wall time, finish time, notes."""
        rows = []
        for name in self.order:
            manifest = self.manifest(name) or {}
            rows.append({
                "stage": name,
                "status": self.status(name),
                "wall_time_s": manifest.get("wall_time_s"),
                "finished_at": manifest.get("finished_at"),
                "notes": stage_notes(manifest),
            })
        return rows


def stage_notes(manifest: dict) -> str:
    """What a stage's manifest says that a user should see in `rqat status` (the QAT data's fate)."""
    data = manifest.get("metrics", {}).get("qat_data")
    if not data:
        return ""
    dropped = ", ".join(f"{n} {why}" for why, n in data["dropped"].items()) or "none"
    t = data["tokens"]
    return (f"qat data: {data['kept']} of {data['rows']} kept ({data['select']}), {data['truncated']} truncated, dropped: {dropped}; "
            f"tokens p50 {t['p50']} / p90 {t['p90']} / max {t['max']} (max_length {t['max_length']})")


def recipe_from_run(run_dir: str | Path) -> Recipe:
    """The recipe a run was made with. Keys that this version no longer has (renamed or removed
    fields of an older run format) are dropped rather than refused, so `rqat status` can still read
    an old run; the stages they fed then show as stale."""
    path = RunLayout(run_dir).recipe_file
    if not path.is_file():
        raise RecipeError(f"{run_dir}: not a run directory (no {path.name}); give the path runs/<name>")
    data = yaml.safe_load(path.read_text())
    return parse_recipe(_known_keys(data, Recipe) if isinstance(data, dict) else data, str(path))


def _known_keys(data: dict, model) -> dict:
    """`data` without the keys `model` (a pydantic section) does not define, recursively."""
    out = {}
    for key, value in data.items():
        f = model.model_fields.get(key)
        if f is None:
            continue
        sub = f.annotation
        sub = next((a for a in getattr(sub, "__args__", ()) if isinstance(a, type) and hasattr(a, "model_fields")), sub)
        out[key] = _known_keys(value, sub) if isinstance(value, dict) and hasattr(sub, "model_fields") else value
    return out
