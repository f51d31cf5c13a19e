"""Distillation losses against a stored top-k teacher: forward KL, reverse KL, generalised JSD.

The teacher's full distribution is gone: we kept, per generated token, the log-probs
p_1..p_k (T=1) of its k likeliest ids. What is left, 1 - sum(p_i), is the *tail*. Both
sides are compared over the same outcomes, chosen by `tail`:

  bucket (the default): k+1 outcomes — the k stored ids plus "any other id":

    teacher at T=1:  (p_1, ..., p_k, p_tail),  p_tail = 1 - sum_i p_i   (clamped at 0)
    student at T=1:  (s_1, ..., s_k, s_tail),  s_i = softmax(z)[id_i],
                                               s_tail = sum of softmax(z) over all other ids

  renormalise: the k stored ids only, each side renormalised within them
    (p_i / sum_j p_j and s_i / sum_j s_j): the tail is dropped, so the student's mass
    outside the top-k is not trained by the KD term at all, only its shape inside.

  tempered at T:   q_j ∝ p_j^(1/T),  r_j ∝ s_j^(1/T)   over those outcomes

    loss per response token = kd_weight * T^2 * D(q, r) + hard_weight * CE(z, teacher token)

with D one of (teacher q, student r):

    forward_kl  KL(q || r)                                   (the default: mass-covering)
    reverse_kl  KL(r || q)                                   (mode-seeking)
    jsd         beta * KL(q || m) + (1 - beta) * KL(r || m),  m = beta * q + (1 - beta) * r

`jsd` follows TRL's GKDTrainer.generalized_jsd_loss (trl/trainer/gkd_trainer.py, Eq. 1 of
Agarwal et al. 2306.13649): the mixture weights the *teacher* by beta, kl_teacher is
KL(teacher || m) weighted by beta, and beta = 0 / beta = 1 are special-cased to the plain
KL(teacher || student) / KL(student || teacher) (TRL's F.kl_div(student, teacher) and
F.kl_div(teacher, student)), not to the 0 the formula tends to. TRL mixes in log space
(logsumexp); we mix probabilities, the same value, and guard the outcomes both sides give 0.

Both sides are coarsened to the outcomes *before* tempering: the teacher's tail can only
be tempered as one outcome (its per-id split is unknown), so the student's tail is
treated the same way. Hence D = 0 exactly when the student matches the teacher on the
k ids and the tail, at every T. (At T=1 the bucket loss and its gradient equal the dense
loss against a full teacher distribution whose tail mass is spread over the other ids in
proportion to the student's own: tests/test_losses.py checks it.) The T^2 factor keeps the KD
gradients' scale independent of T, as in Hinton et al.; it applies to every divergence.
The hard CE uses the student's untempered logits. Everything is float32; the result is a
mean over the response tokens selected by `mask`.

Token weights (training.loss.reasoning_weight / answer_weight, `weights`): both terms become
sum_t w_t * term_t / N over the N selected tokens. The denominator is the token count, not the sum
of the weights, so a weight scales its tokens' gradient and nothing else (answer_weight 1 leaves the
answer tokens' gradient as it was), and micro-batches still combine by their share of the tokens.
Without weights the plain mean runs, bit for bit what it was.

A top-k slot whose stored log-prob is -inf is absent (pads a ragged k; slot 0, the
likeliest, is always present): its id belongs to the tail like any other unstored id.

No gold-label term: a source's label is an answer string, not a token sequence aligned
with the teacher's response (which may reason first, then answer), so a per-token CE on
"the gold answer" has no honest definition over the stored tokens; none is offered.

The optional hidden-state term (training.loss.hidden) is hidden_state_loss below: a distance
between the student's projected and the teacher's hidden states at the response positions;
engine/train/hidden.py pairs the layers and runs the teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("bucket", "renormalise")
# Reverse KL against a teacher outcome of zero mass (a tail the top-k filled up to fp16
# rounding) is infinite: the teacher's tempered log-probs are floored here for it alone.
REVERSE_KL_LOG_FLOOR = math.log(1e-12)


@dataclass
class LossParts:
    loss: torch.Tensor  # weighted total, what backward() is called on
    kd: torch.Tensor  # mean T^2 * divergence over response tokens, token-weighted if weights (detached)
    ce: torch.Tensor  # mean hard cross-entropy, token-weighted if weights (detached)
    tokens: int  # response tokens averaged over


def teacher_log_probs(topk_logprobs: torch.Tensor, tail: str = "bucket") -> torch.Tensor:
    """[N, k] stored T=1 log-probs -> [N, k+1] over the k ids plus the tail (bucket), or [N, k] (renormalise)."""
    top = topk_logprobs.float()
    if tail == "renormalise":
        return top.log_softmax(-1)  # absent slots (-inf) stay at 0 mass
    tail_mass = (1.0 - top.exp().sum(-1)).clamp_min(0.0)  # fp16 rounding may overshoot 1
    return torch.cat([top, tail_mass.log().unsqueeze(-1)], dim=-1)  # log(0) = -inf: no tail


def student_log_probs(logits: torch.Tensor, topk_ids: torch.Tensor, topk_valid: torch.Tensor,
                      tail: str = "bucket") -> torch.Tensor:
    """[N, V] logits -> [N, k+1] T=1 log-probs at the k ids plus the summed rest (bucket), or [N, k] within the k."""
    if tail == "renormalise":  # the logits at the k ids alone: no gradient reaches any other id
        return logits.float().gather(-1, topk_ids).masked_fill(~topk_valid, NEG_INF).log_softmax(-1)
    return _bucket_and_target(logits, topk_ids, topk_valid)[0]


def _bucket_and_target(logits: torch.Tensor, topk_ids: torch.Tensor, topk_valid: torch.Tensor,
                       targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bucket log-probs [N, k+1], log-prob of each target id [N] or None) from one softmax."""
    # An absent slot's id stays in the tail: point it at slot 0 (always present) for the scatter.
    ids = torch.where(topk_valid, topk_ids, topk_ids[..., :1])
    with_target = targets is not None
    out = _BucketLogProbs.apply(logits, torch.cat([ids, targets.long().unsqueeze(-1)], -1) if with_target else ids,
                                with_target)
    bucket, target_lp = (out[..., :-1], out[..., -1]) if with_target else (out, None)
    absent = torch.cat([~topk_valid, torch.zeros_like(topk_valid[..., :1])], dim=-1)
    return bucket.masked_fill(absent, NEG_INF), target_lp


