"""The run directory, the names of its variants, and where its models come from: the one module that
knows them. Stages, analysis, compare and the CLI ask these objects instead of composing paths.

    runs/<name>/
      recipe.yaml                          the recipe as last run
      .lock                                held by `rqat run` (flock)
      teacher/   model/ (demo) or model_ref.json (hub id / local path), data/{train,test}.jsonl (demo)
      calibrate/ calibration.safetensors, qat_data/ (tokenized QAT set), qat_data.jsonl (teacher-written)
      ptq/       <variant>/                 rqat quantized checkpoints, e.g. ptq/w4-gptq
      qat/       <variant>/model            e.g. qat/w4-qat/model
      rl/        <variant>/model            e.g. rl/w4-qat_rl/model
      export/    <variant>/<format>/        dequantized, compressed-tensors, gptq
      eval/      <variant>/<task>/          metrics.json, samples.jsonl
      compare/   compare.md, compare.json, compare.png
      analysis/  <variant>/                 rqat analyze
    Every stage directory holds manifest.json; a stage works in .<stage>.partial/ until it is done.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

RUN_FORMAT = 2  # manifests written from this version on carry it; older ones read as format 1
MANIFEST = "manifest.json"
RECIPE_SNAPSHOT = "recipe.yaml"


@dataclass(frozen=True, order=True)
class Variant:
    """One model of a run: a bit width and how it was made (bits 16, method bf16: the teacher)."""

    bits: int
    method: str  # bf16 | rtn | gptq | gptq_generic | qat | qat_rl | ptq_rl (GRPO straight from PTQ)

    def __str__(self) -> str:
        return "bf16" if self.method == "bf16" else f"w{self.bits}-{self.method}"

    @classmethod
    def parse(cls, name: str) -> Variant:
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

    @classmethod
    def teacher(cls, layout: RunLayout, model_cfg) -> ModelSource:
        path = layout.teacher_model()
        local = model_cfg.demo is not None or Path(path).exists()
        return cls(path, None if local else model_cfg.revision, model_cfg.trust_remote_code, model_cfg.dtype)

    def at(self, path: str | Path) -> ModelSource:
        return replace(self, id=str(path), revision=None)

    def tokenizer(self):
        from .models import load_tokenizer

        return load_tokenizer(self.id, self.trust_remote_code, self.revision)

    def model(self, dtype=None, device: str | None = None):
        from .models import load_model, resolve_dtype

        return load_model(self.id, dtype or resolve_dtype(self.dtype), self.trust_remote_code, self.revision, device)

    def config(self):
        from .models import load_config

        return load_config(self.id, self.trust_remote_code, self.revision)


class RunLayout:
    """Every path of a run. `working(stage)` gives the view a running stage writes through: its own
    directory is the partial one, every other stage's is the finished one."""

    def __init__(self, root: str | Path, working: dict[str, Path] | None = None):
        self.root = Path(root)
        self._working = working or {}

    def working(self, stage: str) -> RunLayout:
        return RunLayout(self.root, {stage: self.partial(stage)})

    # ---- run level -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.root.name

    @property
    def recipe_file(self) -> Path:
        return self.root / RECIPE_SNAPSHOT

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def stage(self, name: str) -> Path:
        return self._working.get(name, self.root / name)

    def partial(self, name: str) -> Path:
        return self.root / f".{name}.partial"

    def replaced(self, name: str) -> Path:
        """Where a finished stage waits while its re-run's result is renamed into place."""
        return self.root / f".{name}.old"

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
        return self.stage("teacher") / "model"

    def teacher_ref(self) -> Path:
        return self.stage("teacher") / "model_ref.json"

    def demo_data(self) -> Path | None:
        d = self.stage("teacher") / "data"
        return d if d.is_dir() else None

    # ---- calibrate -------------------------------------------------------------------------------
    def calibration_file(self) -> Path:
        return self.stage("calibrate") / "calibration.safetensors"

    def qat_data(self) -> Path:
        return self.stage("calibrate") / "qat_data"

    def teacher_responses(self) -> Path:
        return self.stage("calibrate") / "qat_data.jsonl"

    # ---- quantized variants ----------------------------------------------------------------------
    def ptq(self, v: Variant) -> Path:
        return self.stage("ptq") / str(v)

    def trained(self, v: Variant) -> Path:
        """The directory of a trained variant (qat or rl stage); its checkpoint is `model/`."""
        return self.stage("rl" if v.method.endswith("_rl") else "qat") / str(v)

    def checkpoint(self, v: Variant) -> Path:
        """The rqat quantized checkpoint of any quantized variant."""
        return self.ptq(v) if v.method in ("rtn", "gptq", "gptq_generic") else self.trained(v) / "model"

    def export(self, v: Variant, fmt: str | None = None) -> Path:
        d = self.stage("export") / str(v)
        return d / fmt if fmt else d

    def exported_variants(self) -> list[Variant]:
        d = self.stage("export")
        return sorted(Variant.parse(p.name) for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def eval(self, v: Variant, task: str) -> Path:
        return self.stage("eval") / str(v) / task

    def compare(self) -> Path:
        return self.stage("compare")

    def analysis(self, v: Variant) -> Path:
        return self.root / "analysis" / str(v)
