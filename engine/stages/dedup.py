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
the cosine in `similarity` (1.0 for an exact duplicate). Neighbours are found with faiss:
an exact inner-product index below `semantic.exact_search_below` rows, an IVF index
(about 4*sqrt(n) lists, NPROBE probed) above it; see bench/curation.py for the measurement.
"""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import polars as pl

from engine.embed import embed_texts
from engine.stages.base import RunContext, StageError, no_rejections, rejections
from engine.stages.embed import embedding_matrix
from store import StoreError

NPROBE = 8  # IVF lists searched per query: recall 1.0 on clustered synthetic sets up to 200k (bench/curation.py)


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
    # 4*sqrt(n) lists, but at least 39 training points per list (faiss warns below that).
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234  # k-means of the coarse quantizer: seeded, so a run repeats itself
    index.train(vectors)
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


# --- the stage -----------------------------------------------------------------


class Dedup:
    name = "dedup"

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        settings = ctx.spec.dedup
        semantic = settings.semantic
        n = frame.height
        order = winner_order(frame)
        ids = frame["prompt_id"].to_list()
        keys = [dedup_text(p) for p in frame["prompt"].to_list()]
        vectors = embedding_matrix(frame, ctx) if semantic else None

        dropped = np.zeros(n, dtype=bool)
        neighbor: list[str | None] = [None] * n
        neighbor_row = np.full(n, -1, dtype=np.int64)  # for rows dropped as near a row of this frame
        similarity = np.full(n, np.nan)
        reason: list[str | None] = [None] * n
        counts = {"exact": 0, "semantic": 0, "against": 0}
        index_kind = None

        def drop(row: int, kind: str, near: str, sim: float, why: str) -> None:
            dropped[row], neighbor[row], similarity[row], reason[row] = True, near, float(sim), why
            counts[kind] += 1

        # 1. against an earlier version: its examples are kept rows that precede all of ours.
        if settings.against:
            ref, old_ids, old_keys, old_vectors = self._old_version(settings.against, ctx, semantic is not None)
            first_old = {}
            for pid, key in zip(old_ids, old_keys):
                first_old.setdefault(key, pid)
            for row in order:
                if keys[row] in first_old:
                    drop(row, "against", first_old[keys[row]], 1.0,
                         f"already in {ref} (exact duplicate of {first_old[keys[row]][:8]})")
            if semantic and old_vectors.shape[0]:
                alive = order[~dropped[order]]
                index, index_kind = build_index(old_vectors, semantic.exact_search_below)
                rows, cols, sims = near_pairs(index, vectors[alive], semantic.threshold)
                best = {}
                for r, c, s in zip(rows.tolist(), cols.tolist(), sims.tolist()):
                    if r not in best or s > best[r][1]:
                        best[r] = (c, s)
                for r, (c, s) in sorted(best.items()):
                    drop(int(alive[r]), "against", old_ids[c], s,
                         f"already in {ref} (near-duplicate of {old_ids[c][:8]}, cos {s:.3f} ≥ {semantic.threshold:g})")

        # 2. exact: the first row of each normalised text represents its group.
        alive = order[~dropped[order]]
        representative: dict[str, int] = {}
        copies: list[tuple[int, int]] = []  # (row, its representative)
        for row in alive.tolist():
            rep = representative.setdefault(keys[row], row) if settings.exact else row
            if rep != row:
                copies.append((row, rep))
        reps = np.array([r for r in alive.tolist() if not settings.exact or representative[keys[r]] == r], dtype=np.int64)

        # 3. semantic: greedy over the representatives, in winner order.
        if semantic is not None:
            kept, near, sims, kind = greedy_keep(vectors[reps], semantic.threshold, semantic.exact_search_below)
            index_kind = index_kind or kind
            for pos in np.flatnonzero(~kept).tolist():
                row, other = int(reps[pos]), int(reps[near[pos]])
                neighbor_row[row] = other
                drop(row, "semantic", ids[other], sims[pos],
                     f"near-duplicate of {ids[other][:8]} (cos {sims[pos]:.3f} ≥ {semantic.threshold:g})")
        for row, rep in copies:
            if not dropped[rep]:
                drop(row, "exact", ids[rep], 1.0, f"exact duplicate of {ids[rep][:8]}")
            else:  # its representative is a near-duplicate of a kept row: so is this copy
                other = int(neighbor_row[rep])
                sim = float(vectors[row] @ vectors[other])
                drop(row, "exact", ids[other], sim,
                     f"exact duplicate of {ids[rep][:8]}, a near-duplicate of {ids[other][:8]} (cos {similarity[rep]:.3f})")

        kept_frame = frame.filter(pl.Series(~dropped))
        stats = {"rows": n, "kept": kept_frame.height, **counts, "index": index_kind or "none"}
        if not dropped.any():
            return kept_frame, no_rejections(), stats
        out = frame.filter(pl.Series(dropped)).with_columns(
            neighbor_id=pl.Series([neighbor[i] for i in np.flatnonzero(dropped)], dtype=pl.String),
            similarity=pl.Series(similarity[dropped], dtype=pl.Float64),
        )
        reasons = pl.Series([reason[i] for i in np.flatnonzero(dropped)], dtype=pl.String)
        return kept_frame, rejections(out, self.name, reasons), stats

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
