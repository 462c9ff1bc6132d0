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
from .serving import vllm_refuses_gptq, vllm_refuses_packed


class RecipeError(UserError):
    """Bad recipe: the message is one line, `field.path: what is wrong (allowed: ...)`."""


class _Section(BaseModel):
    # allow_inf_nan off: `gt=0` lets infinity through (and NaN only by accident of its comparisons); no field of a
    # recipe means anything at either
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _TrainingDynamics(_Section):
    """The LR schedule and weight averaging of a training run (the demo teacher's and QAT's): both change how
    well a model survives quantization."""

    schedule: Literal["cosine", "wsd", "constant"] = Field("cosine", description="LR schedule (wsd: warmup-stable-decay)")
    decay_ratio: float = Field(0.2, gt=0, le=1, description="wsd: fraction of the steps spent decaying")
    averaging: Literal["none", "ema", "lawa"] = Field("none", description="weight averaging applied to the saved model")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="ema: decay per step")
    lawa_k: int = Field(5, ge=2, description="lawa: snapshots averaged (latest-weight averaging)")
    lawa_interval: int = Field(50, ge=1, description="lawa: steps between snapshots")


class DemoTeacher(_TrainingDynamics):
    """A tiny Qwen3-architecture teacher trained locally on synthetic step-by-step arithmetic."""

    hidden_size: int = Field(128, ge=16, description="width of the residual stream")
    intermediate_size: int = Field(384, ge=16, description="MLP width")
    num_layers: int = Field(2, ge=1, description="decoder layers")
    num_heads: int = Field(4, ge=1, description="query heads")
    num_kv_heads: int = Field(2, ge=1, description="key/value heads (grouped-query attention)")
    head_dim: int = Field(32, ge=8, description="width of one head; vLLM's CPU attention needs 32, 64, 80, 96, 112, 128, ...")
    train_steps: int = Field(1200, ge=1, description="optimizer steps of the teacher's training")
    batch_size: int = Field(32, ge=1, description="sequences per teacher training step")
    lr: float = Field(3e-3, gt=0, description="the teacher's peak learning rate")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of the problems held out for eval (split by problem)")
    task: Literal["arith", "chain"] = Field("arith", description=(
        "`arith`: (a+b)*c in two steps (810 problems); `chain`: `min_steps`-`max_steps` dependent +/- steps on 3-4 "
        "digit numbers worked column by column with carries (data/arithmetic.py), `num_problems` of them"))
    num_problems: int = Field(20000, ge=100, description="chain: problems generated (train and test)")
    min_steps: int = Field(4, ge=1, description="chain: fewest steps per problem (drawn uniformly up to max_steps)")
    max_steps: int = Field(6, ge=1, description="chain: most steps per problem")
    trace: Literal["columns", "compact"] = Field(
        "columns", description="chain: `columns` writes the column work out, `compact` only each step's result")
    max_length: int = Field(256, ge=32, description="training sequence length in tokens (chain: ~450 at 6 steps, ~650 at 8)")
    seed: int | None = Field(None, description=(
        "the teacher's own seed (init, data, order): runs that differ only in `seed` then share one teacher and may "
        "copy it; none: the run's seed"))

    @model_validator(mode="after")
    def _step_range(self):
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps {self.min_steps} is above max_steps {self.max_steps}")
        return self


