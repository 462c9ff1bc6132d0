"""Where the loss runs: inside the student's own forward, in place of its output head (`loss_through_head`).
There FSDP2 holds the root's parameters unsharded and ZeRO-3's hooks on the head gather its weight once per
step, so the fused path runs sharded too, and the head's gradient reaches its shard the framework's own way.
`batch_loss` is one batch's mean loss over response tokens (labels != -100)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..data.reasoning import IGNORE_INDEX
from ..data.teacher_cache import KEYS as CACHED_TEACHER
from .fused import can_fuse, chunked_distill_loss, fused_distill_loss
from .losses import KDSpec


class _HiddenOnly:
    """Temporarily swap a causal LM's output head for `stand_in` (identity: the forward returns the final hidden
    states), so the vocabulary projection can run chunked."""

    IDENTITY = nn.Identity()  # one instance: a compiled forward then sees the same module every step

    def __init__(self, model, stand_in: nn.Module | None = None):
        self.model = model
        self.head = model.get_output_embeddings()
        self.stand_in = stand_in or self.IDENTITY

    def __enter__(self):
        self.model.set_output_embeddings(self.stand_in)
        return self.head

    def __exit__(self, *exc):
        self.model.set_output_embeddings(self.head)


def hidden_and_head(model, unwrapped, input_ids, attention_mask, position_ids=None):
    # Packed rows come with position_ids restarting per example and no attention mask; transformers
    # then builds a block-diagonal causal mask, so examples never attend to each other.
    """The final hidden states [batch, seq, hidden] of a causal LM (its head swapped for identity) and its
    output head."""
    with _HiddenOnly(unwrapped) as head:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    return hidden, head


class _HeadLoss(nn.Module):
    """Stands in for the output head during the student's forward and returns `loss_fn(hidden, head)` instead
    of logits. It calls the real head module with its forward replaced by the loss, so whatever hooks the
    training framework put on the head run around the loss: ZeRO-3 gathers the head's weight (and again for
    the backward pass), and under FSDP2 the loss runs while the root's parameters are unsharded. Inside,
    `head` is the module with its ordinary forward (for the chunked path's projections)."""

    def __init__(self, head: nn.Module, loss_fn):
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: the model's parameters must not be listed twice
        self.loss_fn = loss_fn

    def forward(self, hidden):
        head = self.head
        plain = _PlainForward(head)
        head.forward = lambda h: self.loss_fn(h, plain)
        try:
            return head(hidden)
        finally:
            del head.forward


class _PlainForward(nn.Module):
    """The head's own forward without its hooks (the enclosing call ran them once); `.head` is the module."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.__dict__["head"] = head

    def forward(self, h):
        return type(self.head).forward(self.head, h)

    def parameters(self, recurse=True):
        return self.head.parameters(recurse)


def loss_through_head(model, unwrapped, input_ids, attention_mask, position_ids, loss_fn):
    """Run the causal LM's forward with its output head replaced by `loss_fn(hidden [batch, seq, hidden], head)`
    (a scalar); returns that scalar. See _HeadLoss for why the loss runs inside the forward."""
    head = unwrapped.get_output_embeddings()
    with _HiddenOnly(unwrapped, _HeadLoss(head, loss_fn)):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits


def gathered_head(head: nn.Module | None):
    """The teacher's output head with its full weight for the duration (no gradient): ZeRO-3 partitions
    gathered. Under FSDP2 the head is whole already (shard_frozen keeps the teacher's root gathered)."""
    if head is not None and hasattr(head.weight, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(head.parameters()))
    return contextlib.nullcontext()


def batch_loss(student, teacher, inputs: dict, kd: KDSpec, compute_dtype: torch.dtype | None = None,
               unwrap=lambda m: m, paths: set | None = None) -> torch.Tensor:
    """Mean per-token loss `kd.loss` of one batch over its response tokens (labels != -100): inputs hold
    input_ids and labels [batch, seq] (attention_mask, position_ids optional). The teacher's final hidden
    states come first (no gradient); the student's loss then runs inside its forward (loss_through_head),
    fused where can_fuse allows, the projections in `compute_dtype` (None: the head's dtype). Inputs holding a
    cached teacher's rows (data/teacher_cache.py KEYS) need no teacher model (`teacher` may be None). `unwrap` maps a
    wrapped model (DDP, DeepSpeed) to the module whose head is swapped; `paths` collects which loss ran
    ("fused", "chunked" or "cached")."""
    ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
    pos = inputs.get("position_ids")
    sel = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    targets = labels[:, 1:][sel]
    h_t, head_t = None, None
    cached = tuple(inputs[k] for k in CACHED_TEACHER) if CACHED_TEACHER[0] in inputs else None
    if cached is not None and (kd.loss != "forward_kl" or kd.top_k or len(cached[0]) != len(targets)):
        raise ValueError(f"a cached teacher serves forward_kl without top_k, one row per response token "
                         f"({len(cached[0])} rows for {len(targets)} tokens, loss {kd.loss})")
    if kd.loss != "ce" and cached is None:
        with torch.no_grad():
            h_t, head_t = hidden_and_head(teacher, unwrap(teacher), ids, mask, pos)
        h_t = h_t[:, :-1][sel]

    def loss_fn(hidden, plain_head):
        h_s, head_s = hidden[:, :-1][sel], plain_head.head
        if cached is not None:  # the cached teacher's rows instead of its hidden states (autograd path)
            if paths is not None:
                paths.add("cached")
            return chunked_distill_loss(h_s, None, plain_head, None, targets, kd, kd.chunk_size, cached)
        with gathered_head(head_t):
            fused = can_fuse(head_s, head_t, kd)
            if paths is not None:
                paths.add("fused" if fused else "chunked")
            if fused:
                return fused_distill_loss(h_s, h_t, head_s, head_t, targets, kd, kd.chunk_size, compute_dtype)
            return chunked_distill_loss(h_s, h_t, plain_head, head_t, targets, kd, kd.chunk_size)

    return loss_through_head(student, unwrap(student), ids, mask, pos, loss_fn)
