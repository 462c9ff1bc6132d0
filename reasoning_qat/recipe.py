"""Recipe: one YAML per experiment, validated into typed objects.

Every section maps 1:1 to a pydantic model below; unknown keys are errors. `load_recipe` raises
`RecipeError` with one line naming the field path, what was wrong and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .serving import GPTQ_SERVED, vllm_refuses_packed


class RecipeError(UserError):
    """Bad recipe: the message is one line, `field.path: what is wrong (allowed: ...)`."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoTeacher(_Section):
    """A tiny Qwen3-architecture teacher trained locally on synthetic step-by-step arithmetic."""

    hidden_size: int = Field(128, ge=16)
    intermediate_size: int = Field(384, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int = Field(32, ge=8)  # vLLM's CPU attention needs 32, 64, 80, 96, 112, 128, ...
    train_steps: int = Field(1200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # arith: (a+b)*c in two steps (810 problems); chain: 4-6 dependent +/- steps on 3-4 digit numbers
    # worked column by column with carries (data/arithmetic.py), `num_problems` of them
    task: Literal["arith", "chain"] = "arith"
    num_problems: int = Field(20000, ge=100)
    min_steps: int = Field(4, ge=1)  # chain: steps per problem, drawn uniformly in [min_steps, max_steps]
    max_steps: int = Field(6, ge=1)
    trace: Literal["columns", "compact"] = "columns"  # chain: column work written out, or step results only
    max_length: int = Field(256, ge=32)  # training sequence length (chain: ~450 at 6 steps, ~650 at 8)
    # the teacher's own seed (init, data, order): runs that differ only in `seed` share one teacher
    # (and can take a copy of it) when this is set; None: the run's seed
    seed: int | None = None
    # the teacher's training dynamics (schedule and weight averaging change how well it survives PTQ)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_ratio: float = Field(0.2, gt=0, le=1)  # wsd: fraction of steps spent decaying
    averaging: Literal["none", "ema", "lawa"] = "none"  # applied to the saved teacher
    ema_decay: float = Field(0.999, gt=0, lt=1)
    lawa_k: int = Field(5, ge=2)
    lawa_interval: int = Field(50, ge=1)

    @model_validator(mode="after")
    def _step_range(self):
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps {self.min_steps} is above max_steps {self.max_steps}")
        return self


class ModelConfig(_Section):
    id: str | None = None  # hub id or local directory
    demo: DemoTeacher | None = None  # build the embedded demo teacher instead of loading one
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    trust_remote_code: bool = False
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.id is None) == (self.demo is None):
            raise ValueError("set exactly one of model.id (hub id or local path) or model.demo")
        return self


class QuantOverride(_Section):
    pattern: str  # fnmatch glob on module names, e.g. "*.mlp.down_proj"
    bits: Literal[2, 3, 4, 8] | None = None
    group_size: Literal[-1, 32, 64, 128] | None = None


class ActQuantConfig(_Section):
    """Per-token dynamic fake quantization of the inputs of the quantized Linears."""

    bits: Literal[4, 8] = 4
    symmetric: bool = False
    clip_ratio: float = Field(1.0, gt=0, le=1)


class KVQuantConfig(_Section):
    """Fake quantization of keys and values per head (groups along head_dim; -1: the whole head).
    The preflight checks that group_size divides the model's head_dim."""

    bits: Literal[4, 8] = 4
    group_size: int = Field(-1, ge=-1)

    @field_validator("group_size")
    @classmethod
    def _positive_or_whole_head(cls, v):
        if v == 0:
            raise ValueError("0 is not a group size (allowed: a divisor of head_dim, or -1 for the whole head)")
        return v
    symmetric: bool = False
    clip_ratio: float = Field(1.0, gt=0, le=1)


PRESETS = {"w4a4kv4": {"activations": {"bits": 4}, "kv_cache": {"bits": 4}}, "w4a8": {"activations": {"bits": 8}}}


class QuantConfig(_Section):
    # a named scheme filling activations/kv_cache (keys given beside it win): w4a4kv4, w4a8
    preset: Literal["w4a4kv4", "w4a8"] | None = None
    activations: ActQuantConfig | None = None  # None: BF16 activations (weight-only)
    kv_cache: KVQuantConfig | None = None  # None: BF16 KV cache
    bits: list[Literal[2, 3, 4, 8]] = Field(default_factory=lambda: [4])
    group_size: Literal[-1, 32, 64, 128] = 128  # -1: one scale per output channel
    symmetric: bool = False
    observer: Literal["minmax", "mse", "percentile"] = "minmax"
    percentile: float = Field(0.999, gt=0.5, le=1.0)
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    overrides: list[QuantOverride] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, v):
        if isinstance(v, dict) and v.get("preset") in PRESETS:
            v = {**PRESETS[v["preset"]], **v}
        return v

    @field_validator("bits", mode="before")
    @classmethod
    def _bits_list(cls, v):
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("bits")
    @classmethod
    def _bits_nonempty(cls, v):
        if not v:
            raise ValueError("give at least one bit width (allowed: 2, 3, 4, 8)")
        return sorted(set(v))

    @property
    def override_bits(self) -> set[int]:
        """The bit widths `overrides` set for some layers (beside each variant's own `bits`)."""
        return {o.bits for o in self.overrides if o.bits is not None}


