"""qat stage: knowledge-distillation QAT of the fake-quant student, one run per bit width.

Student: the teacher's architecture with fake-quant Linear layers, initialised from the ptq stage
(`qat.init: ptq`), from round-to-nearest (`rtn`) or from the BF16 weights as latents (`bf16`).
Teacher: the BF16 model, frozen. Training is `KDTrainer` (a transformers.Trainer), so a killed run
resumes from its last checkpoint, quantizer state included. With `qat.num_processes > 1` the stage
re-launches itself through `accelerate launch`: DDP, FSDP2 (`qat.distributed: fsdp2`, Accelerate's FSDP
plugin version 2 set through its environment variables, as `recipes/accelerate/fsdp2.yaml` sets them for a
user's own `accelerate launch`) or DeepSpeed (`qat.deepspeed` names a ZeRO config).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ..architecture import head_dim
from ..data.qat_data import load_tokenized
from ..data.reasoning import PadCollator
from ..data.teacher_cache import CachedTeacherCollator, CachedTeacherDataset, TeacherCache
from ..kd import KDTrainer
from ..models import best_device
from ..pipeline import StageContext, StageFailed, recipe_from_run
from ..quant import prepare
from ..quant.fake_quant import train_quantizers, use_compiled_fake_quant
from ..quant.formats import read_quantized_weights, save_quantized_checkpoint
from ..run_layout import Variant, finished_metrics
from ..training import (
    WeightAveraging,
    last_checkpoint,
    quiet_training_args,
    readable_progress,
    schedule_args,
    sdpa_cudnn,
)
from .common import (
    finish_training,
    load_rotated_teacher,
    load_teacher,
    load_teacher_tokenizer,
    qat_data_origin,
)
from .specs import kd_spec, quant_spec


def _launched() -> bool:
    """True inside a process started by `accelerate launch` (or torchrun)."""
    return "LOCAL_RANK" in os.environ


def run(ctx: StageContext) -> dict:
    """The qat stage: KD-QAT per bit width (re-launched in N processes when asked); returns each variant's
    metrics."""
    from .. import launch

    q = ctx.recipe.qat
    if launch.SAVED is not None:  # `rqat run` under the user's torchrun / accelerate launch: every rank trains
        status = launch.train_everywhere(ctx)
        if status != 0:
            raise StageFailed(f"qat: the training worker exited with status {status} (its log is above); re-run the "
                              "same launch to resume from its last checkpoint")
    elif (q.num_processes > 1 or q.distributed != "ddp") and not _launched():
        _launch(ctx)
    else:
        for bits in ctx.recipe.quant.bits:
            train_one(ctx, bits)
    return {str(v): finished_metrics(ctx.layout.trained(v), ctx.layout.variant_metrics("qat", v))
            for v in (Variant(b, "qat") for b in ctx.recipe.quant.bits)}


def _launch(ctx: StageContext) -> None:
    """Re-run this stage's training in N processes: `accelerate launch` on GPUs (DeepSpeed when
    qat.deepspeed is set); torch's own launcher on CPU, where `accelerate launch --cpu` starts one
    process only."""
    q = ctx.recipe.qat
    _check_fsdp2_device(q)
    if torch.cuda.is_available() or q.deepspeed:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(q.num_processes)]
        if q.deepspeed:
            cmd += ["--use_deepspeed", "--deepspeed_config_file", q.deepspeed]
        elif q.num_processes > 1:
            cmd += ["--multi_gpu"]
    else:
        # --standalone: a free port on localhost (two runs on one machine do not fight over 29500)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(q.num_processes)]
    cmd += ["-m", "reasoning_qat.stages.qat", "--run-dir", str(ctx.run_dir), "--out", str(ctx.out)]
    cmd += [f"--input={k}={v}" for k, v in ctx.inputs.items()]
    done = subprocess.run(cmd)  # each worker's train_one sets FSDP2_ENV itself
    if done.returncode != 0:
        raise StageFailed(f"qat: the {q.num_processes}-process training exited with status {done.returncode} (its log is "
                          f"above); re-run the same command to resume from its last checkpoint")


# Accelerate's FSDP plugin, version 2, as environment variables (what `accelerate launch --config_file
# recipes/accelerate/fsdp2.yaml` exports; tests/stages/test_fsdp2.py checks the two agree): fully_shard on each
# decoder layer (the model's _no_split_modules) and on the root, parameters freed after each layer's forward,
# checkpoints sharded through torch.distributed.checkpoint.
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
}


def _check_fsdp2_device(q) -> None:
    # Off a GPU, Accelerate would quietly run plain data parallelism instead.
    if q.distributed == "fsdp2" and not torch.cuda.is_available():
        raise StageFailed("qat.distributed: fsdp2 needs CUDA GPUs (Accelerate runs FSDP on GPUs only); use "
                          "distributed: ddp on this machine")


def qat_collator(packing: bool, pad_token_id: int):
    """Padded rows, or (packing) the batch flattened into one row by transformers' own collator:
    position_ids restart per example and each example's first label is masked, so no token is
    predicted across an example boundary."""
    if packing:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(return_position_ids=True)
    return PadCollator(pad_token_id)


def _init_student(ctx: StageContext, bits: int, device: str, compile: bool = True):
    r = ctx.recipe
    spec = quant_spec(r, bits)
    student = load_rotated_teacher(ctx, device)  # float32 master weights (bf16 autocast on GPU), ptq's rotation
    init = None
    if r.qat.init == "ptq":
        qws, _, _ = read_quantized_weights(ctx.layout.ptq(Variant(bits, r.ptq.method)))
        init = {k: v.to(device) for k, v in qws.items()}
    prepare(student, spec, init, keep_latent=r.qat.init == "bf16")  # weights, activation/KV fake-quant, Hadamards
    if compile and compile_enabled(r.qat.compile, device):
        use_compiled_fake_quant(student)
        compile_decoder_layers(student)
    if r.qat.scale_lr == 0:  # the one place `scale_lr: 0` means frozen quantizers
        train_quantizers(student, False)
    return student


def compile_enabled(setting, device: str) -> bool:
    """Whether to torch.compile: `auto` means on a GPU."""
    return "cuda" in device if setting == "auto" else bool(setting)


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place (one graph, shared by the identical layers; the
    model's outer loop, masks and gradient checkpointing stay eager). Returns how many."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        return 0
    for layer in layers:
        layer.compile()
    return len(layers)


def activation_bytes(config, tokens: int, compiled: bool = False) -> int:
    """Estimated activation memory of one Qwen3-style decoder forward+backward without recompute, in
    bytes: per token and layer, ~28 bytes per hidden unit (the float32 residual stream of float32
    master weights, norms and their bf16 casts), ~8 per MLP unit (gate, up, SiLU, product in bf16)
    and ~11 per attention feature (q, k, v, output, normed q/k). Fitted to the peak measured by
    benchmarks/qat_stage.py on Qwen3-0.6B (49 GiB at 4 x 4096 tokens without recompute, H100);
    compiled decoder layers keep ~0.6 of that (fused elementwise ops save fewer intermediates:
    31 GiB)."""
    c = config
    per_token_layer = 28 * c.hidden_size + 8 * c.intermediate_size + \
        11 * (c.num_attention_heads + c.num_key_value_heads) * head_dim(c)
    return int(tokens * c.num_hidden_layers * per_token_layer * (0.6 if compiled else 1.0))


def choose_recompute(setting, student, tokens: int, device: str, compiled: bool = False) -> tuple[bool, str]:
    """(gradient checkpointing on?, why) for qat.gradient_checkpointing: true/false, or auto."""
    if setting != "auto":
        return bool(setting), "set in the recipe"
    if "cuda" not in device:
        return False, "auto: not on a GPU"
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    need = activation_bytes(student.config, tokens, compiled) + 12 * trainable  # + float32 gradients and Adam's two moments
    on = need > 0.85 * free
    return on, f"auto: ~{need / 2**30:.1f} GiB needed for {tokens} tokens per step, {free / 2**30:.1f} GiB free"


def qat_training_args(q, output_dir, seed: int, recompute: bool | None = None, report_to: list[str] = ()):
    """The recipe's qat section as TrainingArguments (schedule, precision, checkpoints, DeepSpeed). Under FSDP2
    and DeepSpeed the framework's bf16 is off and KDTrainer autocasts itself (see KDTrainer._autocast): both
    would otherwise keep bf16 copies of the parameters for the forward, and the fake-quant latents, in grid
    units, would be rounded to bf16 (1/64 of a grid step at 2-3 bits) before the quantizer rounds them."""
    on_gpu = torch.cuda.is_available()
    return quiet_training_args(
        output_dir=str(output_dir),
        max_steps=q.max_steps,
        per_device_train_batch_size=q.batch_size,
        gradient_accumulation_steps=q.grad_accum,
        learning_rate=q.lr,
        weight_decay=q.weight_decay,
        optim=q.optimizer,
        **schedule_args(q.schedule, q.max_steps, q.decay_ratio),
        warmup_steps=int(q.warmup_ratio * q.max_steps),
        bf16=q.bf16 and on_gpu and q.distributed == "ddp",
        save_steps=q.save_steps,
        logging_steps=q.logging_steps,
        report_to=list(dict.fromkeys([*report_to, *q.report_to])),  # the run's and the stage's own
        deepspeed=q.deepspeed,
        # The output head runs after the wrapped forward (chunked loss): DDP's unused-parameter search
        # would mark it unused at the end of forward and then fail when its gradient arrives.
        ddp_find_unused_parameters=False,
        **({"gradient_checkpointing": True} if (q.gradient_checkpointing if recompute is None else recompute) else {}),
        seed=seed,
        data_seed=seed,
    )


def train_one(ctx: StageContext, bits: int) -> None:
    """KD-QAT of one bit width from its init into the stage's directory; resumes from the last checkpoint."""
    r, q = ctx.recipe, ctx.recipe.qat
    v = Variant(bits, "qat")
    if finished_metrics(ctx.layout.trained(v)) is not None:
        return
    _check_fsdp2_device(q)
    if q.distributed == "fsdp2":  # before the Trainer's Accelerator reads them; under the user's torchrun too
        for key, value in FSDP2_ENV.items():
            os.environ.setdefault(key, value)
    device = best_device()
    torch.manual_seed(r.seed)
    tok = load_teacher_tokenizer(ctx)
    dataset = load_tokenized(ctx.layout.qat_data())  # built once by the calibrate stage (data/qat_data.py)
    collator = qat_collator(q.packing, tok.pad_token_id)
    cached = q.kd.teacher == "cached" and q.kd.loss != "ce"
    if cached:  # the teacher's top-k rows the calibrate stage stored: no teacher model in memory
        dataset = CachedTeacherDataset(dataset, TeacherCache(ctx.layout.teacher_cache()))
        collator = CachedTeacherCollator(collator)
    student = _init_student(ctx, bits, device)
    # under FSDP2 the teacher stays on the CPU until shard_frozen moves (or offloads) it a layer at a time
    teacher = None if q.kd.loss == "ce" or cached else \
        load_teacher(ctx, torch.bfloat16 if "cuda" in device else torch.float32,
                     "cpu" if q.distributed == "fsdp2" else device)
    if teacher is not None and compile_enabled(q.compile, device):
        compile_decoder_layers(teacher)
    recompute, why = choose_recompute(q.gradient_checkpointing, student, q.batch_size * q.data.max_length, device,
                                      compile_enabled(q.compile, device))
    print(f"qat w{bits}: gradient checkpointing {'on' if recompute else 'off'} ({why})", flush=True)
    args = qat_training_args(q, ctx.layout.trainer(v), r.seed, recompute, r.report_to)
    averaging = WeightAveraging.from_config(q)
    trainer = KDTrainer(
        model=student, args=args, train_dataset=dataset, data_collator=collator,
        teacher=teacher, kd=kd_spec(r), latent_lr=q.latent_lr, scale_lr=q.scale_lr, teacher_placement=q.kd.teacher_placement,
        autocast_dtype=torch.bfloat16 if q.distributed != "ddp" and q.bf16 and "cuda" in device else None,
        callbacks=[averaging.callback] if averaging else None,
    )
    readable_progress(trainer, f"qat w{bits}")
    resume = last_checkpoint(args.output_dir)
    if averaging:
        averaging.load(resume, device)
    initial = _initial_loss(trainer, ctx.layout.trainer(v) / "initial_loss.json", q.logging_steps * q.grad_accum)
    with sdpa_cudnn(r.model.cudnn_sdpa):
        result = trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    student = _whole(ctx, bits, trainer, student)
    with _gathered(trainer, student):  # ZeRO-3 holds a shard of each parameter per rank
        averaged = averaging.apply(student) if averaging else 0
        if trainer.is_world_process_zero():
            save_quantized_checkpoint(student, ctx.layout.checkpoint(v), tok, {"method": "qat", "bits": bits, "init": q.init,
                                                                    "loss": q.kd.loss})
            trainer.state.log_history.insert(0, {"step": 0, "loss": initial, "initial": True})
            metrics = {"train_loss": result.training_loss, "initial_loss": initial,
                       "final_logged_loss": losses[-1] if losses else None,
                       "steps": trainer.state.global_step, "averaged_snapshots": averaged,
                       "gradient_checkpointing": recompute, "gradient_checkpointing_reason": why, "init": q.init, "loss": q.kd.loss,
                       "kd_path": sorted(trainer.loss_paths), "distributed": q.distributed,
                       "processes": trainer.accelerator.num_processes, **trainer.teacher_placement,
                       **_data_origin(ctx.recipe)}
            spike = loss_spike(trainer.state.log_history, initial)
            metrics.update(spike)
            if spike["loss_spike"]:
                print(f"qat w{bits}: warning: the training loss rose to {spike['peak_logged_loss']:.4g} at step "
                      f"{spike['peak_loss_step']}, {spike['peak_loss_over_initial']:.0f}x its start ({initial:.4g}): training "
                      f"diverged for a while and the student may be broken even where the loss came back down; "
                      f"lower qat.latent_lr / qat.lr or raise qat.warmup_ratio", flush=True)
            finish_training(ctx, "qat", v, metrics, trainer.state.log_history)
    trainer.accelerator.wait_for_everyone()


