"""Options: the teacher's distribution over a fixed answer set, per row ("dark knowledge").

A row's options are its coverage category's `options:`, else its source's (rows know their source by
name, and variations inherit it). For each such row the teacher scores every option right after its own
prompt (engine/teachers/options.py: teacher-forced on a local teacher; prompt log-probs or the stored
first-token top-k on a server, stats say which), and the softmax over the options' mean log-probs is
stored as `option_probs`, aligned with `options`. Beside them, mining measures (null where a row has no
options, so mining counts it outside the band):

- conf_option_answer_prob: the probability of the option the teacher's own answer names (the one
  option it mentions, as answers are compared against labels); null when it names none or several
- conf_option_margin: top-1 minus top-2 probability
- conf_option_entropy: the distribution's entropy, in nats

Scores are cached per row in the teacher request cache, so a re-run pays nothing.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from engine.spec import OPTION_MEASURES
from engine.stages.base import RunContext, Stage, no_rejections, teacher_key
from engine.teachers.answers import normalise_answer, normalise_text

MEASURE_COLUMNS = {f"conf_{m}": pl.Float64 for m in OPTION_MEASURES}


def option_sets(spec) -> dict:
    """The options the spec names: {"sources": {source name: options}, "categories": {name: options}}."""
    categories = spec.coverage.categories.items() if spec.coverage else ()
    return {"sources": {s.origin: list(s.options) for s in spec.sources if s.options},
            "categories": {name: list(c.options) for name, c in categories if c.options}}


def row_options(frame: pl.DataFrame, spec) -> list[list[str] | None]:
    """Each row's options: its category's, else its source's, else None."""
    sets = option_sets(spec)
    sources = frame["source"].to_list() if "source" in frame.columns else [None] * frame.height
    categories = frame["category"].to_list() if "category" in frame.columns else [None] * frame.height
    return [sets["categories"].get(c) or sets["sources"].get(s) for s, c in zip(sources, categories)]


def option_measures(probs: np.ndarray, options: list[str], answer: str | None) -> dict:
    """conf_option_* of one row's option distribution and the teacher's answer."""
    named = normalise_answer(answer or "", set(options))
    keys = [normalise_text(o) for o in options]
    top = np.sort(probs)[::-1]
    nonzero = probs[probs > 0]
    return {
        "conf_option_answer_prob": float(probs[keys.index(named)]) if named in keys else None,
        "conf_option_margin": float(top[0] - top[1]),
        "conf_option_entropy": float(-(nonzero * np.log(nonzero)).sum()),
    }


def _first_topk(frame: pl.DataFrame) -> list[tuple[list, list] | None]:
    """Per row, the stored top-k (ids, log-probs) of the teacher's first answer token, None without one."""
    if "topk_ids" not in frame.columns or not frame.height:
        return [None] * frame.height
    firsts = frame.select(ids=pl.col("topk_ids").list.first(),
                          lps=pl.col("topk_logprobs").cast(pl.List(pl.List(pl.Float32))).list.first())
    return [None if ids is None else (ids, lps) for ids, lps in firsts.iter_rows()]


class Options(Stage):
    name = "options"
    order = 65  # after teach (the teacher's answer names an option), before confidence and mining
    cached = True
    drops_rows = False
    top_up = "new_rows"

    @classmethod
    def wanted(cls, spec) -> bool:
        sets = option_sets(spec)
        return bool(sets["sources"] or sets["categories"])

    def cache_slice(self, spec, store):
        from engine.teachers import teacher_fingerprint

        return [teacher_key(spec.teacher), teacher_fingerprint(spec.teacher), option_sets(spec)]

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        from engine.stages.teach import teacher_contexts
        from engine.teachers.options import option_probs, score_options

        spec = ctx.spec
        options = row_options(frame, spec)
        asked = [i for i, o in enumerate(options) if o]
        rows = frame[asked]
        conversations = teacher_contexts(rows, spec)  # what the teacher was sent: its stored teacher_prompt
        scored = score_options(ctx, conversations, [options[i] for i in asked], _first_topk(rows))
        probs: list[list[float] | None] = [None] * frame.height
        measures = [dict.fromkeys(MEASURE_COLUMNS) for _ in range(frame.height)]
        answers = frame["answer"].to_list() if "answer" in frame.columns else [None] * frame.height
        for i, scores in zip(asked, scored.scores):
            if scores is not None:
                p = option_probs(scores)
                probs[i] = p.tolist()
                measures[i] = option_measures(p, options[i], answers[i])
        out = frame.with_columns(options=pl.Series(options, dtype=pl.List(pl.String)),
                                 option_probs=pl.Series(probs, dtype=pl.List(pl.Float64)))
        out = pl.concat([out.drop(MEASURE_COLUMNS, strict=False),
                         pl.DataFrame(measures, schema=MEASURE_COLUMNS)], how="horizontal")
        stats = {"rows": frame.height, "with_options": len(asked), "scored": sum(p is not None for p in probs),
                 "option_scoring": scored.method if asked else None, "cached": scored.cached,
                 "scoring_calls": scored.calls, "floored_options": scored.floored, "first_token_rows": scored.fallback,
                 "answer_names_no_option": sum(m["conf_option_answer_prob"] is None for m, p in zip(measures, probs)
                                               if p is not None)}
        return out, no_rejections(), stats
