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
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from .data.reasoning import IGNORE_INDEX
from .data.teacher_cache import KEYS as CACHED_TEACHER
from .errors import SpecError, TrainingDiverged
from .training import grouped_optimizer

LOSSES = ("forward_kl", "reverse_kl", "jsd", "ce")


@dataclass(frozen=True)
class KDSpec:
    """The distillation objective. `loss`: forward KL(teacher || student) (the paper's robust choice for
    reasoning models), reverse KL, generalised JSD (GKD, Agarwal et al. 2024) with mixture weight `jsd_beta`,
    or `ce` on the data (no teacher). Logits of both divided by `temperature` (losses scaled by T^2, Hinton
    et al. 2015); `top_k`: the teacher renormalised over its top-k tokens (forward KL only). The vocabulary
    projection runs `chunk_size` positions at a time, `fused` (closed-form gradients) where it can.
    Raises SpecError on a loss or a value outside its range."""

    loss: str = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    top_k: int | None = None
    chunk_size: int = 1024
    fused: bool = True

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise SpecError("loss", f"{self.loss!r} (allowed: {', '.join(LOSSES)})")
        for key, ok in (("temperature", self.temperature > 0), ("jsd_beta", 0 < self.jsd_beta < 1),
                        ("chunk_size", self.chunk_size >= 1)):
            if not ok:
                raise SpecError(key, "out of range (temperature > 0, 0 < jsd_beta < 1, chunk_size >= 1)")


# ---- per-token losses on [n, vocab] logits; each returns the summed loss over the n tokens ---------

def forward_kl(s_logits, t_logits, temperature=1.0, top_k=None):
    """Forward KL(teacher || student) summed over n tokens of [n, vocab] logits, at `temperature` (scaled by
    T^2, Hinton et al. 2015); `top_k`: teacher renormalised over its top-k."""
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    if top_k:
        t_top, idx = (t_logits / temperature).topk(top_k, dim=-1)
        t_logp = F.log_softmax(t_top, dim=-1)  # teacher renormalised over its top-k
        return (t_logp.exp() * (t_logp - s_logp.gather(-1, idx))).sum() * temperature**2
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum() * temperature**2


def cached_forward_kl(s_logits, values, indices, tail, temperature=1.0):
    """Forward KL against a cached teacher (data/teacher_cache.py), summed over n tokens: the teacher kept as its
    top-k log-probabilities `values` [n, k] at token ids `indices` [n, k] plus the log of the rest of its mass
    `tail` [n]; the student's [n, vocab] logits are read the same way (its top-k-set log-probabilities and the
    log of its mass outside that set). The KL between the two distributions over k + 1 outcomes (the k tokens,
    the rest): zero only where they agree, never above the full forward KL, equal to it when k is the
    vocabulary. Scaled by T^2 like the others."""
    s_logp = F.log_softmax(s_logits.float() / temperature, dim=-1)
    s_top = s_logp.gather(-1, indices)
    s_rest = s_logp.scatter(-1, indices, float("-inf")).logsumexp(-1)
    top = (values.exp() * (values - s_top)).sum()
    # a tail of zero mass (k = vocabulary) adds nothing; where() keeps 0 * (-inf) out of value and gradient
    has_tail = torch.isfinite(tail)
    rest = torch.where(has_tail, tail.exp() * (tail - torch.where(has_tail, s_rest, 0.0)), 0.0).sum()
    return (top + rest) * temperature**2


def reverse_kl(s_logits, t_logits, temperature=1.0, top_k=None):
    """Reverse KL(student || teacher) summed over n tokens of [n, vocab] logits, scaled by T^2."""
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    return (s_logp.exp() * (s_logp - t_logp)).sum() * temperature**2


def jsd(s_logits, t_logits, temperature=1.0, beta=0.5, top_k=None):
    """Generalised JSD: beta * KL(teacher || m) + (1 - beta) * KL(student || m), m = beta*t + (1-beta)*s."""
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), dim=0)
    kl_t = (t_logp.exp() * (t_logp - m_logp)).sum()
    kl_s = (s_logp.exp() * (s_logp - m_logp)).sum()
    return (beta * kl_t + (1 - beta) * kl_s) * temperature**2