class ModelConfig(_Section):
    """The BF16 model: a hub id or local directory, or the embedded demo teacher."""
    id: str | None = Field(None, description="hub id or local directory of the BF16 model (exactly one of `id` / `demo`)")
    demo: DemoTeacher | None = Field(None, description="build and train the embedded demo teacher instead of loading one")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of the teacher and of the exports")
    trust_remote_code: bool = Field(False, description="run the model repository's own code (only the recipe turns it on)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of `id`")
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"] | None = \
        Field(None, description="the attention kernel every stage loads the teacher and its checkpoints with "
              "(transformers' `attn_implementation`; none: its default, sdpa). Not among any stage's inputs: the "
              "kernels compute the same function, so changing it marks nothing stale (re-run a stage with --force). "
              "A kernel this machine lacks is refused before the run; W4A4KV4 and rotated variants compute "
              "attention through SDPA and refuse the others")
    cudnn_sdpa: bool = Field(False, description="let SDPA pick its cuDNN kernels in the training stages (teacher, qat, "
                             "rl) on a GPU. Off: on H100/H200 (torch >= 2.11) the cuDNN backward returns NaN query "
                             "gradients when a mask is passed, the padded length is 64 mod 128 and a query row is fully "
                             "masked (GRPO's left-padded prompts; pytorch/pytorch#196678); SDPA then runs flash or "
                             "memory-efficient attention, the same function. Not among any stage's inputs")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.id is None) == (self.demo is None):
            raise ValueError("set exactly one of model.id (hub id or local path) or model.demo")
        return self


class QuantOverride(_Section):
    """Mixed precision: another bit width or group size for the layers a glob matches."""
    pattern: str = Field(description='fnmatch glob on module names, e.g. "*.mlp.down_proj"')
    bits: Literal[2, 3, 4, 8] | None = Field(None, description="bit width of the matched layers (none: the variant's)")
    group_size: Literal[-1, 32, 64, 128] | None = Field(None, description="group size of the matched layers (none: quant.group_size)")


class ActQuantConfig(_Section):
    """Per-token dynamic fake quantization of the inputs of the quantized Linears."""

    bits: Literal[4, 8] = Field(4, description="activation bit width")
    symmetric: bool = Field(False, description="no zero point (asymmetric: one zero point per token)")
    clip_ratio: float = Field(1.0, gt=0, le=1, description="each token's range is clipped to this share before quantizing")


class KVQuantConfig(_Section):
    """Fake quantization of keys and values per head (groups along head_dim; -1: the whole head).
    The preflight checks that group_size divides the model's head_dim."""

    bits: Literal[4, 8] = Field(4, description="key/value bit width")
    group_size: int = Field(-1, ge=-1, description="group along head_dim (a divisor of it), or -1 for the whole head")

    @field_validator("group_size")
    @classmethod
    def _positive_or_whole_head(cls, v):
        if v == 0:
            raise ValueError("0 is not a group size (allowed: a divisor of head_dim, or -1 for the whole head)")
        return v
    symmetric: bool = Field(False, description="no zero point")
    clip_ratio: float = Field(1.0, gt=0, le=1, description="each group's range is clipped to this share before quantizing")


PRESETS = {"w4a4kv4": {"activations": {"bits": 4}, "kv_cache": {"bits": 4}}, "w4a8": {"activations": {"bits": 8}}}