class TeacherGenerationConfig(_Section):
    """How the teacher writes the QAT responses when `data.responses: teacher` (Qwen3 thinking defaults)."""

    max_new_tokens: int = Field(4096, ge=1)
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=0)
    batch_size: int = Field(64, ge=1)
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    keep: Literal["all", "correct", "finished"] = "all"  # correct: graded against the row's `answer`


class DataConfig(_Section):
    """Reasoning data: `demo` (the demo task), a local .jsonl, or a hub dataset id.

    `responses: teacher` keeps the prompts but has the BF16 teacher write the responses (self-
    distillation data in the teacher's own distribution); the calibrate stage generates them once.
    """

    source: str = "demo"
    subset: str | None = None  # hub dataset configuration name
    split: str = "train"
    prompt_field: str = "prompt"
    response_field: str = "response"
    answer_field: str = "answer"  # gold answers: graded rewards, select: verified without dataset fields
    max_samples: int | None = Field(None, ge=1)  # applied to the source rows before anything is read
    max_length: int = Field(2048, ge=8)
    # One trace per row: the first generation, the first verified one (the dataset's own fields when
    # named, e.g. OpenR1's correctness_math_verify / is_reasoning_complete, else graded against
    # answer_field), or every generation as its own example.
    select: Literal["first", "verified", "all"] = "first"
    verified_field: str | None = None
    complete_field: str | None = None
    overlength: Literal["drop", "truncate"] = "drop"  # examples longer than max_length
    num_proc: int | None = Field(None, ge=1)  # datasets.map workers (None: the cores, for large sets)
    responses: Literal["dataset", "teacher"] = "dataset"
    generation: TeacherGenerationConfig = Field(default_factory=TeacherGenerationConfig)


class CalibrationConfig(_Section):
    domain: Literal["reasoning", "generic"] = "reasoning"
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=8)
    generic_source: str = "builtin"  # "builtin" (shipped plain text), a .txt/.jsonl path or a hub id
    generic_subset: str | None = None  # hub configuration, e.g. wikitext-2-raw-v1
    seed: int = 0


class PTQConfig(_Section):
    method: Literal["gptq", "rtn"] = "gptq"
    baselines: list[Literal["rtn", "gptq", "gptq_generic"]] = Field(default_factory=lambda: ["rtn"])
    damp: float = Field(0.01, gt=0, le=1)
    block_size: int = Field(128, ge=1)
    act_order: bool = False
    true_sequential: bool = True
    # QuaRot-style: norms folded, residual stream and V/O rotated by randomised Hadamards (fused into
    # the weights), online Hadamards on down_proj's input and on q/k (quant/rotation.py)
    rotation: Literal["none", "hadamard"] = "none"
    rotation_seed: int = 0