LOSS_SPIKE_FACTOR = 10.0


def loss_spike(log_history: list[dict], initial: float, factor: float = LOSS_SPIKE_FACTOR) -> dict:
    """The highest logged training loss and whether it rose above `factor` x the loss of the
    initialisation (a divergence).

    `log_history` is transformers' `TrainerState.log_history` (dicts with "loss" and "step"); `initial`
    the loss measured on the initialisation before step 1 (`KDTrainer.initial_loss`), in the same units
    (nats per token). Returns {"peak_logged_loss", "peak_loss_step", "peak_loss_over_initial",
    "loss_spike"}; the peak is None without logged losses. Why a peak and not the last loss: on the
    GPU organism (research/organism/table-t350b) KD-QAT at W2G128 on foreign traces rose
    from 0.079 to 1.68 after the warm-up, came back to 0.069 (below its start) and scored 0.000 pass@1.
    Over the 48 QAT runs of the organism's tables (table-t350, -t350b, -t500) the peak is 0.8-7.2x the
    start in 42, and 13-21x in six: these two and KD-QAT from RTN at W2G128 (pass@1 0.363 on one
    teacher, 0.857 against 0.983 from GPTQ on the other): hence 10x."""
    logged = [(h["loss"], h.get("step")) for h in log_history
              if "loss" in h and not h.get("initial") and math.isfinite(h["loss"])]
    if not logged:
        return {"peak_logged_loss": None, "peak_loss_step": None, "peak_loss_over_initial": None, "loss_spike": False}
    peak, step = max(logged, key=lambda x: x[0])
    ratio = peak / initial if initial and initial > 0 else None
    return {"peak_logged_loss": peak, "peak_loss_step": step, "peak_loss_over_initial": ratio,
            "loss_spike": bool(ratio is not None and ratio > factor)}