class QuantConfig(_Section):
    """The quantization scheme: weight bit widths and groups, activations, KV cache, targets."""
    preset: Literal["w4a4kv4", "w4a8"] | None = Field(None, description=(
        "a named scheme filling `activations` / `kv_cache` (w4a4kv4: 4-bit activations and KV cache; w4a8: 8-bit "
        "activations); keys given beside it win"))
    activations: ActQuantConfig | None = Field(None, description="none: BF16 activations (weight-only)")
    kv_cache: KVQuantConfig | None = Field(None, description="none: BF16 KV cache")
    bits: list[Literal[2, 3, 4, 8]] = Field(default_factory=lambda: [4], description=(
        "weight bit widths; each gets its own ptq/qat/rl/export variants"))
    group_size: Literal[-1, 32, 64, 128] = Field(128, description="input columns sharing one scale; -1: one per output channel")
    symmetric: bool = Field(False, description=(
        "symmetric grid, zero point 2^(b-1) (what vLLM serves at 2/3 bits and GPTQ kernels need); false: a zero point per group"))
    observer: Literal["minmax", "mse", "percentile"] = Field("minmax", description=(
        "how RTN picks each group's range: `minmax`, `mse` (clipping grid search) or `percentile`"))
    percentile: float = Field(0.999, gt=0.5, le=1.0, description="percentile observer: the quantile kept")
    targets: list[str] = Field(default_factory=lambda: ["Linear"], description="class names or module-name globs quantized")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="class names or module-name globs left BF16")
    overrides: list[QuantOverride] = Field(default_factory=list, description=(
        "mixed precision: `{pattern, bits, group_size}` per layer glob (the last match wins)"))

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

    max_new_tokens: int = Field(4096, ge=1, description="longest response, in tokens")
    temperature: float = Field(0.6, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(20, ge=0, description="top-k sampling (0: off)")
    batch_size: int = Field(64, ge=1, description="prompts per generation batch (transformers backend)")
    backend: Literal["auto", "vllm", "transformers"] = Field("auto", description="`auto`: vLLM where it runs, else transformers")
    keep: Literal["all", "correct", "finished"] = Field("all", description=(
        "which responses train: `all`, `finished` (not cut by max_new_tokens) or `correct` (graded against the row's answer)"))


class DataConfig(_Section):
    """Reasoning data: `demo` (the demo task), a local .jsonl, or a hub dataset id.

    `responses: teacher` keeps the prompts but has the BF16 teacher write the responses (self-
    distillation data in the teacher's own distribution); the calibrate stage generates them once.
    """

    source: str = Field("demo", description="`demo` (the demo task), a .jsonl, a `save_to_disk` directory or a hub dataset id")
    subset: str | None = Field(None, description="hub dataset configuration name")
    split: str = Field("train", description="dataset split")
    prompt_field: str = Field("prompt", description="column holding the problem")
    response_field: str = Field("response", description="column holding the reasoning trace (a list of generations is allowed)")
    answer_field: str = Field("answer", description="column holding the gold answer (graded rewards; `select: verified`)")
    max_samples: int | None = Field(None, ge=1, description="first N source rows only (applied before anything is read)")
    max_length: int = Field(2048, ge=8, description="longest example in tokens, prompt and response")
    select: Literal["first", "verified", "all"] = Field("first", description=(
        "one trace per row: the `first` generation, the first `verified` one (the dataset's own flags when named, else "
        "graded against `answer_field`), or `all` generations as examples of their own"))
    verified_field: str | None = Field(None, description="select: verified: the dataset's per-generation correctness flags "
                                                          "(e.g. OpenR1's correctness_math_verify)")
    complete_field: str | None = Field(None, description="select: verified: the dataset's per-generation completeness flags "
                                                         "(e.g. OpenR1's is_reasoning_complete)")
    overlength: Literal["drop", "truncate"] = Field("drop", description="what happens to examples longer than max_length")
    demo_trace: Literal["columns", "compact"] | None = Field(None, description=(
        "source demo, chain task: the same problems with their traces written in this style instead of the "
        "teacher's (`model.demo.trace`): data from another generator than the teacher, as the paper's QAT data "
        "(OpenR1's traces come from DeepSeek-R1, not from Qwen3); none: the teacher's own style"))
    num_proc: int | None = Field(None, ge=1, description="datasets.map workers (none: the cores, for large sets)")
    responses: Literal["dataset", "teacher"] = Field("dataset", description=(
        "`teacher`: keep the prompts, have the BF16 teacher write the responses (generated once, resumably, by the "
        "calibrate stage)"))
    generation: TeacherGenerationConfig = Field(default_factory=TeacherGenerationConfig,
                                                description="how the teacher writes them (`responses: teacher`)")


class CalibrationConfig(_Section):
    """The PTQ calibration set: domain-matched windows of the QAT data, or generic text."""
    domain: Literal["reasoning", "generic"] = Field("reasoning", description=(
        "`reasoning`: windows of the QAT data in its chat/thinking format (domain-matched); `generic`: plain text"))
    num_samples: int = Field(128, ge=1, description="calibration sequences")
    seq_len: int = Field(2048, ge=8, description="tokens per calibration sequence")
    generic_source: str = Field("builtin", description="generic text: `builtin` (shipped), a .txt/.jsonl path or a hub id")
    generic_subset: str | None = Field(None, description="hub configuration of generic_source, e.g. wikitext-2-raw-v1")
    seed: int = Field(0, description="seed of the window draw")


class PTQConfig(_Section):
    """Post-training quantization: the method (QAT's init), baselines, GPTQ settings, rotation."""
    method: Literal["gptq", "rtn"] = Field("gptq", description="the PTQ method, also QAT's initialisation")
    baselines: list[Literal["rtn", "gptq", "gptq_generic"]] = Field(default_factory=lambda: ["rtn"], description=(
        "also produced and evaluated; `gptq_generic` is GPTQ calibrated on generic text"))
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ: dampening added to the Hessian's diagonal, share of its mean")
    block_size: int = Field(128, ge=1, description="GPTQ: columns quantized per lazy-update block")
    act_order: bool = Field(False, description="GPTQ: quantize columns in decreasing Hessian-diagonal order")
    true_sequential: bool = Field(True, description="GPTQ: calibrate each sublayer on the outputs of the already quantized ones")
    rotation: Literal["none", "hadamard"] = Field("none", description=(
        "`hadamard`: QuaRot-style rotation before RTN/GPTQ: norms folded, randomised Hadamards on the residual stream and "
        "V/O fused into the weights, online Hadamards on down_proj's input and on q/k (quant/rotation.py)"))
    rotation_seed: int = Field(0, description="seed of the randomised Hadamards")

    @property
    def gptq_act_order(self) -> bool:
        """Whether some variant's groups come out act-ordered: act_order on and GPTQ among the methods run."""
        return self.act_order and bool({self.method, *self.baselines} & {"gptq", "gptq_generic"})


class KDConfig(_Section):
    """The distillation objective of the qat stage."""
    loss: Literal["forward_kl", "reverse_kl", "jsd", "ce"] = Field("forward_kl", description=(
        "distillation loss per token: forward KL(teacher || student), reverse KL, generalized JSD, or `ce` on the data "
        "(no teacher)"))
    temperature: float = Field(1.0, gt=0, description="softmax temperature of teacher and student logits")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="jsd: mixture weight of the teacher")
    top_k: int | None = Field(None, ge=1, description="restrict the loss to the teacher's top-k tokens (none: full vocabulary)")
    chunk_size: int = Field(1024, ge=1, description="tokens per chunk of the vocabulary projection")
    fused: bool = Field(True, description=(
        "projection + loss + gradient in one pass per chunk (kd/fused.py), sharded heads included (FSDP2, ZeRO-3); false "
        "(or top_k, a head with a bias, a quantized head): autograd through checkpointed chunks"))
    teacher: Literal["online", "cached"] = Field("online", description=(
        "`online`: the BF16 teacher runs beside the student at every step; `cached`: the calibrate stage stores the "
        "teacher's top cache_top_k log-probabilities (plus the tail mass) on every QAT response token once, and the "
        "qat stage trains from them without loading the teacher (forward_kl only)"))
    cache_top_k: int = Field(64, ge=1, description="cached teacher: tokens kept per position (~6 bytes each on disk)")
    teacher_placement: Literal["auto", "shard", "offload"] = Field("auto", description=(
        "online teacher under distributed: fsdp2: `shard` (its layers sharded over the GPUs, no optimizer state), "
        "`offload` (its shards in CPU memory, each layer copied to the GPU for its forward: FSDP2's CPUOffloadPolicy), "
        "or `auto`: shard when the sharded teacher fits beside the sharded student in 90% of a GPU's memory, else "
        "offload (kd.teacher_placement)"))
    cache_backend: Literal["auto", "transformers", "vllm"] = Field("auto", description=(
        "cached teacher: what computes it: transformers, or vLLM's prompt_logprobs (temperature 1 only); auto: vLLM "
        "on a GPU where it runs and the temperature is 1, else transformers"))

    @model_validator(mode="after")
    def _cached_needs_forward_kl(self):
        if self.teacher == "cached" and (self.loss != "forward_kl" or self.top_k):
            raise ValueError(f"teacher: cached stores the teacher's top-k log-probabilities with their tail mass, "
                             f"which forward_kl reads; loss {self.loss}{' with top_k' if self.top_k else ''} needs "
                             "the online teacher (teacher: online)")
        if self.teacher == "cached" and self.cache_backend == "vllm" and self.temperature != 1.0:
            raise ValueError(f"cache_backend: vllm reports log-probabilities at temperature 1, not {self.temperature}; "
                             "use cache_backend: transformers (or auto), or temperature: 1")
        return self