class KDConfig(_Section):
    loss: Literal["forward_kl", "reverse_kl", "jsd", "ce"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    top_k: int | None = Field(None, ge=1)
    chunk_size: int = Field(1024, ge=1)
    fused: bool = True  # projection + loss + gradient in one pass per chunk (kd.py); false: checkpointed autograd


class QATConfig(_Section):
    enabled: bool = True
    init: Literal["ptq", "rtn", "bf16"] = "ptq"
    kd: KDConfig = Field(default_factory=KDConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    # Three learning rates. The quantized layers train in units of their quantization grid (see
    # FakeQuantLinear), so latent_lr and scale_lr mean the same at 2 bits as at 8:
    lr: float = Field(1e-5, gt=0)  # ordinary parameters (embeddings, norms, unquantized layers), absolute
    latent_lr: float = Field(1e-2, gt=0)  # latent weights of quantized layers: grid steps per update
    scale_lr: float = Field(1e-2, ge=0)  # quantizer step sizes and zero points, grid steps at the grid's edge; 0 freezes
    weight_decay: float = Field(0.0, ge=0)
    optimizer: str = "adamw_torch_fused"  # any transformers `optim` name
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    decay_ratio: float = Field(0.2, gt=0, le=1)  # WSD: fraction of steps spent decaying
    averaging: Literal["none", "ema", "lawa"] = "none"
    ema_decay: float = Field(0.999, gt=0, lt=1)
    lawa_k: int = Field(5, ge=2)
    lawa_interval: int = Field(50, ge=1)
    save_steps: int = Field(200, ge=1)
    logging_steps: int = Field(10, ge=1)
    report_to: list[str] = Field(default_factory=list)
    num_processes: int = Field(1, ge=1)
    deepspeed: str | None = None  # path to a DeepSpeed config, e.g. recipes/accelerate/zero2.json
    # Recompute activations in the backward pass: costs ~1/3 more compute, so `auto` turns it on only
    # when the step's estimated activations would not fit in the GPU's free memory (stages/qat.py).
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    bf16: bool = True
    packing: bool = False  # one row per batch, examples concatenated: no padding, no attention across examples
    # torch.compile each decoder layer of student and teacher (norms, rotary, SiLU, casts and the
    # fake-quant fused: eager, they were most of a GPU step) and the fake-quant function. auto: on a GPU
    compile: bool | Literal["auto"] = "auto"


class RLConfig(_Section):
    enabled: bool = False
    # qat: GRPO on the QAT student (the paper's KD cold start); ptq: straight from the ptq stage's
    # checkpoint of `ptq.method` (qat may be off), the control that shows RL needs a viable start
    init: Literal["qat", "ptq"] = "qat"
    min_accuracy: float = Field(0.05, ge=0, le=1)  # refuse to start below this (no viable cold start)
    train_scales: bool = False
    data: DataConfig = Field(default_factory=DataConfig)
    max_steps: int = Field(100, ge=1)
    lr: float = Field(1e-6, gt=0)  # ordinary parameters, absolute
    latent_lr: float = Field(1e-3, gt=0)  # latent weights of quantized layers, grid steps per update
    num_generations: int = Field(8, ge=2)
    batch_size: int = Field(8, ge=1)
    max_completion_length: int = Field(1024, ge=8)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.0, ge=0)
    format_reward: float = Field(0.0, ge=0)
    save_steps: int = Field(50, ge=1)
    bf16: bool = True
    use_vllm: bool = False  # rollouts through TRL's colocated vLLM, fed the dequantized fake-quant weights each step

    @field_validator("data")
    @classmethod
    def _prompts_from_the_dataset(cls, v):
        if v.responses == "teacher":
            raise ValueError("responses: teacher applies to qat.data only; RL samples its own responses (use dataset)")
        return v


class ExportConfig(_Section):
    """dequantized: plain checkpoint, any engine; compressed-tensors: packed WNA16 (vLLM on GPUs, transformers);
    gptq: GPTQ v1, which vLLM serves for symmetric 4/8-bit only."""

    formats: list[Literal["dequantized", "compressed-tensors", "gptq"]] = Field(
        default_factory=lambda: ["dequantized", "compressed-tensors"])


class EvalConfig(_Section):
    tasks: list[str] = Field(default_factory=lambda: ["math500"])
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    samples: int = Field(1, ge=1)  # k samples per problem; pass@1 is averaged over them
    limit: int | None = Field(None, ge=1)
    # which variants to evaluate, by method (bf16, rtn, gptq, gptq_generic, qat, qat_rl, ptq_rl); None: all.
    # Runs that share a teacher and PTQ (an ablation of QAT) need not score those again.
    methods: list[Literal["bf16", "rtn", "gptq", "gptq_generic", "qat", "qat_rl", "ptq_rl"]] | None = None
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)  # None: the task's own default
    temperature: float | None = Field(None, ge=0)
    seed: int = 0
    data: dict[str, str] = Field(default_factory=dict)  # task name -> local file replacing its hub source
    # task name -> fields replacing the task file's: e.g. {aime: {combine: [aime24, aime25]}},
    # {livecodebench: {release_start: 2024-08-01, release_end: 2025-02-01}}, {gpqa_diamond: {samples: 4}}
    task_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # which export of each variant is evaluated; auto: compressed-tensors under vLLM on a GPU (what is
    # served, with vLLM's packed kernels), else the dequantized checkpoint (same function, any engine)
    export_format: Literal["auto", "dequantized", "compressed-tensors"] = "auto"
    # vLLM engine settings (also used by teacher-written QAT data)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)  # None: 0.9 on a GPU, 0.3 on CPU
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    enforce_eager: bool = False
    max_model_len: int | None = Field(None, ge=16)
    # transformers backend: a static KV cache with a compiled decode step (auto: on a GPU, when the
    # cache of one batch fits in a third of the free memory)
    static_cache: bool | Literal["auto"] = "auto"
    # demo tasks: also each variant's mean cross-entropy per token of the held-out reference
    # solutions (teacher forcing), a damage measure that moves before pass@1 does
    reference_ce: bool = True


class CompareConfig(_Section):
    plot: bool = True


