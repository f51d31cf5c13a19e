"""Sentence embeddings, cached per text so an unchanged text is never embedded twice.

key = sha256(model fingerprint, text). Vectors are L2-normalised float32, so a dot
product is the cosine similarity. Fresh vectors are committed to the cache chunk by
chunk: an interrupted run keeps what it embedded, and the model is not even loaded
when every text is cached.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np

from engine.models import fingerprint, locate, set_threads
from engine.progress import progress_bar

CACHE_FILE = "embeddings.sqlite"
CHUNK_BATCHES = 16  # batches per cache commit: an interrupt loses at most this much work

_MODELS: dict[str, object] = {}  # folder -> loaded SentenceTransformer, reused for the whole process


def embedding_key(model_fingerprint: str, text: str) -> str:
    return hashlib.sha256(f"{model_fingerprint}\0{text}".encode()).hexdigest()


class EmbeddingCache:
    """sqlite: key -> float32 vector bytes; `dims` remembers each model's width (for empty inputs)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB)")
        self.db.execute("CREATE TABLE IF NOT EXISTS dims (model TEXT PRIMARY KEY, dim INTEGER)")
        self.db.commit()

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        found = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, blob in self.db.execute(f"SELECT key, vector FROM vectors WHERE key IN ({marks})", chunk):
                found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, keys: list[str], vectors: np.ndarray) -> None:
        with self.db:  # one transaction per chunk: all of it or none
            self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)",
                                [(k, v.astype(np.float32).tobytes()) for k, v in zip(keys, vectors)])

    def dim(self, model: str) -> int | None:
        row = self.db.execute("SELECT dim FROM dims WHERE model = ?", (model,)).fetchone()
        return row[0] if row else None

    def set_dim(self, model: str, dim: int) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO dims VALUES (?, ?)", (model, dim))

    def close(self) -> None:
        self.db.close()


def load_embedder(name: str):
    """The SentenceTransformer for a bundled alias or a local folder, loaded once per process."""
    from sentence_transformers import SentenceTransformer

    folder = str(locate(name).resolve())
    if folder not in _MODELS:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise next to ours
        set_threads()
        _MODELS[folder] = SentenceTransformer(folder, device="cpu")
    return _MODELS[folder]


def embed_texts(texts: list[str], embed_spec, cache_dir: Path, *, progress: bool = True,
                counters: dict | None = None) -> np.ndarray:
    """L2-normalised float32 embeddings, shape (len(texts), dim), in the order of `texts`.

    Only texts missing from `<cache_dir>/embeddings.sqlite` go through the model; their
    number is added to counters["embedded"].
    """
    model_fp = fingerprint(embed_spec.model)
    keys = [embedding_key(model_fp, t) for t in texts]
    cache = EmbeddingCache(Path(cache_dir) / CACHE_FILE)
    try:
        vectors = cache.get_many(list(dict.fromkeys(keys)))
        todo = {k: t for k, t in zip(keys, texts) if k not in vectors}  # distinct missing texts
        if todo:
            vectors.update(_embed_missing(todo, embed_spec, model_fp, cache, progress))
        if keys:
            result = np.stack([vectors[k] for k in keys]).astype(np.float32, copy=False)
        else:  # an empty input still has a width, so an empty column keeps its type
            result = np.zeros((0, _dim(cache, model_fp, embed_spec.model)), dtype=np.float32)
    finally:
        cache.close()
    if counters is not None:
        counters["embedded"] = counters.get("embedded", 0) + len(todo)
    return result


def _dim(cache: EmbeddingCache, model_fp: str, name: str) -> int:
    dim = cache.dim(model_fp)
    if dim is None:  # this model never ran here: ask it once
        dim = _model_dim(load_embedder(name))
        cache.set_dim(model_fp, dim)
    return dim


def _model_dim(model) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def _embed_missing(todo: dict[str, str], embed_spec, model_fp: str, cache: EmbeddingCache,
                   progress: bool) -> dict[str, np.ndarray]:
    model = load_embedder(embed_spec.model)
    cache.set_dim(model_fp, _model_dim(model))
    # Longest first across all chunks: batches of similar length waste little padding,
    # and the ETA starts pessimistic rather than optimistic.
    items = sorted(todo.items(), key=lambda kv: -len(kv[1]))
    chunk = embed_spec.batch_size * CHUNK_BATCHES
    fresh: dict[str, np.ndarray] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("embed", total=len(items))
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            out = model.encode([t for _, t in part], batch_size=embed_spec.batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
            keys = [k for k, _ in part]
            cache.put_many(keys, out)
            fresh.update(zip(keys, out))
            bar.advance(task, len(part))
    return fresh