class QATConfig(_TrainingDynamics):
    """Quantization-aware training by distillation from the BF16 teacher."""
    enabled: bool = Field(True, description="run the qat stage")
    init: Literal["ptq", "rtn", "bf16"] = Field("ptq", description="the student's starting latents: ptq.method's, RTN's or BF16")
    kd: KDConfig = Field(default_factory=KDConfig, description="the distillation loss")
    data: DataConfig = Field(default_factory=DataConfig, description="the QAT training set")
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="sequences per device per step")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    # The quantized layers train in units of their quantization grid (see FakeQuantLinear), so
    # latent_lr and scale_lr mean the same at 2 bits as at 8:
    lr: float = Field(1e-5, gt=0, description="learning rate of the ordinary parameters (embeddings, norms, unquantized layers)")
    latent_lr: float = Field(1e-2, gt=0, description="learning rate of the quantized layers' latent weights, in grid steps per update")
    scale_lr: float = Field(1e-2, ge=0, description=(
        "learning rate of the step sizes and zero points, in grid steps at the grid's edge; 0 freezes the quantizers"))
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    optimizer: str = Field("adamw_torch_fused", description="any transformers `optim` name")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of the steps spent warming up")
    save_steps: int = Field(200, ge=1, description="steps between resumable checkpoints")
    logging_steps: int = Field(10, ge=1, description="steps between log lines")
    report_to: list[str] = Field(default_factory=list, description="transformers `report_to` integrations (tensorboard, wandb, ...)")
    num_processes: int = Field(1, ge=1, description="> 1: the stage re-launches itself data-parallel (accelerate; gloo on CPU)")
    distributed: Literal["ddp", "fsdp2", "deepspeed"] = Field("ddp", description=(
        "how the processes share the model: `ddp` (a full copy each), `fsdp2` (PyTorch's fully_shard through "
        "Accelerate, GPUs only: parameters, quantizer state, gradients and optimizer state sharded per decoder layer, "
        "the teacher sharded too, checkpoints sharded through torch.distributed.checkpoint), `deepspeed` "
        "(qat.deepspeed's ZeRO config)"))
    deepspeed: str | None = Field(None, description=(
        "path to a DeepSpeed config, e.g. recipes/accelerate/zero2.json (implies distributed: deepspeed)"))
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description=(
        "recompute activations in the backward pass (~1/3 more compute); `auto`: only when the step's estimated "
        "activations would not fit in the GPU's free memory"))
    bf16: bool = Field(True, description="bf16 mixed precision on a GPU")
    packing: bool = Field(False, description=(
        "one row per batch, examples concatenated: no padding, no attention across examples"))
    compile: bool | Literal["auto"] = Field("auto", description=(
        "torch.compile each decoder layer of student and teacher, fake-quant included (`auto`: on a GPU)"))

    @model_validator(mode="before")
    @classmethod
    def _deepspeed_implies_distributed(cls, data):
        # Recipes written before `distributed` existed name only the DeepSpeed config.
        if isinstance(data, dict) and data.get("deepspeed") and "distributed" not in data:
            data = {**data, "distributed": "deepspeed"}
        return data

    @model_validator(mode="after")
    def _distributed_consistent(self):
        if self.distributed == "deepspeed" and not self.deepspeed:
            raise ValueError("distributed: deepspeed needs `deepspeed`, the path of a ZeRO config "
                             "(recipes/accelerate/zero2.json or zero3.json)")
        if self.distributed != "deepspeed" and self.deepspeed:
            raise ValueError(f"deepspeed: set with distributed: {self.distributed}; drop one of them")
        if self.distributed != "fsdp2" and self.kd.teacher_placement != "auto":
            raise ValueError(f"kd.teacher_placement: {self.kd.teacher_placement} places the teacher's FSDP2 shards, "
                             f"but distributed is {self.distributed}; use distributed: fsdp2 or teacher_placement: auto")
        if self.distributed == "fsdp2" and self.averaging != "none":
            raise ValueError("averaging: not supported with distributed: fsdp2 (the averaged copy would not be "
                             "sharded); use ddp or deepspeed, or averaging: none")
        return self


