"""Sampled teacher targets (teacher.logprobs.mode: sampled), in the style of Sparse Logit Sampling.

Capture: per generated token, k ids are drawn with replacement from the teacher's raw T=1
distribution p. The distinct ids drawn go in topk_ids (most drawn first) and log(count / k) in
topk_logprobs: the empirical distribution q, whose expectation over the draws is p itself
(E[count_i / k] = p_i). Unused slots pad as collate pads a ragged top-k: slot 0's id, log-prob -inf.

Loss: forward KL(q || s) against the student's full-vocabulary distribution s (at T = 1; no tail
bucket: q already sums to 1 and estimates the whole of p). What is unbiased is the gradient:

    KL(q || s) = sum_i q_i log q_i - sum_i q_i log s_i
    E[-sum_i q_i log s_i] = -sum_i p_i log s_i = KL(p || s) + H(p)

The first term does not depend on the student, so E[d KL(q || s) / dz] = d KL(p || s) / dz = s - p.
The value is not unbiased: E[KL(q || s)] = KL(p || s) + H(p) - E[H(q)] >= KL(p || s). Tempering
(q^(1/T), renormalised) and the reverse KL / JSD are not linear in q, so no such estimate exists for
them: training refuses them on a sampled dataset (check_sampled_training).
"""

from __future__ import annotations

import hashlib

import torch

from engine.errors import SpecError
from engine.train.losses import NEG_INF, LossParts, _bucket_and_target, _kl, _mean, _select

MODES = ("topk", "sampled")


def row_generator(seed: int, prompt_ids: list[int]) -> torch.Generator:
    """A CPU generator for one row's draws, from generation.seed and the row's prompt ids: a re-run
    draws the same ids (given the same logits: another batch's padding may round them apart)."""
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, prompt_ids))}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def draw(logprobs: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[V] T=1 log-probs -> ([k] ids, [k] float32 log(count / k)): the distinct ids of k draws with
    replacement, most drawn first (ties: lower id first), padded with slot 0's id and -inf."""
    drawn = torch.multinomial(logprobs.float().exp().cpu(), k, replacement=True, generator=generator)
    ids, counts = drawn.unique(return_counts=True)  # ids ascending
    order = counts.argsort(descending=True, stable=True)
    ids, counts = ids[order], counts[order]
    pad = k - len(ids)
    out_ids = torch.cat([ids, ids[:1].expand(pad)])
    out_lps = torch.cat([(counts.float() / k).log(), torch.full((pad,), NEG_INF)])
    return out_ids, out_lps


def draw_steps(logprobs: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[steps, V] log-probs of one row -> ([steps, k] ids, [steps, k] log-probs), drawn in step order."""
    pairs = [draw(row, k, generator) for row in logprobs]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def trimmed_students(students) -> list[str]:
    """Names of the students with a trimmed vocabulary (from_teacher.vocab)."""
    return [s.name for s in students if s.from_teacher is not None and s.from_teacher.vocab is not None]


def check_sampled_training(loss, where: str, students) -> None:
    """A sampled dataset trains with the estimator's one unbiased loss: forward KL at T = 1, full vocabulary."""
    trimmed = trimmed_students(students)
    if loss.divergence != "forward_kl":
        raise SpecError(f"{where}: training.loss.divergence: the dataset holds sampled targets "
                        "(teacher.logprobs.mode: sampled), an unbiased estimate for forward_kl only; "
                        f"{loss.divergence} is not linear in the teacher's distribution")
    for field in ("temperature", "temperature_end"):
        value = getattr(loss, field)
        if value is not None and value != 1.0:
            raise SpecError(f"{where}: training.loss.{field}: the dataset holds sampled targets "
                            "(teacher.logprobs.mode: sampled): tempering them is biased; set it to 1.0")
    if trimmed:
        raise SpecError(f"{where}: students: {trimmed[0]!r} has a trimmed vocabulary (from_teacher.vocab), which "
                        "would drop the sampled ids it lacks and bias the estimate: train it on a top-k dataset")


def sampled_distillation_loss(student_logits, topk_ids, topk_logprobs, targets, mask=None, *, kd_weight: float,
                              hard_weight: float, weights=None, kd_mask=None) -> LossParts:
    """kd_weight * KL(q || s) + hard_weight * CE(teacher token), T = 1, means over the selected tokens
    (token weights and kd_mask as engine.train.losses.distillation_loss takes them)."""
    logits, ids, lps, tgt = _select(mask, student_logits, topk_ids, topk_logprobs, targets)
    if weights is not None:
        weights = _select(mask, weights)[0].float()
    if logits.shape[0] == 0:
        zero = student_logits.sum() * 0.0
        return LossParts(zero, zero.detach(), zero.detach(), 0)
    valid = torch.isfinite(lps)
    teacher = lps.float().log_softmax(-1)  # sums to 1 again after fp16 storage; absent slots stay -inf
    student, target_lp = _bucket_and_target(logits, ids, valid, tgt)  # log s at each drawn id, full softmax
    kd_weights = weights
    if kd_mask is not None:
        kept = _select(mask, kd_mask)[0].float()
        kd_weights = kept if weights is None else weights * kept
    kd = _mean(_kl(teacher, student[..., :-1]), kd_weights)  # the tail column: no teacher mass there
    ce = _mean(-target_lp, weights)
    loss = kd_weight * kd + hard_weight * ce
    return LossParts(loss, kd.detach(), ce.detach(), int(logits.shape[0]))
