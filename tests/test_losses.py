"""The loss family: forward KL, reverse KL and generalised JSD over a stored top-k, tail as a
bucket or renormalised within the top-k, T^2 scaling and the hard CE; checked by hand on a
3-token vocabulary and against autograd through a dense teacher distribution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from engine.spec import Loss
from engine.train.losses import (distillation_loss, jsd_per_token, kl_per_token, reverse_kl_per_token,
                                 student_log_probs, teacher_log_probs)

# --- by hand, on a 3-token vocabulary --------------------------------------------------
# The teacher stored ids 0 and 1 with p = 0.5 and 0.3: the tail (id 2) holds 0.2.
# The student's softmax is (0.2, 0.5, 0.3). Bucket outcomes: p = (0.5, 0.3, 0.2), s = (0.2, 0.5, 0.3).
IDS = torch.tensor([[0, 1]])
LPS = torch.tensor([[0.5, 0.3]]).log()
STUDENT = torch.tensor([[0.2, 0.5, 0.3]]).log()  # logits whose softmax is exactly s
TARGET = torch.tensor([1])

# 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.5) + 0.2 ln(0.2/0.3)
FORWARD_KL = 0.22380465718564752
# 0.2 ln(0.2/0.5) + 0.5 ln(0.5/0.3) + 0.3 ln(0.3/0.2)
REVERSE_KL = 0.19379419794061362
# beta 0.5: m = (0.35, 0.4, 0.25); 0.5 [0.5 ln(0.5/0.35) + 0.3 ln(0.3/0.4) + 0.2 ln(0.2/0.25)]
#                                 + 0.5 [0.2 ln(0.2/0.35) + 0.5 ln(0.5/0.4) + 0.3 ln(0.3/0.25)]
JSD_HALF = 0.05087461253959834
# beta 0.25: m = 0.25 p + 0.75 s = (0.275, 0.45, 0.275); 0.25 KL(p || m) + 0.75 KL(s || m)
JSD_QUARTER = 0.03971674895698492
# T = 2: q ∝ sqrt(p) = (0.41545, 0.32180, 0.26275), r ∝ sqrt(s) = (0.26275, 0.41545, 0.32180);
# KL(q || r) = 0.0548738..., times T^2 = 4
FORWARD_KL_T2 = 4 * 0.054873810865470427
# renormalise: teacher (0.5, 0.3)/0.8 = (0.625, 0.375), student (0.2, 0.5)/0.7 = (2/7, 5/7);
# 0.625 ln(0.625 / (2/7)) + 0.375 ln(0.375 / (5/7))
RENORMALISED_KL = 0.24759070588457782
HARD_CE = -math.log(0.5)  # the teacher's token is id 1, where the student has 0.5


def _kd(divergence="forward_kl", temperature=1.0, tail="bucket", **kw):
    parts = distillation_loss(STUDENT, IDS, LPS, TARGET, kd_weight=1.0, hard_weight=0.0, temperature=temperature,
                              divergence=divergence, tail=tail, **kw)
    return parts.kd.item()


def test_each_divergence_by_hand():
    assert _kd("forward_kl") == pytest.approx(FORWARD_KL, rel=1e-5)
    assert _kd("reverse_kl") == pytest.approx(REVERSE_KL, rel=1e-5)
    assert _kd("jsd", beta=0.5) == pytest.approx(JSD_HALF, rel=1e-5)
    assert _kd("jsd", beta=0.25) == pytest.approx(JSD_QUARTER, rel=1e-5)
    assert _kd("forward_kl", temperature=2.0) == pytest.approx(FORWARD_KL_T2, rel=1e-5)  # T^2 scaling
    assert _kd("forward_kl", tail="renormalise") == pytest.approx(RENORMALISED_KL, rel=1e-5)


def test_hard_ce_and_the_weighted_total_by_hand():
    parts = distillation_loss(STUDENT, IDS, LPS, TARGET, kd_weight=0.7, hard_weight=0.3, temperature=2.0)
    assert parts.ce.item() == pytest.approx(HARD_CE, rel=1e-6)
    assert parts.loss.item() == pytest.approx(0.7 * FORWARD_KL_T2 + 0.3 * HARD_CE, rel=1e-5)
    assert parts.tokens == 1


def _case(n=6, vocab=40, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    top = (torch.randn(n, vocab, generator=g) * 3).log_softmax(-1).topk(k, -1)
    lps = top.values.clone()
    lps[2, 3:] = float("-inf")  # a ragged row: 3 stored ids, two absent slots
    student = torch.randn(n, vocab, generator=g) * 2
    return top.indices, lps, student


def test_jsd_with_beta_0_and_1_is_forward_and_reverse_kl():
    """TRL's generalized_jsd_loss: beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher)."""
    ids, lps, student = _case()
    teacher, stud = teacher_log_probs(lps), student_log_probs(student, ids, torch.isfinite(lps))
    for t in (1.0, 2.0):
        assert torch.equal(jsd_per_token(teacher, stud, t, 0.0), kl_per_token(teacher, stud, t))
        assert torch.equal(jsd_per_token(teacher, stud, t, 1.0), reverse_kl_per_token(teacher, stud, t))
        # Near the ends, the mixture formula is small: it is the special cases that give the KLs.
        assert jsd_per_token(teacher, stud, t, 1e-3).max() < 0.05 * kl_per_token(teacher, stud, t).max()


