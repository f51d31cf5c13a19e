"""Confidence: per-row measures of how sure the teacher was, stored as conf_* columns.

Scores are stored, decisions are made later by mining, so changing the band never
re-runs the teacher. All measures come from the stored T=1 log-probs:

- mean_token_prob / min_token_prob: over every generated token (eos included)
- answer_prob: joint probability of the answer tokens (after the answer marker, or the
  whole response without one; eos excluded)
- margin: mean gap between the top-1 and top-2 token probabilities
- entropy: mean per-token entropy over the top-k plus one tail bucket (a lower bound)

margin and entropy are null on sampled targets (teacher.logprobs.mode: sampled): there the stored
distribution is the draws' counts, whose margin is noise and whose entropy is biased low; the spec refuses
mining on them (engine/spec.py: SAMPLED_WITHOUT). The other measures read the chosen token's own
log-prob, which both modes store exactly.

and, with teacher.samples > 1 (the rows carry sample_answers), one measure over the samples:

- self_consistency: share of the N sample answers equal to the most common one, normalised as eval
  compares answers (mapped onto the source's labels when the row has a label); a missing answer
  (no answer marker) agrees with nothing. Without samples the column is absent, not null, so a
  dataset made without samples is what it was.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from engine.models import load_tokenizer
from engine.spec import CONFIDENCE_MEASURES, SAMPLED_WITHOUT
from engine.stages.base import RunContext, Stage, dump, no_rejections
from engine.teachers.answers import self_consistency


def answer_start(tokenizer, ids: list[int], marker: str | None) -> int:
    """Index of the first answer token: just after the last answer marker, else 0."""
    if not marker:
        return 0
    total = tokenizer.decode(ids).count(marker)
    if total == 0:
        return 0
    lo, hi = 1, len(ids)  # smallest prefix that already holds every marker
    while lo < hi:
        mid = (lo + hi) // 2
        if tokenizer.decode(ids[:mid]).count(marker) >= total:
            hi = mid
        else:
            lo = mid + 1
    return lo


def row_measures(token_lp: np.ndarray, top_lp: np.ndarray, answer_from: int, eos_last: bool) -> dict:
    probs = np.exp(token_lp.astype(np.float64))
    top = np.exp(top_lp.astype(np.float64))
    answer_lp = token_lp[answer_from : len(token_lp) - (1 if eos_last else 0)]
    tail = np.clip(1.0 - top.sum(axis=1), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(np.where(top > 0, top * np.log(top), 0.0).sum(axis=1)) - np.where(tail > 0, tail * np.log(tail), 0.0)
    return {
        "conf_mean_token_prob": float(probs.mean()) if len(probs) else None,
        "conf_min_token_prob": float(probs.min()) if len(probs) else None,
        "conf_answer_prob": math.exp(float(answer_lp.sum())) if len(answer_lp) else None,
        "conf_margin": float((top[:, 0] - top[:, 1]).mean()) if top.shape[0] and top.shape[1] > 1 else None,
        "conf_entropy": float(ent.mean()) if len(ent) else None,
    }


def sample_agreement(frame: pl.DataFrame) -> pl.Series:
    """conf_self_consistency per row: agreement among its sample_answers, over its source's labels
    (every label its source's rows carry) when the row has a label."""
    def column(name: str) -> list:
        return frame[name].to_list() if name in frame.columns else [None] * frame.height

    sources, gold = column("source"), column("label")
    labels: dict = {}
    for source, label in zip(sources, gold):
        if label is not None:
            labels.setdefault(source, set()).add(label)
    return pl.Series("conf_self_consistency",
                     [self_consistency(answers or [], labels[source] if label is not None else set())
                      for answers, label, source in zip(frame["sample_answers"].to_list(), gold, sources)],
                     dtype=pl.Float64)


class Confidence(Stage):
    name = "confidence"
    order = 70
    cached = True
    top_up = "new_rows"

    def cache_slice(self, spec, store):
        from engine.teachers import teacher_fingerprint

        return [dump(spec.teacher.reasoning), teacher_fingerprint(spec.teacher)]

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        spec = ctx.spec
        tokenizer = load_tokenizer(spec.teacher.local_model)  # an openai teacher: its `tokenizer:`
        marker = spec.teacher.reasoning.answer_marker if spec.teacher.reasoning else None
        eos = tokenizer.eos_token_id
        measures = []
        for ids, lps, top in zip(frame["token_ids"], frame["token_logprobs"], frame["topk_logprobs"]):
            ids = ids.to_list()
            top_lp = np.asarray(top.cast(pl.List(pl.Float32)).to_list(), dtype=np.float32).reshape(len(ids), -1)
            measures.append(row_measures(lps.to_numpy(), top_lp, answer_start(tokenizer, ids, marker),
                                         eos_last=bool(ids) and ids[-1] == eos))
        if spec.teacher.logprobs.mode == "sampled":
            measures = [{**m, **{f"conf_{name}": None for name in SAMPLED_WITHOUT}} for m in measures]
        scores = pl.DataFrame(measures, schema={f"conf_{m}": pl.Float64 for m in CONFIDENCE_MEASURES})
        if "sample_answers" in frame.columns:
            scores = scores.with_columns(conf_self_consistency=sample_agreement(frame))
        stats = {"rows": frame.height}
        return pl.concat([frame, scores], how="horizontal"), no_rejections(), stats
