"""Diversity: spherical k-means (faiss, seeded) over the `embedding` column; adds `cluster`.

No row is dropped: the select stage reads `cluster` to sample evenly across clusters.
With `teach.order: selection` the teacher is asked in selection's order, so the clusters are
drawn before teaching (right after the splits, over every row the teacher may be asked)
instead of over the rows mining kept.
Cluster ids are renumbered by first appearance in row order, so cluster 0 holds the
first row and the numbering does not depend on faiss's internal centroid order.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from engine.stages.base import RunContext, Stage, dump, no_rejections, teach_order
from engine.stages.embed import embedding_matrix

KMEANS_ITERATIONS = 20


def kmeans_clusters(vectors: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Cluster id (int32, 0..k-1 by first appearance) per row; k = min(clusters, rows)."""
    import faiss

    n = vectors.shape[0]
    k = min(clusters, n)
    if k <= 1:
        return np.zeros(n, dtype=np.int32)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                          verbose=False, min_points_per_centroid=1)  # small sets are fine: no warning
    kmeans.train(vectors)
    _, assigned = kmeans.index.search(vectors, 1)
    raw = assigned[:, 0]
    _, first = np.unique(raw, return_index=True)
    renumber = np.empty(raw.max() + 1, dtype=np.int32)
    renumber[raw[np.sort(first)]] = np.arange(first.size, dtype=np.int32)
    return renumber[raw]


class Diversity(Stage):
    name = "diversity"
    order = 90
    cached = True
    drops_rows = False
    top_up = "pool"

    @classmethod
    def wanted(cls, spec) -> bool:
        return spec.diversity is not None

    @classmethod
    def position(cls, spec) -> float:
        # teach.order: selection orders the teacher's work by cluster: after split (55), before teach (60).
        return 57 if teach_order(spec) == "selection" else cls.order

    def cache_slice(self, spec, store):
        return dump(spec.diversity)

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        settings = ctx.spec.diversity
        vectors = embedding_matrix(frame, ctx)
        cluster = kmeans_clusters(vectors, settings.clusters, settings.seed)
        sizes = np.bincount(cluster) if cluster.size else np.zeros(0, dtype=np.int64)
        stats = {"rows": frame.height, "clusters": int(sizes.size),
                 "smallest": int(sizes.min()) if sizes.size else 0, "largest": int(sizes.max()) if sizes.size else 0}
        return frame.with_columns(cluster=pl.Series(cluster, dtype=pl.Int32)), no_rejections(), stats
