"""Knowledge-distillation losses and the KD-QAT trainer (a `transformers.Trainer` subclass).

Neither the student's nor the teacher's full [tokens, vocab] logits ever exist (Qwen3's vocabulary
is 151k): the vocabulary projection runs in chunks of positions. Two implementations:
- `fused_distill_loss` (default): projection + loss + gradient in one pass per chunk, in the
  training's compute dtype (bf16 GEMMs, float32 softmax math, compiled on GPUs); the gradients
  of the hidden states and of the head are computed in the forward pass, so nothing is recomputed.
- `chunked_distill_loss`: autograd through each chunk under activation checkpointing (the logits
  are recomputed in the backward pass); used for top-k KD, heads with a bias or quantized heads,
  and as the reference the fused path is tested against.
Only response tokens (labels != -100) enter the loss.

The loss runs inside the student's own forward, in place of its output head (`loss_through_head`): there
FSDP2 holds the root's parameters unsharded and ZeRO-3's hooks on the head gather its weight once per step,
so the fused path runs sharded too, and the head's gradient reaches its shard the framework's own way.

Split by concern: `losses` (the objectives), `fused` (chunked projection + loss), `heads` (the loss inside the
student's forward), `placement` (the teacher under FSDP2), `trainer` (KDTrainer).
"""

from .fused import can_fuse, chunked_distill_loss, fused_distill_loss
from .heads import batch_loss, gathered_head, hidden_and_head, loss_through_head
from .losses import (
    LOSSES,
    KDSpec,
    cached_forward_kl,
    distill_loss,
    forward_kl,
    jsd,
    naive_distill_loss,
    reverse_kl,
)
from .placement import choose_teacher_placement, shard_frozen
from .trainer import KDTrainer

__all__ = [
    "LOSSES", "KDSpec", "KDTrainer", "batch_loss", "cached_forward_kl", "can_fuse", "choose_teacher_placement",
    "chunked_distill_loss", "distill_loss", "forward_kl", "fused_distill_loss", "gathered_head", "hidden_and_head",
    "jsd", "loss_through_head", "naive_distill_loss", "reverse_kl", "shard_frozen",
]