class RLConfig(_Section):
    """GRPO (TRL) on the quantized student."""
    enabled: bool = Field(False, description="run GRPO (the rl stage)")
    init: Literal["qat", "ptq"] = Field("qat", description=(
        "`qat`: GRPO on the QAT student (the KD cold start); `ptq`: straight from ptq.method's checkpoint (qat may be "
        "off), the control that shows RL needs a viable start"))
    min_accuracy: float = Field(0.05, ge=0, le=1, description="refuse to start when the student solves fewer of the first prompts")
    train_scales: bool = Field(False, description="also train the step sizes and zero points")
    data: DataConfig = Field(default_factory=DataConfig, description="the RL prompts (with answers for the reward)")
    max_steps: int = Field(100, ge=1, description="GRPO steps")
    lr: float = Field(1e-6, gt=0, description="learning rate of the ordinary parameters")
    latent_lr: float = Field(1e-3, gt=0, description="learning rate of the quantized latents, in grid steps per update")
    num_generations: int = Field(8, ge=2, description="completions per prompt (the GRPO group)")
    batch_size: int = Field(8, ge=1, description="completions per device per step")
    max_completion_length: int = Field(1024, ge=8, description="longest completion in tokens")
    temperature: float = Field(1.0, gt=0, description="rollout sampling temperature")
    beta: float = Field(0.0, ge=0, description="KL penalty to the reference model (0: none, no reference kept)")
    format_reward: float = Field(0.0, ge=0, description="weight of a reward for a closed <think> block and a boxed answer")
    save_steps: int = Field(50, ge=1, description="steps between resumable checkpoints")
    bf16: bool = Field(True, description="bf16 mixed precision on a GPU")
    use_vllm: bool = Field(False, description=(
        "rollouts through TRL's colocated vLLM, fed the student's dequantized fake-quant weights each step"))

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
        default_factory=lambda: ["dequantized", "compressed-tensors"], description=(
            "`dequantized` (plain checkpoint, any engine), `compressed-tensors` (packed; vLLM), `gptq` (GPTQ v1: "
            "symmetric 4/8-bit only)"))


