"""Online distillation (training.teacher_signal: online): the loop runs the teacher beside the students.

The teacher reads its own context (teacher_prompt in its system message and turns: what it was asked
at capture) followed by the response; each student reads its own context followed by the same
response. Both are taken at the positions that predict the response tokens, in the same row-major
order, so teacher and student line up token for token whatever their prompts.

Per response token the teacher's full-vocabulary log-softmax (float32, no grad, one forward per
micro-batch shared by every student) is the target, and the loss is the stored path's family over
the whole vocabulary instead of top-k + tail:

    loss = kd_weight * T^2 * D(p_teacher,T || p_student,T) + hard_weight * CE(teacher token)

with D forward KL, reverse KL or JSD (engine/train/losses.py: divergence_per_token), both sides
tempered at T, token weights and kd_mask as there. A student with a trimmed vocabulary is refused:
it has no outcome for the teacher's mass on the ids it lacks.

With training.loss.hidden too, the forward that gives the logits also gives the hidden states when the
teacher's input is the student's (no student_prompt of its own); otherwise the hidden term runs its own
forward over the student's ids, as it always does (engine/train/hidden.py).
"""

from __future__ import annotations

import resource
import sys

import torch

from engine.errors import SpecError
from engine.train.data import response_logits
from engine.train.device import autocast
from engine.train.hidden import capture, with_teacher_hidden
from engine.train.losses import LossParts, _mean, _select, divergence_per_token
from engine.train.sampled import trimmed_students


def check_online(students, where: str) -> None:
    trimmed = trimmed_students(students)
    if trimmed:
        raise SpecError(f"{where}: training.teacher_signal: online compares the teacher's full vocabulary, but "
                        f"student {trimmed[0]!r} has a trimmed vocabulary (from_teacher.vocab): train it on "
                        "stored targets")


def teacher_view(batch: dict) -> dict:
    """The batch as the teacher reads it: its own context plus the response (engine.train.data.collate)."""
    return {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"],
            "mask": batch["teacher_mask"]}


def _same_input(batch: dict) -> bool:
    return (batch["input_ids"].shape == batch["teacher_input_ids"].shape
            and torch.equal(batch["input_ids"], batch["teacher_input_ids"])
            and torch.equal(batch["mask"], batch["teacher_mask"]))


def with_teacher_signal(teacher, batch: dict, layers: list[int], online: bool) -> dict:
    """The batch plus what the students read of the live teacher: "teacher_log_probs" [N, V] float32
    (online) and "teacher_hidden" (training.loss.hidden's layers), from one no-grad forward where they
    read the same ids."""
    if not online:
        return with_teacher_hidden(teacher, batch, layers) if layers else batch
    view = teacher_view(batch)
    shared = bool(layers) and _same_input(batch)
    device = view["input_ids"].device
    with torch.no_grad(), autocast(device):
        if shared:
            with capture(teacher, layers, view["mask"]) as states:
                logits = response_logits(teacher, view)
        else:
            logits = response_logits(teacher, view)
    out = {**batch, "teacher_log_probs": logits.float().log_softmax(-1)}
    if shared:
        return {**out, "teacher_hidden": {i: h.float() for i, h in states.items()}}
    return with_teacher_hidden(teacher, out, layers) if layers else out


class EachPass:
    """Batches that gain the teacher's signal as they are read, each time they are read: val batches for
    online training, so no more than one batch's [N, V] teacher log-probs is held at once."""

    def __init__(self, batches: list[dict], fn):
        self.batches, self.fn = batches, fn

    def __iter__(self):
        return (self.fn(b) for b in self.batches)


def online_distillation_loss(
    student_logits: torch.Tensor,  # [..., V]
    teacher_log_probs: torch.Tensor,  # [..., V] the teacher's T=1 log-softmax, float32
    targets: torch.Tensor,  # [...] the teacher's token
    mask: torch.Tensor | None = None,
    *,
    kd_weight: float,
    hard_weight: float,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    weights: torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
) -> LossParts:
    logits, teacher, tgt = _select(mask, student_logits, teacher_log_probs, targets)
    if weights is not None:
        weights = _select(mask, weights)[0].float()
    if logits.shape[0] == 0:
        zero = student_logits.sum() * 0.0
        return LossParts(zero, zero.detach(), zero.detach(), 0)
    student = logits.float().log_softmax(-1)
    kd_weights = weights
    if kd_mask is not None:
        kept = _select(mask, kd_mask)[0].float()
        kd_weights = kept if weights is None else weights * kept
    kd = _mean(divergence_per_token(teacher.float(), student, temperature, divergence, beta), kd_weights)
    kd = kd * temperature**2
    ce = _mean(-student.gather(-1, tgt.long().unsqueeze(-1)).squeeze(-1), weights)
    loss = kd_weight * kd + hard_weight * ce
    return LossParts(loss, kd.detach(), ce.detach(), int(logits.shape[0]))


def peak_memory(device: torch.device) -> dict:
    """The process's peak resident memory and, on CUDA, the peak memory torch allocated there (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"host_rss_bytes": int(rss), "cuda_allocated_bytes": cuda}
