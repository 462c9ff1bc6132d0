"""The KD-QAT trainer: a `transformers.Trainer` subclass whose loss is distillation from a frozen teacher."""

from __future__ import annotations

import contextlib

import torch
from transformers import Trainer

from ..errors import TrainingDiverged
from ..training import grouped_optimizer
from .heads import batch_loss
from .losses import KDSpec
from .placement import _gpu_bytes, choose_teacher_placement, shard_frozen


class KDTrainer(Trainer):
    """Trainer whose loss is distillation from a frozen teacher (or plain CE, for comparison).

    Latent weights (`latent_lr`, grid steps) and quantizer scales/zeros (`scale_lr`, grid steps at the edge) get
    their own learning rates (`training.grouped_optimizer`); everything else about the loop
    (accumulation, mixed precision, DeepSpeed, checkpoints, resume, logging) is the Trainer's.
    """

    def __init__(self, *args, teacher=None, kd: KDSpec | None = None, latent_lr: float | None = None, scale_lr: float | None = None,
                 autocast_dtype: torch.dtype | None = None, teacher_placement: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.autocast_dtype = autocast_dtype
        self.loss_paths: set[str] = set()  # fused / chunked / cached: what compute_loss ran (the qat metrics record it)
        self.latent_lr = latent_lr
        # The loss below is a per-batch mean; let the Trainer average it over accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.kd = kd or KDSpec()
        self.scale_lr = scale_lr
        self.teacher = None
        self.teacher_placement: dict = {}  # under FSDP2: where the teacher went and the estimate that chose it
        if teacher is not None and self.kd.loss != "ce":
            teacher.eval().requires_grad_(False)
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                self.teacher = prepare_deepspeed(teacher, self.accelerator)
            elif self.is_fsdp_enabled:
                placed, estimate = choose_teacher_placement(
                    teacher, self.model, self.accelerator.num_processes, _gpu_bytes(self.accelerator.device),
                    teacher_placement)
                self.teacher_placement = {"teacher_placement": placed, **estimate}
                self.teacher = shard_frozen(teacher, offload=placed == "offload")
            else:
                self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def create_optimizer(self, model=None):
        """AdamW (the Trainer's `optim`) with grid-unit learning rates for latents and quantizers
        (training.grouped_optimizer)."""
        if self.optimizer is None:
            self.optimizer = grouped_optimizer(self, self.latent_lr, self.scale_lr)
        return self.optimizer

    @torch.no_grad()
    def initial_loss(self, n_batches: int) -> float:
        """Mean loss of the initialisation over `n_batches` training batches, before any update: the
        baseline to read the logged losses against (each is a mean over logging_steps batches too)."""
        losses = []
        gpus = list(range(torch.cuda.device_count()))
        with torch.random.fork_rng(devices=gpus):  # drawing these batches must not change the training's order
            for i, batch in enumerate(self.get_train_dataloader()):
                if i == n_batches:
                    break
                losses.append(self.compute_loss(self.model, self._prepare_inputs(batch)).item())
        return sum(losses) / len(losses)

    def _compute_dtype(self) -> torch.dtype | None:
        """The dtype the body's matmuls run in (mixed precision), for the head's too: without it the
        float32 master copy of the head made the loss's GEMMs the slowest part of a step. None: the head's."""
        if self.accelerator.device.type == "cuda" and (self.args.bf16 or self.args.fp16 or self.autocast_dtype):
            return self.autocast_dtype or (torch.bfloat16 if self.args.bf16 else torch.float16)
        return None

    def _autocast(self):
        """The stage's own autocast where the framework's mixed precision is off on purpose (FSDP2's
        MixedPrecisionPolicy and DeepSpeed's bf16 mode would hand the fake-quant layers bf16 latents, rounding
        them before the quantizer does; the parameters stay float32 as on one GPU, the matmuls run in bf16)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=self.autocast_dtype)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The per-batch mean distillation loss (kd.loss) over response tokens (batch_loss)."""
        with self._autocast():
            loss = batch_loss(model, self.teacher, inputs, self.kd, self._compute_dtype(), self.accelerator.unwrap_model,
                              self.loss_paths)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"qat: the loss became {loss.item()} at step {self.state.global_step + 1}; the last good checkpoint is "
                f"kept in {self.args.output_dir}; lower lr or scale_lr and re-run (it resumes from there)"
            )
        return (loss, None) if return_outputs else loss
