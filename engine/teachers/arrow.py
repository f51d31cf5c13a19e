"""Token arrays <-> Arrow list columns, built from flat numpy buffers (no Python loops per value)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def _offsets(lengths: list[int]) -> pa.Array:
    # int64 offsets (large lists): a big run holds more than 2**31 top-k values.
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64))


def list_column(arrays: list[np.ndarray], dtype) -> pa.LargeListArray:
    """One list per row from 1-d arrays: list<dtype>."""
    flat = np.concatenate(arrays).astype(dtype) if arrays else np.empty(0, dtype)
    return pa.LargeListArray.from_arrays(_offsets([len(a) for a in arrays]), pa.array(flat))


def nested_list_column(arrays: list[np.ndarray], dtype) -> pa.LargeListArray:
    """One list of lists per row from 2-d [n, k] arrays: list<list<dtype>>."""
    rows = [a.reshape(len(a), -1) for a in arrays]
    inner_lengths = [a.shape[1] for a in rows for _ in range(len(a))]
    flat = np.concatenate([a.reshape(-1) for a in rows]).astype(dtype) if rows else np.empty(0, dtype)
    inner = pa.LargeListArray.from_arrays(_offsets(inner_lengths), pa.array(flat))
    return pa.LargeListArray.from_arrays(_offsets([len(a) for a in rows]), inner)