# Below this the tail's summed probabilities may have lost ids to float32 underflow (exp(-104)):
# such rows take the exact logsumexp instead.
_TAIL_FLOOR = 1e-30


class _BucketLogProbs(torch.autograd.Function):
    """[N, V] logits, [N, k] ids -> [N, k+1]: log softmax at the ids, then log of the mass outside them.

    with_target: the ids' last column is the hard-label target, not a top-k id: its log-prob is
    appended as column k+2 (the hard CE from the same softmax) and it is not taken out of the tail.

    The same values and gradients as log_softmax + gather + (scatter -inf, logsumexp), with one
    [N, V] softmax kept for backward and a hand-written backward: the autograd graph of that
    composition made a KD step 1.25x a CE step (bench/kd_step.py). The tail mass is a plain sum
    of the other ids' probabilities (no cancellation: exact even when the top-k hold ~all mass);
    rows whose tail underflows float32 are redone with logsumexp over the masked log-probs.
    """

    @staticmethod
    def forward(ctx, logits, ids, with_target):
        logp = logits.log_softmax(-1) if logits.dtype == torch.float64 else logits.float().log_softmax(-1)
        gathered = logp.gather(-1, ids)
        top, target = (gathered[..., :-1], gathered[..., -1:]) if with_target else (gathered, None)
        ids_all, ids = ids, (ids[..., :-1] if with_target else ids)
        p = logp.exp()
        rest_p = p.clone().scatter_(-1, ids, 0.0)  # the tail's probabilities, zero at the ids
        rest = rest_p.sum(-1)
        rest_log = rest.log()
        low = rest < _TAIL_FLOOR
        if low.any():  # exact log of the tail; its normalised probabilities (and mass 1) for backward
            masked = logp[low].scatter(-1, ids[low], NEG_INF)
            rest_log[low] = masked.logsumexp(-1)
            # nan_to_num: a row whose ids cover the whole vocabulary has no tail at all
            rest_p[low] = (masked - rest_log[low].unsqueeze(-1)).exp().nan_to_num(0.0)
            rest[low] = 1.0
        ctx.save_for_backward(p, rest_p, rest, ids_all)
        ctx.dtype, ctx.with_target = logits.dtype, with_target
        return torch.cat([top, rest_log.unsqueeze(-1)] + ([target] if with_target else []), dim=-1)

    @staticmethod
    def backward(ctx, grad):
        # d log p_i / dz = onehot_i - p;  d log R / dz = p * [outside the ids] / R - p
        # and for the target column: onehot_target - p
        p, rest_p, rest, ids = ctx.saved_tensors
        rest_col = -2 if ctx.with_target else -1
        g_rest = grad[..., rest_col].unsqueeze(-1)
        g_ids = torch.cat([grad[..., :rest_col], grad[..., -1:]], -1) if ctx.with_target else grad[..., :-1]
        out = rest_p * (g_rest / rest.unsqueeze(-1))
        out -= p * grad.sum(-1, keepdim=True)
        out.scatter_add_(-1, ids, g_ids)
        return out.to(ctx.dtype), None, None


