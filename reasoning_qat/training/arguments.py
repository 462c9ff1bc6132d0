"""The Trainer arguments every trainer here shares: LR schedules, quiet logging, the grouped optimizer
(latent and scale learning rates in grid units), the last checkpoint to resume from."""

from __future__ import annotations

from pathlib import Path

SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup", "wsd": "warmup_stable_decay"}


def schedule_args(schedule: str, steps: int, decay_ratio: float) -> dict:
    """TrainingArguments for a recipe's `schedule` (cosine, constant, wsd with its decay fraction)."""
    return {"lr_scheduler_type": SCHEDULES[schedule],
            "lr_scheduler_kwargs": {"num_decay_steps": max(1, int(decay_ratio * steps))} if schedule == "wsd" else {}}


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` in output_dir, or None (fresh start). Not
    transformers.trainer_utils.get_last_checkpoint: that one takes the highest-numbered directory even
    when a crash cut its saving short (no trainer_state.json), and resuming from it fails."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    # A crash while saving can leave a checkpoint without its trainer state: skip such ones.
    done = sorted((p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[-1]))
    return str(done[-1]) if done else None


def quiet_training_args(cls=None, **kwargs):
    """TrainingArguments with the project's defaults: no hub, no reporting unless asked, safetensors."""
    import torch
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    defaults = dict(
        report_to=[],
        save_total_limit=2,
        save_only_model=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # Log the loss the model computed: transformers' default logs the running mean in place of a NaN/inf
        # loss, which makes a NaN forward look like a finite loss with NaN gradients
        logging_nan_inf_filter=False,
        # Without CUDA, say so: Accelerate then sets up gloo data parallelism (MULTI_CPU) under
        # torchrun instead of leaving every rank to train and checkpoint on its own.
        use_cpu=not torch.cuda.is_available(),
    )
    defaults.update(kwargs)
    return cls(**defaults)


def grouped_optimizer(trainer, latent_lr: float | None, scale_lr: float | None):
    """The trainer's optimizer class with three learning rates: `args.learning_rate` for ordinary
    parameters, `latent_lr` for the latent weights of fake-quant layers and `scale_lr` for their
    scales and zeros. The latter two live in grid units (see FakeQuantLinear), so these rates mean
    grid steps per update (for a step size: grid steps at the grid's edge), at every bit width.
    None: the group trains at args.learning_rate."""
    from ..quant.fake_quant import quant_parameters

    model, args = trainer.model, trainer.args
    latents, quantizers = quant_parameters(model)
    special = {id(p) for p in latents + quantizers}
    decay = set(trainer.get_decay_parameter_names(model))
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in special]
    groups = [
        {"params": [p for n, p in rest if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in rest if n not in decay], "weight_decay": 0.0},
        {"params": [p for p in latents if p.requires_grad], "weight_decay": args.weight_decay,
         "lr": latent_lr or args.learning_rate},
        {"params": [p for p in quantizers if p.requires_grad], "weight_decay": 0.0, "lr": scale_lr or args.learning_rate},
    ]
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(args, model)
    return cls([g for g in groups if g["params"]], **kwargs)
