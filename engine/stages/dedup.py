"""Dedup: drop rows that repeat an earlier version, or a kept row, exactly or in meaning.

Winner order decides who stays: originals (origin == "source") before augmentations,
then the frame's row order. In that order, one greedy pass in three steps:

1. against (`dedup.against: NAME@V`): a row whose normalised text is in that version's
   examples, or whose embedding is within the threshold of one of them, is dropped, so a
   new version adds only new material. The old rows count as kept rows before all others.
2. exact (`dedup.exact`): rows with the same normalised text (NFKC, casefold, whitespace
   collapsed, surrounding punctuation stripped) form a group; its first row represents it.
3. semantic (`dedup.semantic`): over the representatives, a row is dropped when a *kept*
   earlier row has cosine >= threshold. Only kept rows count, so in a chain A~B, B~C with
   A!~C, B goes (it is near A) and C stays (its only near neighbour, B, was dropped).
   An exact group follows its representative: if that is dropped as near A, so are its
   copies, pointing at A.

Every dropped row names the kept row (or old example) it duplicates in neighbor_id, with
the cosine in `similarity` (1.0 for an exact duplicate). Neighbours are found with faiss
range search: an exact inner-product index below `semantic.exact_search_below` rows, an IVF
index (about 4*sqrt(n) lists, NPROBE probed) above it. Measured on 2 cores (bench/curation.py
--only index), flat vs IVF: 10k rows 0.40 s vs 0.23 s, 20k 1.57 s vs 0.85 s, 40k 6.6 s vs
2.7 s; below ~5k they tie. So exact search where it costs under half a second (10k rows),
IVF above, where it grows ~n^1.45 instead of n^2 (100k rows: 8 s).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

import numpy as np
import polars as pl

from engine.embedder import embed_texts
from engine.errors import StageError
from engine.stages.base import (
    RunContext,
    Stage,
    dump,
    no_rejections,
    pinned,
    rejections,
)
from engine.stages.embed import embedding_matrix
from store import StoreError

TRAIN_PER_LIST = 40  # k-means points per IVF list
# IVF lists searched per query. On clustered synthetic embeddings (bench/curation.py) the
# keep/drop decisions equal exact search's up to 20k rows, and for 99.98% of rows at 100k
# (21 extra rows kept of 76.7k), where nprobe 4/8/16 find 99.3/99.9/99.997% of the pairs.
NPROBE = 8


def dedup_text(text: str) -> str:
    """The form two prompts share when they are exact duplicates: NFKC, casefold,
    whitespace collapsed, surrounding punctuation stripped ("  What is X? " == "what is x")."""
    folded = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(folded)
    while start < end and _is_edge(folded[start]):
        start += 1
    while end > start and _is_edge(folded[end - 1]):
        end -= 1
    return folded[start:end] or folded  # all punctuation ("???"): compare as it is


def _is_edge(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith("P")


def winner_order(frame: pl.DataFrame) -> np.ndarray:
    """Row indices in the order rows win: originals first, then source (row) order."""
    if "origin" not in frame.columns:
        return np.arange(frame.height)
    is_augmentation = (frame["origin"].fill_null("source") != "source").to_numpy()
    return np.argsort(is_augmentation, kind="stable")


# --- neighbour search ----------------------------------------------------------


def build_index(vectors: np.ndarray, exact_search_below: int):
    """A faiss inner-product index over `vectors`: exact (flat) when small, IVF when large."""
    import faiss

    n, dim = vectors.shape
    if n < exact_search_below:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, "exact"
    # 4*sqrt(n) lists, each trained from TRAIN_PER_LIST points (faiss warns below 39): the
    # coarse k-means then costs O(n) and the search O(n^1.5), not O(n^2).
    nlist = max(1, min(int(4 * math.sqrt(n)), n // TRAIN_PER_LIST))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234  # k-means of the coarse quantizer: seeded, so a run repeats itself
    sample = np.random.default_rng(0).choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False)
    index.train(vectors[np.sort(sample)])
    index.add(vectors)
    index.nprobe = min(NPROBE, nlist)
    return index, "ivf"


def near_pairs(index, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, index row, cosine) for every pair with cosine >= threshold (float32)."""
    if queries.shape[0] == 0 or index.ntotal == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    # Search a hair below the threshold, then compare exactly: faiss's range test is strict.
    lims, sims, ids = index.range_search(np.ascontiguousarray(queries, dtype=np.float32), threshold - 1e-4)
    rows = np.repeat(np.arange(queries.shape[0]), np.diff(lims.astype(np.int64)))
    keep = sims >= np.float32(threshold)
    return rows[keep], ids[keep].astype(np.int64), sims[keep]


