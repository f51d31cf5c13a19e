"""Distillation loss against a stored top-k teacher, with one tail bucket.

The teacher's full distribution is gone: we kept, per generated token, the log-probs
p_1..p_k (T=1) of its k likeliest ids. What is left, 1 - sum(p_i), is the *tail*. Both
sides are compared over the same k+1 outcomes — the k stored ids plus "any other id":

    teacher at T=1:  (p_1, ..., p_k, p_tail),  p_tail = 1 - sum_i p_i   (clamped at 0)
    student at T=1:  (s_1, ..., s_k, s_tail),  s_i = softmax(z)[id_i],
                                               s_tail = sum of softmax(z) over all other ids
    tempered at T:   q_j ∝ p_j^(1/T),  r_j ∝ s_j^(1/T)   over those k+1 outcomes

    loss per response token = kd_weight * T^2 * KL(q || r) + hard_weight * CE(z, teacher token)

Both sides are coarsened to the k+1 outcomes *before* tempering: the teacher's tail can
only be tempered as one outcome (its per-id split is unknown), so the student's tail is
treated the same way. Hence KL = 0 exactly when the student matches the teacher on the
k ids and the tail, at every T. (At T=1 this equals "student softmax at the k ids plus
the summed rest".) The T^2 factor keeps the KD gradients' scale independent of T, as in
Hinton et al. The hard CE uses the student's untempered logits. Everything is float32;
the result is a mean over the response tokens selected by `mask`.

A top-k slot whose stored log-prob is -inf is absent (pads a ragged k; slot 0, the
likeliest, is always present): its id belongs to the tail like any other unstored id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


@dataclass
class LossParts:
    loss: torch.Tensor  # weighted total, what backward() is called on
    kd: torch.Tensor  # mean T^2 * KL over response tokens (detached)
    ce: torch.Tensor  # mean hard cross-entropy (detached)
    tokens: int  # response tokens averaged over


def teacher_log_probs(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[N, k] stored T=1 log-probs -> [N, k+1] log-probs over the k ids plus the tail."""
    top = topk_logprobs.float()
    tail_mass = (1.0 - top.exp().sum(-1)).clamp_min(0.0)  # fp16 rounding may overshoot 1
    return torch.cat([top, tail_mass.log().unsqueeze(-1)], dim=-1)  # log(0) = -inf: no tail


def student_log_probs(logits: torch.Tensor, topk_ids: torch.Tensor, topk_valid: torch.Tensor) -> torch.Tensor:
    """[N, V] logits -> [N, k+1] T=1 log-probs at the k ids plus the summed rest."""
    logp = logits.float().log_softmax(-1)
    top = logp.gather(-1, topk_ids).masked_fill(~topk_valid, NEG_INF)
    # An absent slot's id stays in the tail: point it at slot 0 (always present) for the scatter.
    topk_ids = torch.where(topk_valid, topk_ids, topk_ids[..., :1])
    # logsumexp over the ids outside the top-k: exact even when the top-k hold ~all mass.
    rest = logp.scatter(-1, topk_ids, NEG_INF).logsumexp(-1)
    return torch.cat([top, rest.unsqueeze(-1)], dim=-1)


def kl_per_token(teacher_lp: torch.Tensor, student_lp: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(q || r) per row, q and r the (k+1)-outcome distributions tempered at T."""
    q_log = (teacher_lp / temperature).log_softmax(-1)
    r_log = (student_lp / temperature).log_softmax(-1)
    q = q_log.exp()
    # Outcomes with q = 0 contribute nothing (and must not turn -inf into NaN).
    return torch.where(q > 0, q * (q_log - r_log), torch.zeros_like(q)).sum(-1)


def _select(mask: torch.Tensor | None, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(tensors) if mask is None else [t[mask] for t in tensors]


def token_kl(student_logits, topk_ids, topk_logprobs, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Per response token KL(teacher top-k + tail || student) at T, shape [tokens]."""
    logits, ids, lps = _select(mask, student_logits, topk_ids, topk_logprobs)
    valid = torch.isfinite(lps)
    return kl_per_token(teacher_log_probs(lps), student_log_probs(logits, ids, valid), temperature)


def distillation_loss(
    student_logits: torch.Tensor,  # [..., V] logits at the positions that predict each token
    topk_ids: torch.Tensor,  # [..., k] long
    topk_logprobs: torch.Tensor,  # [..., k] stored T=1 log-probs
    targets: torch.Tensor,  # [...] the teacher's token
    mask: torch.Tensor | None = None,  # [...] bool: True on response tokens; None: all are
    *,
    kd_weight: float,
    hard_weight: float,
    temperature: float,
) -> LossParts:
    logits, ids, lps, tgt = _select(mask, student_logits, topk_ids, topk_logprobs, targets)
    if logits.shape[0] == 0:
        zero = student_logits.sum() * 0.0  # keeps the graph: backward() still works
        return LossParts(zero, zero.detach(), zero.detach(), 0)
    valid = torch.isfinite(lps)
    kd = kl_per_token(teacher_log_probs(lps), student_log_probs(logits, ids, valid), temperature).mean()
    kd = kd * temperature**2
    ce = F.cross_entropy(logits.float(), tgt.long())
    loss = kd_weight * kd + hard_weight * ce
    return LossParts(loss, kd.detach(), ce.detach(), int(logits.shape[0]))