def _data_origin(recipe) -> dict:
    """Where the student's targets came from, for compare's labels: the teacher (online, or its cached
    top-k) and the data (`common.qat_data_origin`)."""
    kd = recipe.qat.kd
    return {"teacher": kd.teacher, **({"cache_top_k": kd.cache_top_k} if kd.teacher == "cached" else {}),
            **qat_data_origin(recipe)}


def _initial_loss(trainer, path: Path, n_batches: int) -> float:
    """The loss of the initialisation (measured once, kept beside the checkpoints for a resumed run)."""
    if path.is_file():
        return json.loads(path.read_text())["initial_loss"]
    value = trainer.initial_loss(n_batches)
    if trainer.is_world_process_zero():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"initial_loss": value}))
    return value


def _gathered(trainer, model):
    """Full parameters on every rank for the duration (all ranks must enter), under ZeRO-3 only."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)


def _whole(ctx: StageContext, bits: int, trainer, student):
    """The trained student with whole parameters, for saving. Under FSDP2 (every rank must call this): its full
    state dict gathered to rank 0's CPU through torch.distributed.checkpoint (float32: the stage shards without
    a mixed-precision policy) and loaded into an unsharded student built there; None on the other ranks. FSDP2's
    own state_dict() hands out shards, which is why the sharded model itself is not saved."""
    if not trainer.is_fsdp_enabled:
        return student
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not trainer.is_world_process_zero():
        return None
    whole = _init_student(ctx, bits, "cpu", compile=False)
    whole.load_state_dict(full)
    return whole


def _exit_with_parent() -> None:
    """Launchers start each worker in a session of its own, so killing `rqat run` (even with
    SIGKILL) would leave the workers training into the partial stage, racing the next run. A
    worker whose launcher is gone exits: on Linux at once (the kernel's parent-death signal, prctl
    PR_SET_PDEATHSIG; a worker that polled once a second could still finish its last steps and mark the
    variant done after the kill), elsewhere within a second."""
    import signal

    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os._exit(1)

    def watch():
        while True:
            time.sleep(1)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker_main(argv=None) -> None:
    """Entry point of each process under `accelerate launch`."""
    _exit_with_parent()
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--input", action="append", default=[])
    a = p.parse_args(argv)
    recipe = recipe_from_run(a.run_dir)
    inputs = {k: Path(v) for k, v in (s.split("=", 1) for s in a.input)}
    ctx = StageContext(recipe, Path(a.run_dir), Path(a.out), inputs, stage="qat")
    for bits in recipe.quant.bits:
        train_one(ctx, bits)
    exit_worker()


def exit_worker(status: int = 0) -> None:
    """End a finished training worker process at once, with `status`: every rank meets at a barrier (none
    tears down mid-collective), the process group is destroyed, Python's exit handlers run (report_to
    integrations finish, logs flush) and stdout/stderr are flushed; then `os._exit`, which skips the C++
    runtime's teardown. Left to the interpreter's own exit, about 1 in 20 finished 2-process gloo runs aborted
    there ("terminate called without an active exception", SIGABRT, on the main thread with no Python frame
    left; pytorch/pytorch#190489) even with the group destroyed first, failing CI runs whose results were
    already written. Call it only as a worker's last statement: nothing after it runs."""
    import atexit

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    atexit._run_exitfuncs()  # what the interpreter's exit would run; os._exit runs none
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    _worker_main()