def test_renormalised_tail_sums_to_one_within_the_top_k():
    ids, lps, student = _case()
    lps[0] = lps[0] - 0.3  # the stored mass need not be near 1
    valid = torch.isfinite(lps)
    teacher, stud = teacher_log_probs(lps, "renormalise"), student_log_probs(student, ids, valid, "renormalise")
    assert teacher.shape == stud.shape == lps.shape  # k outcomes, no tail column
    for side in (teacher, stud):
        assert torch.allclose(side.exp().sum(-1), torch.ones(len(lps)), atol=1e-6)
        assert (side.exp()[~valid] == 0).all()  # absent slots hold nothing
    # Each side keeps its ratios within the top-k.
    assert torch.allclose(teacher[0] - teacher[0, 0], lps[0] - lps[0, 0], atol=1e-5)
    # The KD term then never touches the student's logits outside the top-k.
    logits = student.clone().requires_grad_(True)
    distillation_loss(logits, ids, lps, ids[:, 0], kd_weight=1, hard_weight=0, temperature=2,
                      tail="renormalise").loss.backward()
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(-1, ids, False)
    assert logits.grad[outside].abs().max() == 0 and logits.grad[~outside].abs().sum() > 0


def _dense_divergence(p: torch.Tensor, logits: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Mean over rows of D(p || softmax(logits)) over the whole vocabulary, written out plainly."""
    s_log = logits.log_softmax(-1)
    p_log = torch.where(p > 0, p, torch.ones_like(p)).log()
    s = s_log.exp()

    def kl(a, a_log, b_log):
        return torch.where(a > 0, a * (a_log - b_log), torch.zeros_like(a)).sum(-1)

    if divergence == "forward_kl":
        d = kl(p, p_log, s_log)
    elif divergence == "reverse_kl":
        d = kl(s, s_log, p_log)
    else:
        m = beta * p + (1 - beta) * s
        d = beta * kl(p, p_log, m.log()) + (1 - beta) * kl(s, s_log, m.log())
    return d.mean()


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
def test_bucket_loss_and_gradient_equal_a_dense_teacher_with_the_tail_spread_like_the_student(divergence, beta):
    """At T = 1, one tail bucket is exactly a dense teacher whose tail mass is spread over the
    unstored ids in proportion to the student's own probabilities there: same loss, same gradient."""
    ids, lps, student = _case(seed=1)
    valid = torch.isfinite(lps)
    logits = student.clone().requires_grad_(True)
    got = distillation_loss(logits, ids, lps, ids[:, 0], kd_weight=1, hard_weight=0, temperature=1.0,
                            divergence=divergence, beta=beta)
    got.loss.backward()

    dense_logits = student.clone().requires_grad_(True)
    s = student.softmax(-1)  # the spread is a constant: no gradient through it
    stored = torch.zeros_like(s).scatter_add(-1, ids, valid.float()).clamp(max=1)  # 1 at each stored id
    p_top = torch.zeros_like(s).scatter_add(-1, ids, torch.where(valid, lps.exp(), torch.zeros_like(lps)))
    tail = (1 - p_top.sum(-1, keepdim=True)).clamp_min(0)
    s_tail = (s * (1 - stored)).sum(-1, keepdim=True)
    p = p_top + (1 - stored) * s * tail / s_tail
    assert torch.allclose(p.sum(-1), torch.ones(len(p)), atol=1e-5)
    want = _dense_divergence(p, dense_logits, divergence, beta)
    want.backward()
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert torch.allclose(logits.grad, dense_logits.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", ["bucket", "renormalise"])
def test_every_loss_is_zero_at_the_teacher_and_finite_without_tail_mass(divergence, tail):
    ids = torch.tensor([[0, 1, 2], [3, 4, 3]])  # row 1 ragged: its absent slot repeats slot 0's id, as collate pads
    lps = torch.tensor([[0.45, 0.27, 0.18], [0.54, 0.36, 0.0]]).log()  # 0.1 left for the tail
    exact = torch.empty(2, 10)  # the teacher itself: its top-k, and 0.1 spread over the other ids
    exact[0], exact[1] = math.log(0.1 / 7), math.log(0.1 / 8)
    exact[0, :3], exact[1, 3:5] = lps[0], lps[1, :2]
    for temperature in (1.0, 2.0):
        parts = distillation_loss(exact, ids, lps, ids[:, 0], kd_weight=1, hard_weight=0, temperature=temperature,
                                  divergence=divergence, tail=tail)
        assert parts.kd.item() == pytest.approx(0.0, abs=1e-5)
    lps = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]]).log()  # all mass in the top-k: no tail
    student = torch.randn(2, 10, requires_grad=True)
    parts = distillation_loss(student, ids, lps, ids[:, 0], kd_weight=1, hard_weight=1, temperature=2,
                              divergence=divergence, tail=tail)
    parts.loss.backward()
    assert math.isfinite(parts.loss.item()) and parts.kd.item() > 0 and torch.isfinite(student.grad).all()


