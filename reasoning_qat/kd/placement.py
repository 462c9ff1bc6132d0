"""Where the frozen teacher lives under FSDP2: sharded over the GPUs, or its shards in CPU memory."""

from __future__ import annotations

import os

import torch
from torch import nn


def shard_frozen(model: nn.Module, offload: bool = False) -> nn.Module:
    """Shard a frozen model (the teacher) with FSDP2's fully_shard over all ranks: each decoder layer a unit of
    its own, gathered for its forward and freed after it; the root (embeddings, final norm, output head) stays
    gathered after the first forward, so the loss reads the teacher's head with no gather per step. No
    optimizer state, no gradients. (TRL's prepare_fsdp shards the whole model as one unit, which gathers the
    entire teacher at every forward.) The model may sit on the CPU: fully_shard moves one unit at a time to
    the mesh's device, so a GPU never holds more than one whole layer of it. `offload`: the shards stay in
    (pinned) CPU memory and each unit is copied to the GPU for its forward (FSDP2's CPUOffloadPolicy)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    # pinned memory (faster copies to the GPU) needs CUDA; a CPU mesh (the tests') offloads unpinned
    policy = {"offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available())} if offload else {}
    layers = getattr(model.get_decoder(), "layers", [])
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, **policy)
    fully_shard(model, reshard_after_forward=False, **policy)
    return model


def choose_teacher_placement(teacher: nn.Module, student: nn.Module, world_size: int, gpu_bytes: int,
                      choice: str = "auto") -> tuple[str, dict]:
    """Where a frozen teacher goes under FSDP2: "shard" or "offload" (`shard_frozen`), by the memory it needs.

    Per GPU, sharded: the teacher's decoder layers / world_size, plus its root (embeddings, norm, head: kept
    gathered) and one whole layer (gathered for its forward); the student's parameters, gradients and two
    AdamW moments (4 x its parameter bytes) / world_size. `auto` shards when both fit in 90% of `gpu_bytes`
    (one GPU's memory, bytes), leaving the rest for activations, and offloads otherwise; `shard` / `offload`
    force it. Returns (placement, {"teacher_bytes_per_gpu", "student_bytes_per_gpu", "gpu_bytes"}: the estimate).
    Raises ValueError on another choice."""
    if choice not in ("auto", "shard", "offload"):
        raise ValueError(f"teacher placement {choice!r}: one of auto, shard, offload")

    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    layers = list(getattr(teacher.get_decoder(), "layers", []))
    layer_bytes = [nbytes(layer) for layer in layers]
    total = nbytes(teacher)
    teacher_need = sum(layer_bytes) / world_size + (total - sum(layer_bytes)) + max(layer_bytes, default=0)
    student_need = 4 * nbytes(student) / world_size
    estimate = {"teacher_bytes_per_gpu": int(teacher_need), "student_bytes_per_gpu": int(student_need),
                "gpu_bytes": int(gpu_bytes)}
    if choice != "auto":
        return choice, estimate
    return ("shard" if teacher_need + student_need <= 0.9 * gpu_bytes else "offload"), estimate


def _gpu_bytes(device: torch.device) -> int:
    """One device's memory in bytes: the GPU's, or the machine's RAM for a CPU process."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
