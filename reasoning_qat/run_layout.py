"""The run directory, the names of its variants, and where its models come from: the one module that
knows them. Stages, analysis, compare and the CLI ask these objects instead of composing paths.

    runs/<name>/
      recipe.yaml                          the recipe as last run
      .lock                                held by `rqat run` (flock)
      teacher/   model/ (demo) or model_ref.json (hub id / local path), data/{train,test}.jsonl (demo)
      calibrate/ calibration.safetensors, qat_data/ (tokenized QAT set), qat_data.jsonl (teacher-written)
      ptq/       <variant>/                 rqat quantized checkpoint, ptq_errors.json, e.g. ptq/w4-gptq
      qat/       <variant>/                 model/, qat_metrics.json, log_history.json, trainer/ (checkpoints)
      rl/        <variant>/                 model/, rl_metrics.json, log_history.json, trainer/
      export/    <variant>/<format>/        dequantized, compressed-tensors, gptq
      eval/      <variant>/<task>/          metrics.json, samples.jsonl, ce.json (held-out cross-entropy)
      compare/   compare.md, compare.json, compare.png
      analysis/  <variant>/                 analysis.json, overrides.yaml, analysis.png (rqat analyze)
    Every stage directory holds manifest.json; a stage works in .<stage>.partial/ until it is done.
    Inside a stage, a variant's directory is finished when it holds `.done` (`finish`, `finished_metrics`):
    a stage resumed after a crash keeps what it finished and reloads its metrics.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

RUN_FORMAT = 2  # manifests written from this version on carry it; older ones read as format 1
MANIFEST = "manifest.json"
RECIPE_SNAPSHOT = "recipe.yaml"
DONE_MARKER = ".done"
# each stage's per-variant record (what a resumed stage reloads instead of redoing the variant)
VARIANT_METRICS = {"ptq": "ptq_errors.json", "qat": "qat_metrics.json", "rl": "rl_metrics.json"}
EVAL_METRICS, EVAL_SAMPLES, EVAL_CE = "metrics.json", "samples.jsonl", "ce.json"


def finish(directory: Path, metrics_file: Path | None = None, metrics: dict | None = None) -> None:
    """Mark a unit of a stage's work (one variant) finished: its metrics written first (atomically), then
    the marker, so a crash between the two leaves it unfinished, never finished without its record."""
    directory.mkdir(parents=True, exist_ok=True)
    if metrics_file is not None:
        tmp = metrics_file.with_name(metrics_file.name + ".tmp")
        tmp.write_text(json.dumps(metrics, indent=1))
        tmp.replace(metrics_file)
    (directory / DONE_MARKER).write_text("")


def finished_metrics(directory: Path, metrics_file: Path | None = None, marker: Path | None = None) -> dict | None:
    """The record of a finished unit of work ({} when it keeps none), or None when it has to be (re)done.
    Finished: `marker` exists, by default the `.done` that `finish` writes in `directory` (the eval runner
    writes its metrics.json last, so eval passes that file as the marker)."""
    if not (marker or directory / DONE_MARKER).is_file():
        return None
    return json.loads(metrics_file.read_text()) if metrics_file is not None else {}


@dataclass(frozen=True, order=True)
class Variant:
    """One model of a run: a bit width and how it was made (bits 16, method bf16: the teacher)."""

    bits: int
    method: str  # bf16 | rtn | gptq | gptq_generic | qat | qat_rl | ptq_rl (GRPO straight from PTQ)

    def __str__(self) -> str:
        return "bf16" if self.method == "bf16" else f"w{self.bits}-{self.method}"

    @classmethod
    def parse(cls, name: str) -> Variant:
        """The Variant a name stands for (`bf16`, `w4-gptq`). Raises ValueError on another name."""
        if name == "bf16":
            return BF16
        m = re.fullmatch(r"w(\d+)-(\w+)", name)
        if m is None:
            raise ValueError(f"not a variant name: {name!r} (expected bf16 or w<bits>-<method>)")
        return cls(int(m.group(1)), m.group(2))


BF16 = Variant(16, "bf16")


@dataclass(frozen=True)
class ModelSource:
    """Where a model is loaded from, with every option a loader needs. The run's own artifacts
    (`at(path)`) keep the recipe's trust_remote_code, so a remote-code architecture loads in every
    stage, not only the first."""

    id: str  # hub id or local directory
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "bfloat16"
    attn_implementation: str | None = None  # None: transformers' default

    @classmethod
    def teacher(cls, layout: RunLayout, model_cfg) -> ModelSource:
        """The run's teacher with the recipe's loading options (the demo's trained model, or the recorded id)."""
        path = layout.teacher_model()
        local = model_cfg.demo is not None or Path(path).exists()
        return cls(path, None if local else model_cfg.revision, model_cfg.trust_remote_code, model_cfg.dtype,
                   model_cfg.attn_implementation)

    def at(self, path: str | Path) -> ModelSource:
        """The same options at another path (one of the run's own checkpoints)."""
        return replace(self, id=str(path), revision=None)

    def tokenizer(self):
        """The tokenizer at this source."""
        from .models import load_tokenizer

        return load_tokenizer(self.id, self.trust_remote_code, self.revision)

    def model(self, dtype=None, device: str | None = None):
        """The causal LM at this source, its QuantSpec installed when it carries one."""
        from .models import load_model, resolve_dtype

        return load_model(self.id, dtype or resolve_dtype(self.dtype), self.trust_remote_code, self.revision, device,
                          self.attn_implementation)

    def config(self):
        """The model config at this source."""
        from .models import load_config

        return load_config(self.id, self.trust_remote_code, self.revision)


class RunLayout:
    """Every path of a run. `working(stage)` gives the view a running stage writes through: its own
    directory is the partial one, every other stage's is the finished one."""

    def __init__(self, root: str | Path, working: dict[str, Path] | None = None):
        self.root = Path(root)
        self._working = working or {}

    def working(self, stage: str) -> RunLayout:
        """The layout a running `stage` writes through: its own directory is the partial one."""
        return RunLayout(self.root, {stage: self.partial(stage)})

    # ---- run level -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The run's name (its directory name)."""
        return self.root.name

    @property
    def recipe_file(self) -> Path:
        """The recipe snapshot the last `rqat run` wrote."""
        return self.root / RECIPE_SNAPSHOT

    @property
    def lock_file(self) -> Path:
        """The file `rqat run` locks (flock)."""
        return self.root / ".lock"

    def stage(self, name: str) -> Path:
        """Stage `name`'s directory (the partial one for the stage this layout works for)."""
        return self._working.get(name, self.root / name)

    def partial(self, name: str) -> Path:
        """Where stage `name` works until it is done."""
        return self.root / f".{name}.partial"

    def replaced(self, name: str) -> Path:
        """Where a finished stage waits while its re-run's result is renamed into place."""
        return self.root / f".{name}.old"

    def stage_metrics(self, name: str) -> dict:
        """The metrics a finished stage recorded in its manifest ({} when it has not finished)."""
        return (self.manifest(name) or {}).get("metrics", {})

    def manifest(self, name: str) -> dict | None:
        """The stage's manifest, or None. Read-only: a stage caught mid-rename is read from where it
        waits (`replaced`); moving it back is left to `rqat run`, under the lock."""
        for d in (self.stage(name), self.replaced(name)):
            path = d / MANIFEST
            if path.is_file():
                try:
                    return json.loads(path.read_text())
                except json.JSONDecodeError:
                    return None
        return None

    # ---- teacher ---------------------------------------------------------------------------------
    def teacher_model(self) -> str:
        """The BF16 teacher: the demo's trained model, or the recorded hub id / local path."""
        local = self.stage("teacher") / "model"
        if (local / "config.json").is_file():
            return str(local)
        return json.loads(self.teacher_ref().read_text())["path"]

    def teacher_model_dir(self) -> Path:
        """Where the demo teacher's (or a converted model's) weights are saved."""
        return self.stage("teacher") / "model"

    def teacher_ref(self) -> Path:
        """The recorded hub id / local path of a teacher that is not copied into the run."""
        return self.stage("teacher") / "model_ref.json"

    def demo_data(self) -> Path | None:
        """The demo task's data directory, or None for a run without the demo teacher."""
        d = self.stage("teacher") / "data"
        return d if d.is_dir() else None

    def demo_split(self, split: str) -> Path:
        """The demo task's problems of one split (train, test) as JSONL."""
        return self.stage("teacher") / "data" / f"{split}.jsonl"

    def teacher_trainer(self) -> Path:
        """The demo teacher's Trainer output (checkpoints)."""
        return self.stage("teacher") / "trainer"

    # ---- calibrate -------------------------------------------------------------------------------
    def calibration_file(self) -> Path:
        """The calibration sets (safetensors: main, generic)."""
        return self.stage("calibrate") / "calibration.safetensors"

    def qat_data(self) -> Path:
        """The tokenized QAT set (datasets save_to_disk)."""
        return self.stage("calibrate") / "qat_data"

    def teacher_cache(self) -> Path:
        """The cached teacher's top-k log-probabilities on the QAT set (data/teacher_cache.py)."""
        return self.stage("calibrate") / "teacher_topk"

    def teacher_responses(self) -> Path:
        """The teacher-written responses (JSONL, one line per prompt, resumable)."""
        return self.stage("calibrate") / "qat_data.jsonl"

    # ---- quantized variants ----------------------------------------------------------------------
    def ptq(self, v: Variant) -> Path:
        """The rqat checkpoint of a PTQ variant."""
        return self.stage("ptq") / str(v)

    def trained(self, v: Variant) -> Path:
        """The directory of a trained variant (qat or rl stage); its checkpoint is `model/`."""
        return self.stage("rl" if v.method.endswith("_rl") else "qat") / str(v)

    def checkpoint(self, v: Variant) -> Path:
        """The rqat quantized checkpoint of any quantized variant."""
        return self.ptq(v) if v.method in ("rtn", "gptq", "gptq_generic") else self.trained(v) / "model"

    def variant_metrics(self, stage: str, v: Variant) -> Path:
        """The per-variant record of the ptq, qat or rl stage (VARIANT_METRICS)."""
        return (self.ptq(v) if stage == "ptq" else self.trained(v)) / VARIANT_METRICS[stage]

    def trainer(self, v: Variant) -> Path:
        """The Trainer's output directory (resumable checkpoints) of a trained variant."""
        return self.trained(v) / "trainer"

    def nonfinite_steps(self, v: Variant) -> Path:
        """A trained variant's skipped non-finite-gradient steps, one JSON record per line, written as each
        happens (training.append_record): kept when the run is cut off before its metrics are."""
        return self.trained(v) / "nonfinite_steps.jsonl"

    def log_history(self, v: Variant) -> Path:
        """A trained variant's Trainer log history."""
        return self.trained(v) / "log_history.json"

    def export(self, v: Variant, fmt: str | None = None) -> Path:
        """A variant's export directory (of format `fmt`)."""
        d = self.stage("export") / str(v)
        return d / fmt if fmt else d

    def exported_variants(self) -> list[Variant]:
        """The variants the export stage wrote, in order."""
        d = self.stage("export")
        return sorted(Variant.parse(p.name) for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def eval(self, v: Variant, task: str) -> Path:
        """The eval directory of (variant, task)."""
        return self.stage("eval") / str(v) / task

    def eval_metrics(self, v: Variant, task: str) -> Path:
        """metrics.json of (variant, task): written last, so its presence means finished."""
        return self.eval(v, task) / EVAL_METRICS

    def eval_ce(self, v: Variant, task: str) -> Path:
        """The held-out cross-entropy of (variant, task) (demo tasks)."""
        return self.eval(v, task) / EVAL_CE

    def evaluated(self, stage_dir: Path | None = None) -> dict[Variant, dict[str, Path]]:
        """{variant: {task: its metrics.json}} of every finished evaluation in the eval stage's directory
        (or `stage_dir`, e.g. the partial one of an eval stage that has not finished)."""
        root, out = stage_dir or self.stage("eval"), {}
        for f in sorted(root.glob(f"*/*/{EVAL_METRICS}")):
            out.setdefault(Variant.parse(f.parent.parent.name), {})[f.parent.name] = f
        return out

    def tensorboard(self, stage: str) -> Path:
        """Where a stage that is not a Trainer (eval, compare) writes its TensorBoard events (the Trainers write
        theirs under their output directory): all inside the run, so `tensorboard --logdir RUN` finds them."""
        return self.stage(stage) / "tensorboard"

    def compare(self) -> Path:
        """The compare stage's directory."""
        return self.stage("compare")

    def compare_table(self) -> Path:
        """The compare stage's markdown table."""
        return self.stage("compare") / "compare.md"

    def analysis(self, v: Variant) -> Path:
        """`rqat analyze`'s output directory for a variant."""
        return self.root / "analysis" / str(v)
