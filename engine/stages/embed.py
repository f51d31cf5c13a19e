"""Embed: add an `embedding` column (L2-normalised float32 array) for each row's prompt.

Dedup and diversity read it; the pipeline drops it before committing. Vectors come from
the per-text cache where they are there (engine.embedder), so a re-run embeds nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from engine.embedder import CACHE_FILE, EmbeddingCache, embed_texts, embedding_key, load_embedder
from engine.errors import StageError
from engine.models import fingerprint
from engine.stages.base import RunContext, Stage, dump, no_rejections

COLUMN = "embedding"


def needs_embeddings(spec) -> bool:
    return bool(spec.dedup.semantic or spec.diversity)


def with_embeddings(frame: pl.DataFrame, vectors: np.ndarray) -> pl.DataFrame:
    """`frame` plus the `embedding` column holding `vectors` (one row each)."""
    if vectors.shape[0] != frame.height:
        raise ValueError(f"{vectors.shape[0]} vectors for {frame.height} rows")
    dtype = pl.Array(pl.Float32, vectors.shape[1])
    return frame.with_columns(pl.Series(COLUMN, vectors.astype(np.float32, copy=False), dtype=dtype))


def embedding_matrix(frame: pl.DataFrame, ctx: RunContext) -> np.ndarray:
    """The frame's `embedding` column as an (n, d) float32 array; embeds the prompts if it is absent."""
    if COLUMN not in frame.columns:
        return embed_texts(frame["prompt"].to_list(), ctx.spec.embed, ctx.cache_dir,
                           progress=ctx.progress, counters=ctx.counters)
    dtype = frame.schema[COLUMN]
    if not isinstance(dtype, pl.Array):
        raise StageError(f"column {COLUMN!r} must be a fixed-size float array, not {dtype}")
    if frame.height == 0:
        return np.zeros((0, dtype.size), dtype=np.float32)
    return np.ascontiguousarray(frame[COLUMN].to_numpy(), dtype=np.float32)


class Embed(Stage):
    name = "embed"
    order = 40
    cached = True
    drops_rows = False
    top_up = "new_rows"

    @classmethod
    def wanted(cls, spec) -> bool:
        return needs_embeddings(spec)

    def cache_slice(self, spec, store):
        from engine.models import fingerprint

        return [dump(spec.embed), fingerprint(spec.embed.model)]

    per_row = True

    def process_rows(self, items: list, ctx: RunContext) -> list:
        """Texts through this worker's embedder (loaded once per process): one vector each."""
        embed = ctx.spec.embed
        vectors = load_embedder(embed.model).encode(items, batch_size=embed.batch_size, normalize_embeddings=True,
                                                    convert_to_numpy=True, show_progress_bar=False)
        return list(vectors.astype(np.float32))

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        from engine.curate.executors import current_cluster

        counters = ctx.counters
        before = counters.get("embedded", 0)
        cluster = current_cluster()
        if cluster is not None:  # the cluster embeds what the cache lacks; embed_texts below then finds it all
            counters["embedded"] = before + self._embed_on(cluster, frame["prompt"].to_list(), ctx)
        vectors = embed_texts(frame["prompt"].to_list(), ctx.spec.embed, ctx.cache_dir,
                              progress=ctx.progress, counters=counters)
        embedded = counters["embedded"] - before
        stats = {"rows": frame.height, "embedded": embedded, "cached": frame.height - embedded,
                 "dim": int(vectors.shape[1])}
        return with_embeddings(frame, vectors), no_rejections(), stats

    def _embed_on(self, cluster, texts: list[str], ctx: RunContext) -> int:
        """The texts the per-text cache lacks, embedded on the cluster and cached here; returns how many."""
        model_fp = fingerprint(ctx.spec.embed.model)
        keys = [embedding_key(model_fp, t) for t in texts]
        cache = EmbeddingCache(Path(ctx.cache_dir) / CACHE_FILE)
        try:
            found = cache.get_many(list(dict.fromkeys(keys)))
            # longest first, as embed_texts orders them: batches of like length, little padding
            todo = sorted({k: t for k, t in zip(keys, texts) if k not in found}.items(), key=lambda kv: -len(kv[1]))
            vectors = cluster.map_rows(self, [t for _, t in todo], ctx, on_batch=lambda indices, out: cache.put_many(
                [todo[i][0] for i in indices], np.stack(out)))
            if vectors:
                cache.set_dim(model_fp, int(vectors[0].shape[0]))
        finally:
            cache.close()
        return len(todo)