def greedy_keep(vectors: np.ndarray, threshold: float, exact_search_below: int):
    """Greedy semantic dedup of rows already in winner order.

    Returns (kept mask, neighbour position or -1, cosine, index kind): a row is dropped when
    some kept earlier row has cosine >= threshold; its neighbour is the most similar of those.
    """
    n = vectors.shape[0]
    kept = np.ones(n, dtype=bool)
    neighbour = np.full(n, -1, dtype=np.int64)
    similarity = np.zeros(n, dtype=np.float32)
    if n == 0:
        return kept, neighbour, similarity, "exact"
    index, kind = build_index(vectors, exact_search_below)
    rows, cols, sims = near_pairs(index, vectors, threshold)
    earlier = cols < rows
    rows, cols, sims = rows[earlier], cols[earlier], sims[earlier]
    order = np.lexsort((cols, rows))  # by row, then earliest neighbour (ties go to it)
    rows, cols, sims = rows[order], cols[order], sims[order]
    bounds = np.flatnonzero(np.diff(rows)) + 1
    for start, end in zip(np.r_[0, bounds], np.r_[bounds, rows.size]):
        if start == end:
            continue
        candidates, cand_sims = cols[start:end], sims[start:end]
        alive = kept[candidates]
        if alive.any():
            row = rows[start]
            best = np.flatnonzero(alive)[np.argmax(cand_sims[alive])]  # argmax: first of equals
            kept[row], neighbour[row], similarity[row] = False, candidates[best], cand_sims[best]
    return kept, neighbour, similarity, kind


