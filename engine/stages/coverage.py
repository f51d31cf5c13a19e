"""Assign: put every row in one coverage category, by column, keyword rules or embedding.

Rows that fit no category are `uncategorised`: they are rejected here with the reason
(which value, which keywords, which nearest description at what similarity), so a user
sees what their categories miss instead of finding it quietly dropped by a quota.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl

from engine.stages.base import RunContext, Stage, dump, rejections

UNCATEGORISED = "uncategorised"


def embed_texts(texts: list[str], embed_spec, cache_dir, *, progress: bool = True, counters: dict | None = None):
    """engine.embedder.embed_texts, imported late: only embedding assignment needs a model."""
    from engine.embedder import embed_texts as embed

    return embed(texts, embed_spec, cache_dir, progress=progress, counters=counters)


def keyword_pattern(keyword: str) -> re.Pattern:
    """A case-insensitive whole-word (or whole-phrase) match; a phrase may span any whitespace."""
    words = keyword.split()
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def by_column(values: list[str | None], names: list[str]) -> tuple[list[str | None], list[str | None]]:
    """The source's own category column: kept when it names a coverage category."""
    known = set(names)
    categories, reasons = [], []
    for value in values:
        if value in known:
            categories.append(value)
            reasons.append(None)
        else:
            categories.append(None)
            reasons.append(f"{UNCATEGORISED}: no category" if value is None
                           else f"{UNCATEGORISED}: category {value!r} is not in coverage.categories")
    return categories, reasons


def by_keywords(prompts: list[str], keywords: dict[str, list[str]]) -> tuple[list[str | None], list[str | None]]:
    """The category whose keywords occur most often in the prompt; ties go to the earlier category."""
    rules = {name: [keyword_pattern(k) for k in words if k.strip()] for name, words in keywords.items()}
    categories, reasons = [], []
    for prompt in prompts:
        hits = {name: sum(len(p.findall(prompt)) for p in patterns) for name, patterns in rules.items()}
        best = max(hits.values(), default=0)
        if best == 0:
            categories.append(None)
            reasons.append(f"{UNCATEGORISED}: no keyword of any category occurs")
        else:
            categories.append(next(name for name, n in hits.items() if n == best))  # dicts keep spec order
            reasons.append(None)
    return categories, reasons


def by_similarity(similarity: np.ndarray, names: list[str], floor: float) -> tuple[list[str | None], list[str | None]]:
    """similarity: (rows, categories) cosine. Nearest description wins (first on ties) unless below the floor."""
    categories, reasons = [], []
    for row in similarity:
        best = int(np.argmax(row))
        cos = float(row[best])
        if cos < floor:
            categories.append(None)
            reasons.append(f"{UNCATEGORISED}: nearest {names[best]!r} at cos {cos:.2f} < floor {floor:.2f}")
        else:
            categories.append(names[best])
            reasons.append(None)
    return categories, reasons


class Assign(Stage):
    """Fill `category` from coverage.assign; reject rows that fit no category."""

    name = "assign"
    order = 20

    @classmethod
    def wanted(cls, spec) -> bool:
        return spec.coverage is not None

    def cache_slice(self, spec, store):
        from engine.models import fingerprint

        # Only what decides a row's category: quotas are select's business, so changing one re-runs select alone.
        cov = spec.coverage
        rules = {name: [c.describe, c.keywords] for name, c in cov.categories.items()}
        by_embedding = cov.assign == "embedding"
        return [cov.assign, cov.similarity_floor, rules,
                [dump(spec.embed), fingerprint(spec.embed.model)] if by_embedding else None]

    def cheap(self, spec, frame) -> bool:
        return spec.coverage.assign != "embedding"

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        coverage = ctx.spec.coverage
        names = list(coverage.categories)
        if coverage.assign == "column":
            categories, reasons = by_column(frame["category"].to_list(), names)
        elif coverage.assign == "keywords":
            categories, reasons = by_keywords(frame["prompt"].to_list(),
                                              {n: c.keywords for n, c in coverage.categories.items()})
        else:
            categories, reasons = by_similarity(self._similarity(frame, ctx), names, coverage.similarity_floor)

        placed = frame.with_columns(_category=pl.Series(categories, dtype=pl.String),
                                    _reason=pl.Series(reasons, dtype=pl.String))
        is_placed = pl.col("_reason").is_null()
        kept = placed.filter(is_placed).with_columns(category=pl.col("_category")).drop("_category", "_reason")
        # A rejection keeps the row's own category value, so the user sees what did not match.
        dropped = placed.filter(~is_placed)
        counts = dict(kept.group_by("category").len().iter_rows())
        stats = {
            "by": coverage.assign,
            "rows": frame.height,
            "categories": {name: counts.get(name, 0) for name in names},
            UNCATEGORISED: dropped.height,
        }
        return kept, rejections(dropped.drop("_category", "_reason"), self.name, dropped["_reason"]), stats

    @staticmethod
    def _similarity(frame: pl.DataFrame, ctx: RunContext) -> np.ndarray:
        """Cosine of every prompt to every category description (the embeddings are L2-normalised)."""
        describe = [c.describe for c in ctx.spec.coverage.categories.values()]
        vectors = embed_texts(describe + frame["prompt"].to_list(), ctx.spec.embed, ctx.cache_dir,
                              progress=ctx.progress, counters=ctx.counters)
        vectors = np.asarray(vectors, dtype=np.float32)
        return vectors[len(describe):] @ vectors[: len(describe)].T
