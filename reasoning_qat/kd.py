"""Knowledge-distillation losses and the KD-QAT trainer (a `transformers.Trainer` subclass).

Neither the student's nor the teacher's full [tokens, vocab] logits ever exist (Qwen3's vocabulary
is 151k): the vocabulary projection runs in chunks of positions. Two implementations:
- `fused_distill_loss` (default): projection + loss + gradient in one pass per chunk, in the
  training's compute dtype (bf16 GEMMs, float32 softmax math, compiled on GPUs); the gradients
  of the hidden states and of the head are computed in the forward pass, so nothing is recomputed.
- `chunked_distill_loss`: autograd through each chunk under activation checkpointing (the logits
  are recomputed in the backward pass); used for top-k KD, heads with a bias or quantized heads,
  and ZeRO-3-partitioned heads, and as the reference the fused path is tested against.
Only response tokens (labels != -100) enter the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from .data.reasoning import IGNORE_INDEX
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


def chunked_distill_loss(h_s, h_t, head_s: nn.Module, head_t: nn.Module | None, targets, kd, chunk_size: int):
    """Mean per-token loss over n selected positions from hidden states [n, H].

    kd.loss == "ce" uses `targets` (next tokens) and ignores the teacher.
    """
    n = h_s.shape[0]
    total = h_s.new_zeros((), dtype=torch.float32)

    def project(head, h):
        # Accelerate's mixed-precision wrapper returns float32 hidden states while a bf16 teacher's
        # head holds bf16 weights: feed each head its own dtype.
        return head(h.to(next(head.parameters()).dtype)).float()

    def piece(hs, ht, tg):
        s_logits = project(head_s, hs)
        if kd.loss == "ce":
            return F.cross_entropy(s_logits, tg, reduction="sum")
        with torch.no_grad():
            t_logits = project(head_t, ht)
        return distill_loss(s_logits, t_logits, kd)

    for i in range(0, n, chunk_size):
        ht = h_t[i : i + chunk_size] if h_t is not None else None
        # Checkpointing recomputes this chunk's logits in the backward pass instead of storing them.
        total = total + checkpoint(piece, h_s[i : i + chunk_size], ht, targets[i : i + chunk_size], use_reentrant=False)
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
    """The fused path needs plain bias-free Linear heads whose full weights this process holds
    (not ZeRO-3 shards) and a loss it has a closed-form gradient for (not top-k)."""
    heads = [head_s] + ([head_t] if kd.loss != "ce" else [])
    return kd.fused and not kd.top_k and all(
        type(h) is nn.Linear and h.bias is None and not hasattr(h.weight, "ds_id") for h in heads)


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
    """Temporarily swap a causal LM's output head for identity, so the wrapped forward (DDP,
    DeepSpeed) returns final hidden states and the vocabulary projection can run chunked."""

    IDENTITY = nn.Identity()  # one instance: a compiled forward then sees the same module every step

    def __init__(self, model):
        self.model = model
        self.head = model.get_output_embeddings()

    def __enter__(self):
        self.model.set_output_embeddings(self.IDENTITY)
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


class KDTrainer(Trainer):
    """Trainer whose loss is distillation from a frozen teacher (or plain CE, for comparison).

    Latent weights (`latent_lr`, grid steps) and quantizer scales/zeros (`scale_lr`, grid steps at the edge) get
    their own learning rates (`training.grouped_optimizer`); everything else about the loop
    (accumulation, mixed precision, DeepSpeed, checkpoints, resume, logging) is the Trainer's.
    """

    def __init__(self, *args, teacher=None, kd: KDSpec | None = None, latent_lr: float | None = None, scale_lr: float | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.latent_lr = latent_lr
        # The loss below is a per-batch mean; let the Trainer average it over accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.kd = kd or KDSpec()
        self.scale_lr = scale_lr
        self.teacher = None
        if teacher is not None and self.kd.loss != "ce":
            teacher.eval().requires_grad_(False)
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                self.teacher = prepare_deepspeed(teacher, self.accelerator)
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

    def _compute_dtype(self, head) -> torch.dtype:
        """The dtype the body's matmuls run in (mixed precision), for the head's too: without it the
        float32 master copy of the head made the loss's GEMMs the slowest part of a step."""
        if head.weight.device.type == "cuda" and (self.args.bf16 or self.args.fp16):
            return torch.bfloat16 if self.args.bf16 else torch.float16
        return head.weight.dtype

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The per-batch mean distillation loss (kd.loss) over response tokens; fused where can_fuse allows."""
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
        pos = inputs.get("position_ids")
        unwrapped = self.accelerator.unwrap_model(model)
        h_s, head_s = hidden_and_head(model, unwrapped, ids, mask, pos)
        sel = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
        targets = labels[:, 1:][sel]
        h_t, head_t = None, None
        if self.kd.loss != "ce":
            with torch.no_grad():
                t_model = self.teacher
                h_t, head_t = hidden_and_head(t_model, self.accelerator.unwrap_model(t_model), ids, mask, pos)
            h_t = h_t[:, :-1][sel]
        if can_fuse(head_s, head_t, self.kd):
            loss = fused_distill_loss(h_s[:, :-1][sel], h_t, head_s, head_t, targets, self.kd, self.kd.chunk_size,
                                      self._compute_dtype(head_s))
        else:
            loss = chunked_distill_loss(h_s[:, :-1][sel], h_t, head_s, head_t, targets, self.kd, self.kd.chunk_size)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"qat: the loss became {loss.item()} at step {self.state.global_step + 1}; the last good checkpoint is "
                f"kept in {self.args.output_dir}; lower qat.lr or qat.scale_lr and re-run (it resumes from there)"
            )
        return (loss, None) if return_outputs else loss