def chunked_distill_loss(h_s, h_t, head_s: nn.Module, head_t: nn.Module | None, targets, kd, chunk_size: int,
                         cached: tuple | None = None):
    """Mean per-token loss over n selected positions from hidden states [n, H].

    kd.loss == "ce" uses `targets` (next tokens) and ignores the teacher; `cached` (values, indices, tail of the
    n positions, data/teacher_cache.py) stands in for the teacher's hidden states and head (forward KL only).
    """
    n = h_s.shape[0]
    total = h_s.new_zeros((), dtype=torch.float32)

    def project(head, h):
        # Accelerate's mixed-precision wrapper returns float32 hidden states while a bf16 teacher's
        # head holds bf16 weights: feed each head its own dtype.
        return head(h.to(next(head.parameters()).dtype)).float()

    def piece(hs, ht, tg, *teacher_rows):
        s_logits = project(head_s, hs)
        if kd.loss == "ce":
            return F.cross_entropy(s_logits, tg, reduction="sum")
        if teacher_rows:
            return cached_forward_kl(s_logits, *teacher_rows, kd.temperature)
        with torch.no_grad():
            t_logits = project(head_t, ht)
        return distill_loss(s_logits, t_logits, kd)

    for i in range(0, n, chunk_size):
        ht = h_t[i : i + chunk_size] if h_t is not None else None
        rows = [c[i : i + chunk_size] for c in cached] if cached is not None else []
        # Checkpointing recomputes this chunk's logits in the backward pass instead of storing them.
        total = total + checkpoint(piece, h_s[i : i + chunk_size], ht, targets[i : i + chunk_size], *rows,
                                   use_reentrant=False)
    return total / max(n, 1)


def _loss_and_grad(s_logits, t_logits, targets, loss: str, temperature: float, beta: float, out_dtype):
    """Summed loss over a chunk and its gradient w.r.t. the student's logits (closed forms of the
    losses above, so no autograd graph over [chunk, vocab] is built)."""
    if loss == "ce":
        s_logp = s_logits.float().log_softmax(-1)
        rows = torch.arange(s_logp.shape[0], device=s_logp.device)
        value = -s_logp[rows, targets].sum()
        grad = s_logp.exp().index_put((rows, targets), torch.tensor(-1.0, device=s_logp.device), accumulate=True)
        return value, grad.to(out_dtype)
    T = temperature
    s_logp = (s_logits.float() / T).log_softmax(-1)
    t_logp = (t_logits.float() / T).log_softmax(-1)
    p_s = s_logp.exp()
    if loss == "forward_kl":
        p_t = t_logp.exp()
        value = (p_t * (t_logp - s_logp)).sum() * T**2
        return value, ((p_s - p_t) * T).to(out_dtype)
    if loss == "reverse_kl":
        r = s_logp - t_logp
        value = (p_s * r).sum() * T**2
        weight = 1.0
    else:  # generalised JSD; d/ds of beta*KL(t||m) + (1-beta)*KL(s||m) = (1-beta) * p_s * (r - E_s[r]), r = log p_s - log m
        m_logp = torch.logaddexp(t_logp + math.log(beta), s_logp + math.log(1 - beta))
        value = (beta * (t_logp.exp() * (t_logp - m_logp)).sum() + (1 - beta) * (p_s * (s_logp - m_logp)).sum()) * T**2
        r = s_logp - m_logp
        weight = 1 - beta
    grad = p_s * (r - (p_s * r).sum(-1, keepdim=True)) * (weight * T)
    return value, grad.to(out_dtype)


_compiled_loss_and_grad = None


