"""The distillation objectives per token: forward KL, reverse KL, generalized JSD (and CE, which needs no
teacher), over [n, vocab] logits, plus the cached teacher's forward KL from top-k log-probabilities and the
tail mass. `KDSpec` is what the qat stage builds from the recipe (stages/specs.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.reasoning import IGNORE_INDEX
from ..errors import SpecError

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


def distill_loss(s_logits, t_logits, kd: KDSpec):
    """The summed loss of `kd.loss` over [n, vocab] student and teacher logits (autograd path)."""
    if kd.loss == "forward_kl":
        return forward_kl(s_logits, t_logits, kd.temperature, kd.top_k)
    if kd.loss == "reverse_kl":
        return reverse_kl(s_logits, t_logits, kd.temperature)
    return jsd(s_logits, t_logits, kd.temperature, kd.jsd_beta)


def naive_distill_loss(s_logits_full, t_logits_full, labels, kd):
    """Reference: full-logits loss (what chunking avoids); used by tests and the benchmark."""
    mask = labels[:, 1:] != IGNORE_INDEX
    s, t = s_logits_full[:, :-1][mask].float(), t_logits_full[:, :-1][mask].float()
    if kd.loss == "ce":
        return F.cross_entropy(s, labels[:, 1:][mask], reduction="mean")
    return distill_loss(s, t, kd) / max(int(mask.sum()), 1)