class EvalConfig(_Section):
    """Evaluation: tasks, backend, sampling overrides, engine settings."""
    tasks: list[str] = Field(default_factory=lambda: ["math500"], description=(
        "names in eval/tasks/ (or suites: `reasoning`) or task .yaml paths"))
    backend: Literal["auto", "vllm", "transformers"] = Field("auto", description="`auto`: vLLM where it runs, else transformers")
    samples: int = Field(1, ge=1, description="k samples per problem; pass@1 is averaged over them")
    limit: int | None = Field(None, ge=1, description="first N problems only")
    methods: list[Literal["bf16", "rtn", "gptq", "gptq_generic", "qat", "qat_rl", "ptq_rl"]] | None = Field(None, description=(
        "evaluate only these variants by method (none: all); ablations sharing a teacher and PTQ need not score them again"))
    batch_size: int = Field(64, ge=1, description="prompts per generation batch (transformers backend)")
    max_new_tokens: int | None = Field(None, ge=1, description="none: the task's own default")
    temperature: float | None = Field(None, ge=0, description="none: the task's own sampling")
    seed: int = Field(0, description="sample j of problem p is drawn with its own seed from (seed, p, j)")
    data: dict[str, str] = Field(default_factory=dict, description="task name -> local file replacing its hub source")
    task_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "task name -> fields replacing the task file's, e.g. {aime: {combine: [aime24, aime25]}}"))
    export_format: Literal["auto", "dequantized", "compressed-tensors"] = Field("auto", description=(
        "which export is evaluated; `auto`: compressed-tensors under vLLM on a GPU (served weights and kernels), else "
        "dequantized (the same function, any engine)"))
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs per model (also teacher-written data)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description=(
        "vLLM: share of GPU memory (CPU build: of the node's RAM); none: 0.9 on a GPU, 0.3 on CPU"))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="`auto`: bf16 on a GPU, fp32 on CPU")
    enforce_eager: bool = Field(False, description="vLLM: no CUDA graphs or compilation")
    max_model_len: int | None = Field(None, ge=16, description="vLLM: context length (none: the model's)")
    static_cache: bool | Literal["auto"] = Field("auto", description=(
        "transformers backend: a static KV cache with a compiled decode step (`auto`: on a GPU, when one batch's cache "
        "fits in a third of the free memory)"))
    reference_ce: bool = Field(True, description=(
        "demo tasks: also each variant's cross-entropy per token of the held-out reference solutions (damage that moves "
        "before pass@1 does)"))