def distill_loss(s_logits, t_logits, kd: KDSpec):
    """The summed loss of `kd.loss` over [n, vocab] student and teacher logits (autograd path)."""
    if kd.loss == "forward_kl":
        return forward_kl(s_logits, t_logits, kd.temperature, kd.top_k)
    if kd.loss == "reverse_kl":
        return reverse_kl(s_logits, t_logits, kd.temperature)
    return jsd(s_logits, t_logits, kd.temperature, kd.jsd_beta)


def _chunk_loss_fn(device: torch.device):
    """The per-chunk loss, compiled on GPUs: the softmax math then reads the logits a few times
    instead of once per elementwise op (the profile's ~35% of a step)."""
    global _compiled_loss_and_grad
    if device.type != "cuda":
        return _loss_and_grad
    if _compiled_loss_and_grad is None:
        _compiled_loss_and_grad = torch.compile(_loss_and_grad, dynamic=True)
    return _compiled_loss_and_grad


class _FusedLinearDistill(torch.autograd.Function):
    """loss = sum over chunks of the per-token loss of (h_s W_s^T, h_t W_t^T); gradients computed
    in the forward pass (the backward pass only scales them)."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, loss, temperature, jsd_beta, chunk_size, dtype, want_grad):
        n = h_s.shape[0]
        fn = _chunk_loss_fn(h_s.device)
        w = w_s.to(dtype)
        wt = w_t.to(dtype) if w_t is not None else None
        grad_h = torch.empty_like(h_s) if want_grad else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        for i in range(0, n, chunk_size):
            hs = h_s[i : i + chunk_size].to(dtype)
            t_logits = h_t[i : i + chunk_size].to(dtype) @ wt.T if wt is not None else None
            value, g = fn(hs @ w.T, t_logits, targets[i : i + chunk_size], loss, temperature, jsd_beta, dtype)
            total += value
            if want_grad:
                grad_h[i : i + chunk_size] = g @ w
                grad_w += g.T @ hs
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, (grad_w * grad_out).to(ctx.w_dtype), None, None, None, None, None, None, None, None, None


def can_fuse(head_s: nn.Module, head_t: nn.Module | None, kd) -> bool:
    """The fused path needs plain bias-free Linear heads (gathered, when sharded: see loss_through_head) and a
    loss it has a closed-form gradient for (not top-k)."""
    heads = [head_s] + ([head_t] if kd.loss != "ce" else [])
    # isinstance, not type(): FSDP2 swaps a sharded head's class for a subclass (FSDPLinear) with Linear's forward;
    # a subclass with a forward of its own (ActQuantLinear) computes something else.
    return kd.fused and not kd.top_k and all(
        isinstance(h, nn.Linear) and type(h).forward is nn.Linear.forward and h.bias is None for h in heads)


def fused_distill_loss(h_s, h_t, head_s: nn.Linear, head_t: nn.Linear | None, targets, kd, chunk_size: int,
                       dtype: torch.dtype | None = None):
    """Mean per-token loss over n positions, as chunked_distill_loss, with the projections in
    `dtype` (the training's compute dtype; default: the student head's)."""
    dtype = dtype or head_s.weight.dtype
    n = h_s.shape[0]
    with torch.autocast(h_s.device.type, enabled=False):
        total = _FusedLinearDistill.apply(h_s, head_s.weight, h_t if kd.loss != "ce" else None,
                                          head_t.weight if kd.loss != "ce" else None, targets, kd.loss, kd.temperature,
                                          kd.jsd_beta, chunk_size, dtype,
                                          torch.is_grad_enabled())
    return total / max(n, 1)


def naive_distill_loss(s_logits_full, t_logits_full, labels, kd):
    """Reference: full-logits loss (what chunking avoids); used by tests and the benchmark."""
    mask = labels[:, 1:] != IGNORE_INDEX
    s, t = s_logits_full[:, :-1][mask].float(), t_logits_full[:, :-1][mask].float()
    if kd.loss == "ce":
        return F.cross_entropy(s, labels[:, 1:][mask], reduction="mean")
    return distill_loss(s, t, kd) / max(int(mask.sum()), 1)


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
