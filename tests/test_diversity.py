"""Diversity: seeded spherical k-means over embeddings; a `cluster` per row, nothing dropped."""

from __future__ import annotations

import numpy as np
import polars as pl

from engine.spec import Diversity as DiversitySpec
from engine.stages.base import RunContext
from engine.stages.diversity import Diversity, kmeans_clusters
from engine.stages.embed import with_embeddings


class FakeSpec:
    def __init__(self, clusters: int, seed: int = 0):
        self.diversity = DiversitySpec(clusters=clusters, seed=seed)


def blobs(per_blob: int = 10, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three tight, far-apart groups of unit vectors, interleaved: (vectors, true group per row)."""
    rng = np.random.default_rng(seed)
    group = np.tile([2, 0, 1], per_blob)  # row 0 is in group 2, row 1 in group 0, row 2 in group 1, ...
    centers = np.eye(dim)[:3]
    x = centers[group] + rng.standard_normal((group.size, dim)) * 0.05
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), group


def frame_of(vectors: np.ndarray) -> pl.DataFrame:
    frame = pl.DataFrame({"prompt_id": [f"p{i}" for i in range(len(vectors))]})
    return with_embeddings(frame, vectors)


def run(frame: pl.DataFrame, clusters: int, seed: int = 0):
    return Diversity().run(frame, RunContext(spec=FakeSpec(clusters, seed), cache_dir=None, progress=False))


def test_separated_groups_become_clusters_numbered_by_first_appearance():
    vectors, group = blobs()
    kept, rejected, stats = run(frame_of(vectors), clusters=3)
    assert rejected.height == 0 and kept.height == 30
    assert kept.schema["cluster"] == pl.Int32
    # groups 2, 0, 1 appear first in rows 0, 1, 2: they become clusters 0, 1, 2
    assert kept["cluster"].to_list() == [{2: 0, 0: 1, 1: 2}[g] for g in group]
    assert stats == {"rows": 30, "clusters": 3, "smallest": 10, "largest": 10}


def test_same_seed_same_clusters():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((500, 24)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    first = kmeans_clusters(vectors, 8, seed=3)
    assert np.array_equal(first, kmeans_clusters(vectors, 8, seed=3))
    assert sorted(set(first.tolist())) == list(range(8))
    assert first[0] == 0  # numbered by first appearance


def test_more_clusters_than_rows():
    vectors, _ = blobs(per_blob=1)
    kept, _, stats = run(frame_of(vectors), clusters=16)
    assert sorted(kept["cluster"].to_list()) == [0, 1, 2] and stats["clusters"] == 3


def test_one_cluster_and_empty_frames():
    vectors, _ = blobs()
    assert run(frame_of(vectors), clusters=1)[0]["cluster"].unique().to_list() == [0]
    kept, _, stats = run(frame_of(np.zeros((0, 16), dtype=np.float32)), clusters=4)
    assert kept.height == 0 and kept.schema["cluster"] == pl.Int32
    assert stats == {"rows": 0, "clusters": 0, "smallest": 0, "largest": 0}