class CompareConfig(_Section):
    """The compare stage's table and plot."""
    plot: bool = Field(True, description="draw compare.png beside the table")


class Recipe(_Section):
    """One experiment: every section above, checked across sections (_cross_checks)."""
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="run directory name (`<run_root>/<name>`)")
    seed: int = Field(0, description="seed of QAT, RL and the run's own randomness")
    run_root: str = Field("runs", description="directory holding runs")
    report_to: list[str] = Field(default_factory=list, description=(
        "where every stage reports its metrics: transformers `report_to` integrations (tensorboard, wandb, trackio, "
        "...) for the teacher, qat and rl training; with tensorboard, eval's pass@1 and the compare plot too. "
        "TensorBoard files stay in the run: `tensorboard --logdir runs/NAME`"))
    model: ModelConfig = Field(description="the BF16 teacher")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="the quantization scheme")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="the PTQ calibration set")
    ptq: PTQConfig = Field(default_factory=PTQConfig, description="post-training quantization")
    qat: QATConfig = Field(default_factory=QATConfig, description="quantization-aware training by distillation")
    rl: RLConfig = Field(default_factory=RLConfig, description="GRPO on the quantized student")
    export: ExportConfig = Field(default_factory=ExportConfig, description="checkpoints engines load")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="pass@1 on the eval tasks")
    compare: CompareConfig = Field(default_factory=CompareConfig, description="the table and plot")

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.rl.enabled and self.rl.init == "qat" and not self.qat.enabled:
            raise ValueError("rl.enabled needs qat.enabled (RL starts from the QAT student; rl.init: ptq starts "
                             "from the PTQ checkpoint instead)")
        for key, data in (("qat.data", self.qat.data), ("rl.data", self.rl.data)):
            if data.demo_trace and (self.model.demo is None or self.model.demo.task != "chain" or data.source != "demo"):
                raise ValueError(f"{key}.demo_trace: trace styles exist for the demo's chain task only (source: demo, "
                                 "model.demo.task: chain); drop demo_trace")
        if self.qat.deepspeed is not None and not Path(self.qat.deepspeed).is_file():
            raise ValueError(f"qat.deepspeed: no such DeepSpeed config file {self.qat.deepspeed!r}")
        bits = set(self.quant.bits) | self.quant.override_bits
        if "gptq" in self.export.formats and (why := vllm_refuses_gptq(bits, self.quant.symmetric)):
            raise ValueError(f"export.formats: {why}; use compressed-tensors, which vLLM serves at 2/3/4/8 bits "
                             "symmetric, 4/8 with zero points")
        if self.eval.export_format == "compressed-tensors" and self.eval.backend != "transformers":
            for b in sorted(bits):
                if why := vllm_refuses_packed(b, self.quant.symmetric, self.ptq.gptq_act_order):
                    raise ValueError(f"eval.export_format: compressed-tensors under vLLM, but {why}; or evaluate "
                                     "eval.export_format: dequantized (the same function), or eval.backend: transformers")
        q = self.quant
        if q.activations or q.kv_cache or self.ptq.rotation != "none":
            what = "ptq.rotation" if self.ptq.rotation != "none" else ("quant.activations" if q.activations else "quant.kv_cache")
            if self.export.formats != ["dequantized"]:
                raise ValueError(f"export.formats: {what} needs online operations no serving format carries; "
                                 "use formats: [dequantized] (evaluated through transformers with reasoning_qat's runtime)")
            if self.model.attn_implementation not in (None, "sdpa"):
                raise ValueError(f"model.attn_implementation: {what} computes attention through SDPA (with its online "
                                 f"rotation / K-V fake quant), not {self.model.attn_implementation}; leave it unset or sdpa")
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
        """`run_root/name`."""
        return Path(self.run_root) / self.name

    def section_hash(self, *keys: str, exclude_defaults: bool = True) -> str:
        """Hash of the recipe sections a stage depends on (dotted keys), for staleness checks. Only
        values that were set count (exclude_defaults), so a field added to the schema with a default
        changes no hash. A key with '=' is hashed as it is (a stage's version). `UNHASHED` fields never count."""
        dump = self.model_dump(mode="json", exclude_defaults=exclude_defaults)
        for section, field in UNHASHED:
            dump.get(section, {}).pop(field, None)
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