def test_hard_ce_is_cross_entropy_on_the_teachers_tokens():
    ids, lps, student = _case()
    targets = ids[:, 0]
    parts = distillation_loss(student, ids, lps, targets, kd_weight=0.0, hard_weight=1.0, temperature=3.0,
                              divergence="jsd", tail="renormalise")
    assert parts.loss.item() == pytest.approx(F.cross_entropy(student, targets).item(), rel=1e-6)


def test_loss_spec():
    loss = Loss()
    assert (loss.divergence, loss.tail, loss.beta, loss.temperature_end, loss.hard_warmup_steps) == \
        ("forward_kl", "bucket", 0.5, None, 0)
    assert Loss(divergence="jsd", beta=0.1, tail="renormalise").beta == 0.1
    with pytest.raises(ValidationError, match="beta applies to divergence: jsd only"):
        Loss(divergence="reverse_kl", beta=0.3)
    for bad in ({"beta": 1.5, "divergence": "jsd"}, {"divergence": "tvd"}, {"tail": "drop"}, {"temperature_end": 0},
                {"hard_warmup_steps": -1}, {"gold_weight": 0.5}):
        with pytest.raises(ValidationError):
            Loss(**bad)


def test_bucket_log_probs_match_the_autograd_composition_and_survive_underflow():
    """The hand-written bucket (one softmax, own backward) against log_softmax + gather + logsumexp:
    values and gradients, with absent slots, and on rows whose tail underflows float32 (a student
    200 nats sure of one id), where a plain sum of probabilities would give log(0)."""
    from engine.train.losses import NEG_INF

    torch.manual_seed(3)
    n, v, k = 6, 50, 4
    logits = torch.randn(n, v, dtype=torch.float64) * 3
    logits[0, 7] = 250.0  # everything else ~exp(-250): the tail underflows in float32
    ids = torch.randint(0, v, (n, k))
    ids[0, 0] = 7
    valid = torch.ones(n, k, dtype=torch.bool)
    valid[1, 2:] = False
    weights = torch.randn(n, k + 1, dtype=torch.float64)

    def reference(z):
        logp = z.log_softmax(-1)
        top = logp.gather(-1, ids).masked_fill(~valid, NEG_INF)
        redirected = torch.where(valid, ids, ids[:, :1])
        rest = logp.scatter(-1, redirected, NEG_INF).logsumexp(-1)
        return torch.cat([top, rest.unsqueeze(-1)], -1)

    results = []
    for fn, dtype in ((reference, torch.float64), (student_log_probs, torch.float32)):
        z = logits.detach().to(dtype).clone().requires_grad_(True)
        out = fn(z, ids, valid) if fn is student_log_probs else fn(z)
        finite = torch.isfinite(out)
        (torch.where(finite, out, 0.0) * weights.to(dtype)).sum().backward()
        results.append((out.double(), finite, z.grad.double()))
    (ref, ref_finite, ref_grad), (got, got_finite, got_grad) = results
    assert torch.equal(ref_finite, got_finite)
    assert torch.isfinite(got[0, -1]) and got[0, -1] < -200  # the underflowed tail, still exact
    assert torch.allclose(got[ref_finite], ref[ref_finite], rtol=1e-5, atol=1e-4)
    assert torch.allclose(got_grad, ref_grad, atol=1e-5)
    # float64 in, float64 gradient: torch's own numerical check of the hand-written backward
    z = logits[1:].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: student_log_probs(x, ids[1:], valid[1:]).masked_fill(
        ~torch.cat([valid[1:], torch.ones(n - 1, 1, dtype=torch.bool)], -1), 0.0), (z,))