def exact_groups(keys: list[str], alive: np.ndarray, exact: bool) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Step 2 over `alive` (rows in winner order): (representatives in that order, [(copy, its representative)]).

    The first row of each normalised text represents its group; without `exact` every row represents itself.
    """
    if not exact:
        return alive, []
    representative: dict[str, int] = {}
    copies = []
    for row in alive.tolist():
        rep = representative.setdefault(keys[row], row)
        if rep != row:
            copies.append((row, rep))
    reps = np.array([r for r in alive.tolist() if representative[keys[r]] == r], dtype=np.int64)
    return reps, copies


# --- the stage -----------------------------------------------------------------


@dataclass
class Verdicts:
    """What the pass decided per row: dropped or not, next to whom, how similar, and why."""

    ids: list[str]
    dropped: np.ndarray
    neighbor: list
    neighbor_row: np.ndarray  # the frame row a near-duplicate was dropped for (-1: none, or an old example)
    similarity: np.ndarray
    reason: list
    counts: dict

    @classmethod
    def for_rows(cls, ids: list[str]) -> "Verdicts":
        n = len(ids)
        return cls(ids, np.zeros(n, dtype=bool), [None] * n, np.full(n, -1, dtype=np.int64), np.full(n, np.nan),
                   [None] * n, {"exact": 0, "semantic": 0, "against": 0})

    def drop(self, row: int, step: str, neighbor_id: str, similarity: float, reason: str, neighbor_row: int = -1):
        self.dropped[row], self.neighbor[row], self.similarity[row] = True, neighbor_id, float(similarity)
        self.reason[row], self.neighbor_row[row] = reason, neighbor_row
        self.counts[step] += 1

    def alive(self, order: np.ndarray) -> np.ndarray:
        """The rows of `order` not dropped yet, still in that order."""
        return order[~self.dropped[order]]


class Dedup(Stage):
    name = "dedup"
    order = 50
    cached = True
    top_up = "new_rows"

    @classmethod
    def wanted(cls, spec) -> bool:
        return bool(spec.dedup.exact or spec.dedup.semantic or spec.dedup.against)

    def cache_slice(self, spec, store):
        return [dump(spec.dedup), pinned(store, spec.dedup.against)]

    def cheap(self, spec, frame) -> bool:
        # Exact dedup hashes text; semantic dedup is cheap once the embeddings are at hand.
        has_vectors = frame is not None and "embedding" in frame.columns
        return not spec.dedup.against and (not spec.dedup.semantic or has_vectors)

    def run_new_rows(self, batch: pl.DataFrame, kept: pl.DataFrame, ctx: RunContext):
        """New rows that repeat a kept row (or each other) are dropped; kept rows are never dropped."""
        pool = pl.concat([kept.select(batch.columns), batch], how="vertical_relaxed")  # kept rows win: they come first
        survivors, dropped, stats = self.run(pool, ctx)
        return batch.filter(pl.col("prompt_id").is_in(survivors["prompt_id"].implode())), dropped, stats

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        settings = ctx.spec.dedup
        semantic = settings.semantic
        order = winner_order(frame)
        keys = [dedup_text(p) for p in frame["prompt"].to_list()]
        vectors = embedding_matrix(frame, ctx) if semantic else None
        verdicts = Verdicts.for_rows(frame["prompt_id"].to_list())

        if settings.against:
            self._drop_old(settings.against, keys, vectors, order, verdicts, ctx)
        representatives, copies = exact_groups(keys, verdicts.alive(order), settings.exact)
        index_kind = "none"
        if semantic is not None:
            index_kind = self._drop_near(representatives, vectors, semantic, verdicts)
        self._drop_copies(copies, vectors, verdicts)

        dropped = verdicts.dropped
        kept = frame.filter(pl.Series(~dropped))
        stats = {"rows": frame.height, "kept": kept.height, **verdicts.counts, "index": index_kind}
        if not dropped.any():
            return kept, no_rejections(), stats
        rows = np.flatnonzero(dropped)
        out = frame.filter(pl.Series(dropped)).with_columns(
            neighbor_id=pl.Series([verdicts.neighbor[i] for i in rows], dtype=pl.String),
            similarity=pl.Series(verdicts.similarity[rows], dtype=pl.Float64),
        )
        reasons = pl.Series([verdicts.reason[i] for i in rows], dtype=pl.String)
        return kept, rejections(out, self.name, reasons), stats

    def _drop_old(self, ref: str, keys: list[str], vectors, order: np.ndarray, verdicts: Verdicts, ctx: RunContext):
        """Step 1: rows already in an earlier version, exactly (always) or in meaning (with semantic)."""
        semantic = ctx.spec.dedup.semantic
        ref, old_ids, old_keys, old_vectors = self._old_version(ref, ctx, semantic is not None)
        first_old: dict[str, str] = {}
        for pid, key in zip(old_ids, old_keys):
            first_old.setdefault(key, pid)
        for row in order.tolist():
            if keys[row] in first_old:
                old = first_old[keys[row]]
                verdicts.drop(row, "against", old, 1.0, f"already in {ref} (exact duplicate of {old[:8]})")
        if semantic is None or old_vectors.shape[0] == 0:
            return
        alive = verdicts.alive(order)
        index, _ = build_index(old_vectors, semantic.exact_search_below)
        rows, cols, sims = near_pairs(index, vectors[alive], semantic.threshold)
        best: dict[int, tuple[float, int]] = {}  # query -> (cosine, old row): the most similar, then the first
        for r, c, sim in zip(rows.tolist(), cols.tolist(), sims.tolist()):
            if r not in best or (sim, -c) > (best[r][0], -best[r][1]):
                best[r] = (sim, c)
        for r, (sim, c) in sorted(best.items()):
            verdicts.drop(int(alive[r]), "against", old_ids[c], sim,
                          f"already in {ref} (near-duplicate of {old_ids[c][:8]}, cos {sim:.3f} ≥ {semantic.threshold:g})")

    @staticmethod
    def _drop_near(representatives: np.ndarray, vectors: np.ndarray, semantic, verdicts: Verdicts) -> str:
        """Step 3: greedy semantic pass over the representatives; returns the index kind used."""
        kept, near, sims, kind = greedy_keep(vectors[representatives], semantic.threshold, semantic.exact_search_below)
        ids = verdicts.ids
        for pos in np.flatnonzero(~kept).tolist():
            row, other = int(representatives[pos]), int(representatives[near[pos]])
            verdicts.drop(row, "semantic", ids[other], sims[pos],
                          f"near-duplicate of {ids[other][:8]} (cos {sims[pos]:.3f} ≥ {semantic.threshold:g})", other)
        return kind

    @staticmethod
    def _drop_copies(copies: list[tuple[int, int]], vectors, verdicts: Verdicts) -> None:
        """Step 2's verdicts, given step 3: a copy goes with its representative, pointing at a kept row."""
        ids = verdicts.ids
        for row, rep in copies:
            if not verdicts.dropped[rep]:
                verdicts.drop(row, "exact", ids[rep], 1.0, f"exact duplicate of {ids[rep][:8]}", rep)
            else:  # the representative is a near-duplicate of a kept row: so is this copy
                other = int(verdicts.neighbor_row[rep])
                verdicts.drop(row, "exact", ids[other], float(vectors[row] @ vectors[other]),
                              f"exact duplicate of {ids[rep][:8]}, a near-duplicate of {ids[other][:8]} "
                              f"(cos {verdicts.similarity[rep]:.3f})", other)

    @staticmethod
    def _old_version(ref: str, ctx: RunContext, with_vectors: bool):
        """(resolved ref, prompt_ids, normalised texts, embeddings or None) of an earlier version's examples."""
        if ctx.store is None:
            raise StageError(f"dedup.against: {ref} needs a store to read from")
        try:
            info = ctx.store.resolve(ref)
            old = ctx.store.read(info.ref, "examples", columns=["prompt_id", "prompt"])
        except StoreError as e:
            raise StageError(f"dedup.against: {e}") from None
        prompts = old["prompt"].to_list()
        vectors = (embed_texts(prompts, ctx.spec.embed, ctx.cache_dir, progress=ctx.progress, counters=ctx.counters)
                   if with_vectors else None)
        return info.ref, old["prompt_id"].to_list(), [dedup_text(p) for p in prompts], vectors