# Fields that choose how a stage computes, not what: changing one marks no stage stale (a re-run is --force).
# The attention kernels compute the same function (to rounding).
UNHASHED = {("model", "attn_implementation"), ("model", "cudnn_sdpa")}


def _did_you_mean(loc: tuple) -> str:
    """`; did you mean qat.max_steps?` for an unknown key close to a field of its section (difflib), else ''."""
    import difflib

    section: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = section.model_fields.get(str(part))
        inner = getattr(field, "annotation", None) if field else None
        inner = next((a for a in (inner, *getattr(inner, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if inner is None:
            return ""
        section = inner
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    return f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or "(top level)"
    idx = [str(p) for p in first["loc"] if isinstance(p, int)]
    if idx:
        loc += f"[{','.join(idx)}]"
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(first["loc"]) + " (check the spelling; see docs/recipe-reference.md)"
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
    """A Recipe from a parsed YAML mapping. Raises RecipeError (one line naming the field)."""
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


def apply_overrides(data: dict, items: list[str] | dict) -> dict:
    """A copy of the recipe mapping `data` with each `KEY=VALUE` of `items` set: KEY dotted
    (`qat.kd.loss`), VALUE parsed as YAML (`[2, 3]`, `1e-5`, `null`), as torchtune's and TRL's command
    lines take them; or a {dotted key: value} mapping (the Python API). Sections named on the way are
    created. The schema then checks the result like any recipe, so an unknown key or a bad value is the
    usual one-line error naming the key.
    Raises RecipeError on an item that is not KEY=VALUE or that walks into a value that is not a section."""
    out = json.loads(json.dumps(data))
    if isinstance(items, dict):
        pairs = [(key, value, None) for key, value in items.items()]
    else:
        pairs = []
        for item in items:
            key, sep, text = item.partition("=")
            if not sep:
                raise RecipeError(f"{item!r}: an override is KEY=VALUE with a dotted recipe key (e.g. qat.max_steps=50; "
                                  "keys: rqat run --help)")
            pairs.append((key, None, text))
    for key, value, text in pairs:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise RecipeError(f"{key!r}: an override names a dotted recipe key (e.g. qat.max_steps; keys: rqat run --help)")
        if text is not None:
            try:
                value = load_yaml(text)
            except yaml.YAMLError as err:
                raise RecipeError(f"{key}: the value {text!r} is not valid YAML ({getattr(err, 'problem', err)})") from None
        node, *parents = out, *key.split(".")[:-1]
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise RecipeError(f"{key}: {where} is a value ({node!r}), not a section with keys")
        node[key.rsplit(".", 1)[-1]] = value
    return out


def load_recipe(path: str | Path, overrides: list[str] | dict | None = None) -> Recipe:
    """Read, check and type a recipe file, with command-line `KEY=VALUE` overrides applied before the
    check (`apply_overrides`). Raises RecipeError (one line naming the field) on anything wrong."""
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
        data = apply_overrides(data, overrides)
    return parse_recipe(data, str(path))