def _temper(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    return (log_probs / temperature).log_softmax(-1)


def kl_per_token(teacher_lp: torch.Tensor, student_lp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward KL(q || r) per row, q and r the outcome distributions tempered at T."""
    q_log = _temper(teacher_lp, temperature)
    r_log = _temper(student_lp, temperature)
    q = q_log.exp()
    # Outcomes with q = 0 contribute nothing (and must not turn -inf into NaN).
    return torch.where(q > 0, q * (q_log - r_log), torch.zeros_like(q)).sum(-1)


def _kl(a_log: torch.Tensor, b_log: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probs. Outcomes with a = 0 add 0, with no NaN in value or gradient
    (a's -inf is swapped out *before* the arithmetic, so its backward never meets 0 * inf)."""
    present = a_log > NEG_INF
    a_safe = torch.where(present, a_log, torch.zeros_like(a_log))
    b_safe = torch.where(present, b_log, torch.zeros_like(b_log))
    return torch.where(present, a_safe.exp() * (a_safe - b_safe), torch.zeros_like(a_safe)).sum(-1)


def reverse_kl_per_token(teacher_lp: torch.Tensor, student_lp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reverse KL(r || q) per row: the student's mass where the teacher has little is what costs."""
    q_log = _temper(teacher_lp, temperature).clamp_min(REVERSE_KL_LOG_FLOOR)
    return _kl(_temper(student_lp, temperature), q_log)


def jsd_per_token(teacher_lp: torch.Tensor, student_lp: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """Generalised JSD_beta per row, TRL's convention (see the module docstring)."""
    if beta == 0.0:
        return kl_per_token(teacher_lp, student_lp, temperature)
    if beta == 1.0:
        return reverse_kl_per_token(teacher_lp, student_lp, temperature)
    q_log, r_log = _temper(teacher_lp, temperature), _temper(student_lp, temperature)
    m = beta * q_log.exp() + (1.0 - beta) * r_log.exp()
    m_log = torch.where(m > 0, m, torch.ones_like(m)).log()  # m = 0 only where q = r = 0: skipped by _kl
    return beta * _kl(q_log, m_log) + (1.0 - beta) * _kl(r_log, m_log)


def divergence_per_token(teacher_lp: torch.Tensor, student_lp: torch.Tensor, temperature: float,
                         divergence: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    if divergence == "forward_kl":
        return kl_per_token(teacher_lp, student_lp, temperature)
    if divergence == "reverse_kl":
        return reverse_kl_per_token(teacher_lp, student_lp, temperature)
    if divergence == "jsd":
        return jsd_per_token(teacher_lp, student_lp, temperature, beta)
    raise ValueError(f"unknown divergence {divergence!r} (one of {', '.join(DIVERGENCES)})")


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
    divergence: str = "forward_kl",
    beta: float = 0.5,  # jsd only
    tail: str = "bucket",
    weights: torch.Tensor | None = None,  # [...] per-token weight (see the module docstring); None: all 1
    kd_mask: torch.Tensor | None = None,  # [...] bool: False where the KD term skips a token (kd_target: options)
) -> LossParts:
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r} (one of {', '.join(TAILS)})")
    logits, ids, lps, tgt = _select(mask, student_logits, topk_ids, topk_logprobs, targets)
    if weights is not None:
        weights = _select(mask, weights)[0].float()
    if logits.shape[0] == 0:
        zero = student_logits.sum() * 0.0  # keeps the graph: backward() still works
        return LossParts(zero, zero.detach(), zero.detach(), 0)
    valid = torch.isfinite(lps)
    teacher = teacher_log_probs(lps, tail)
    if tail == "bucket":  # the hard CE from the bucket's own softmax: one [N, V] pass fewer
        student, target_lp = _bucket_and_target(logits, ids, valid, tgt)
    else:
        student, target_lp = student_log_probs(logits, ids, valid, tail), None
    kd_weights = weights
    if kd_mask is not None:  # those tokens' examples are distilled through their options (engine/train/options.py)
        kept = _select(mask, kd_mask)[0].float()
        kd_weights = kept if weights is None else weights * kept
    kd = _mean(divergence_per_token(teacher, student, temperature, divergence, beta), kd_weights)
    kd = kd * temperature**2
    if target_lp is not None:
        ce = _mean(-target_lp, weights)
    elif weights is None:
        ce = F.cross_entropy(logits.float(), tgt.long())
    else:
        ce = _mean(F.cross_entropy(logits.float(), tgt.long(), reduction="none"), weights)
    loss = kd_weight * kd + hard_weight * ce
    return LossParts(loss, kd.detach(), ce.detach(), int(logits.shape[0]))


def _mean(per_token: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens; weighted: sum of weight * value over the token count (not over the weights)."""
    return per_token.mean() if weights is None else (per_token * weights).sum() / per_token.shape[0]


HIDDEN_DISTANCES = ("cosine", "mse")


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Mean over tokens of the distance between [N, d] student hidden states (already projected to the
    teacher's width) and the teacher's [N, d], in float32.

        cosine  1 - cos(s, t)                 per token, in [0, 2]; blind to scale
        mse     mean over the d dims of (s - t)^2, per token

    No token selected: a zero that still backpropagates.
    """
    if distance not in HIDDEN_DISTANCES:
        raise ValueError(f"unknown distance {distance!r} (one of {', '.join(HIDDEN_DISTANCES)})")
    s, t = student.float(), teacher.float()
    if s.shape[0] == 0:
        return s.sum() * 0.0
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    return (s - t).pow(2).mean()