class Recipe(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = 0
    run_root: str = "runs"
    model: ModelConfig
    quant: QuantConfig = Field(default_factory=QuantConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    ptq: PTQConfig = Field(default_factory=PTQConfig)
    qat: QATConfig = Field(default_factory=QATConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.rl.enabled and self.rl.init == "qat" and not self.qat.enabled:
            raise ValueError("rl.enabled needs qat.enabled (RL starts from the QAT student; rl.init: ptq starts "
                             "from the PTQ checkpoint instead)")
        if self.qat.deepspeed is not None and not Path(self.qat.deepspeed).is_file():
            raise ValueError(f"qat.deepspeed: no such DeepSpeed config file {self.qat.deepspeed!r}")
        bits = set(self.quant.bits) | self.quant.override_bits
        if "gptq" in self.export.formats:
            if self.quant.symmetric is not GPTQ_SERVED["symmetric"] or not bits <= set(GPTQ_SERVED["bits"]):
                raise ValueError(
                    f"export.formats: gptq is served by vLLM only for symmetric 4- or 8-bit weights (this recipe: "
                    f"bits {sorted(bits)}, symmetric {self.quant.symmetric}); use compressed-tensors, which vLLM "
                    "serves at 2/3/4/8 bits symmetric, 4/8 with zero points")
        if self.eval.export_format == "compressed-tensors" and self.eval.backend != "transformers":
            for b in sorted(bits):
                if why := vllm_refuses_packed(b, self.quant.symmetric):
                    raise ValueError(f"eval.export_format: compressed-tensors under vLLM, but {why}; or evaluate "
                                     "eval.export_format: dequantized (the same function), or eval.backend: transformers")
        q = self.quant
        if q.activations or q.kv_cache or self.ptq.rotation != "none":
            what = "ptq.rotation" if self.ptq.rotation != "none" else ("quant.activations" if q.activations else "quant.kv_cache")
            if self.export.formats != ["dequantized"]:
                raise ValueError(f"export.formats: {what} needs online operations no serving format carries; "
                                 "use formats: [dequantized] (evaluated through transformers with reasoning_qat's runtime)")
            if self.eval.backend == "vllm" or self.rl.use_vllm:
                raise ValueError(f"{'eval.backend' if self.eval.backend == 'vllm' else 'rl.use_vllm'}: vLLM cannot run "
                                 f"{what} (int4 activations / online rotations); use the transformers backend")
        if self.eval.export_format == "compressed-tensors" and "compressed-tensors" not in self.export.formats:
            raise ValueError("eval.export_format: compressed-tensors is not in export.formats")
        if self.eval.export_format != "compressed-tensors" and "dequantized" not in self.export.formats:
            raise ValueError("export.formats: keep dequantized (what eval runs off a GPU), or set "
                             "eval.export_format: compressed-tensors")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name

    def section_hash(self, *keys: str, exclude_defaults: bool = True) -> str:
        """Hash of the recipe sections a stage depends on (dotted keys), for staleness checks. Only
        values that were set count (exclude_defaults), so a field added to the schema with a default
        changes no hash. A key with '=' is hashed as it is (a stage's version)."""
        dump = self.model_dump(mode="json", exclude_defaults=exclude_defaults)
        picked = {}
        for key in keys:
            if "=" in key:
                picked[key] = True
                continue
            node = dump
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            picked[key] = node
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or "(top level)"
    idx = [str(p) for p in first["loc"] if isinstance(p, int)]
    if idx:
        loc += f"[{','.join(idx)}]"
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key (check the spelling; see the recipe reference in README.md)"
    elif kind == "missing":
        msg = "required field is missing"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if "input" in first and kind not in ("model_type",) and not isinstance(first["input"], dict):
            msg += f" (got {first['input']!r})"
    more = f" [+{err.error_count() - 1} more]" if err.error_count() > 1 else ""
    if loc == "(top level)" and re.match(r"[a-z_]+(\.[a-z_]+)*: ", msg):  # a cross-check names its own field
        return f"{source}: {msg}{more}"
    return f"{source}: {loc}: {msg}{more}"


def parse_recipe(data: object, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: (top level): expected a mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_error(err, source)) from None


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, stricter for configs: a key given twice in one mapping is an error
    (PyYAML keeps the last one silently), and dates stay strings (the fields that take dates parse and
    check them, so `2025-02-30` is a one-line error naming its field, not a ValueError inside PyYAML)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice in one section",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def load_yaml(text: str):
    """Parse a config's YAML text safely (no Python objects), refusing duplicate keys; dates stay strings."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte {err.start}); a recipe is a YAML text file") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if overrides and isinstance(data, dict):
        data = {**data, **overrides}
    return parse_recipe(data, str(path))
