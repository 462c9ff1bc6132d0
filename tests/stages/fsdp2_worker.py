"""Run by tests/stages/test_fsdp2.py under `torchrun --nproc-per-node 2` (gloo, CPU): the KD loss of a
fake-quant student sharded with FSDP2's fully_shard, in two layouts: `root` (each decoder layer, then the
root with the head, freed after forward) and `accelerate` (as Accelerate 1.16 shards it: also the embeddings
and a [final norm, head] unit of their own, so the head's class becomes FSDPLinear) against the same student unsharded, and a sharded teacher against
a whole one. Writes one JSON per rank into argv[1]."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import reasoning_qat.kd.heads as kd_module  # where batch_loss looks up the fused loss
from reasoning_qat.kd import KDSpec, batch_loss, shard_frozen
from reasoning_qat.quant import QuantScheme, QuantTargets, swap_in_fake_quant
from reasoning_qat.quant.fake_quant import train_quantizers
from reasoning_qat.stages.qat import exit_worker
from tests.conftest import tiny_qwen3


def batch(seed: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding
    labels[1, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def compare(tie: bool, loss: str, layout: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    teacher = tiny_qwen3(tie=tie, seed=1).float()
    student = copy.deepcopy(teacher)
    swap_in_fake_quant(student, QuantTargets(QuantScheme(2, 32)))  # the decoder's Linears; the head stays BF16
    train_quantizers(student, True)
    reference = copy.deepcopy(student).train()
    kd = KDSpec(loss=loss, chunk_size=5)
    batches = [batch(100 + r, teacher.config.vocab_size) for r in range(world)]

    # Unsharded: every rank's batch, gradients averaged over ranks as data parallelism does.
    ref_losses = []
    for b in batches:
        value = batch_loss(reference, teacher, b, kd)
        (value / world).backward()
        ref_losses.append(value.item())

    # Sharded, each rank its own batch; count the fused calls (the loss must not fall back to chunks).
    fused_calls = 0
    fused = kd_module.fused_distill_loss

    def counting(*a, **k):
        nonlocal fused_calls
        fused_calls += 1
        return fused(*a, **k)

    kd_module.fused_distill_loss = counting
    for layer in student.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    if layout == "accelerate":  # Accelerate 1.16's fsdp2_prepare_model: embeddings and [final norm, head] apart
        embed, head = student.get_input_embeddings(), student.get_output_embeddings()
        if not tie:
            fully_shard(embed, reshard_after_forward=True)
        fully_shard([student.model.norm, *([embed] if tie else []), head], reshard_after_forward=False)
    fully_shard(student, reshard_after_forward=True)
    sharded_teacher = shard_frozen(copy.deepcopy(teacher))
    student.train()
    value = batch_loss(student, sharded_teacher, batches[rank], kd)
    value.backward()
    kd_module.fused_distill_loss = fused

    ref_params = dict(reference.named_parameters())
    worst, sharded, missing = 0.0, 0, []
    for name, p in student.named_parameters():
        if p.grad is None:
            missing.append(name)
            continue
        sharded += isinstance(p, DTensor)
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        worst = max(worst, (g - ref_params[name].grad).abs().max().item() / (ref_params[name].grad.abs().max().item() + 1e-12))
    head = student.get_output_embeddings().weight
    return {"rank": rank, "tie": tie, "loss": loss, "layout": layout, "value": value.item(), "reference": ref_losses[rank],
            "worst_relative_grad_diff": worst, "sharded_params": sharded, "params": len(ref_params),
            "missing_grads": missing, "fused_calls": fused_calls, "head_is_dtensor": isinstance(head, DTensor)}


def main():
    dist.init_process_group("gloo")
    out = Path(sys.argv[1])
    results = [compare(tie, loss, layout) for tie in (False, True) for loss in ("forward_kl", "ce")
               for layout in ("root", "accelerate")]
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    exit_worker()  # as the qat stage's workers end: an interpreter exit can abort after gloo (its docstring)


if __name__ == "__main__":
    main()
