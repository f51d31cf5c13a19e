"""Store benchmark at 100k examples of realistic shape (128 generated tokens x top-20 each).

Prints: commit time, bytes on disk, a GROUP BY over all rows, and a child version that changes
1% of the rows (what it adds, in bytes and as a share of the parent). Figures, not pass/fail.

    .venv/bin/python bench/store_100k.py [--rows 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import store  # noqa: E402

CATEGORIES = ["electronics", "books", "kitchen", "toys", "garden", "clothing"]
WORDS = ("good bad great poor value broke works love hate quality cheap fast slow arrived damaged "
         "perfect terrible fine okay the a it was is and but not very really product item").split()


def _text(rng, n_rows: int, words: int) -> list[str]:
    idx = rng.integers(0, len(WORDS), size=(n_rows, words))
    vocab = np.array(WORDS)
    return [" ".join(r) for r in vocab[idx]]


def _nested(rng, n_rows: int, tokens: int, k: int, seed_ids: np.ndarray):
    """topk ids (first = the generated token) and sorted descending float16 logprobs."""
    ids = (rng.exponential(3000.0, size=(n_rows * tokens, k)) % 49152).astype(np.int32)  # frequent ids first
    ids[:, 0] = seed_ids
    lps = -np.cumsum(rng.exponential(0.8, size=(n_rows * tokens, k)), axis=1).astype(np.float16)
    inner = np.arange(0, n_rows * tokens + 1, dtype=np.int32) * k
    outer = np.arange(0, n_rows + 1, dtype=np.int32) * tokens
    topk_ids = pa.ListArray.from_arrays(outer, pa.ListArray.from_arrays(inner, pa.array(ids.ravel())))
    topk_lps = pa.ListArray.from_arrays(outer, pa.ListArray.from_arrays(inner, pa.array(lps.ravel())))
    return topk_ids, topk_lps, lps[:, 0].astype(np.float32)


def synth(n_rows: int, *, tokens: int = 128, k: int = 20, seed: int = 0, start: int = 0) -> pa.Table:
    """`n_rows` examples with the engine's columns; row i has prompt_id sha256(i)."""
    rng = np.random.default_rng(seed)
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, start + n_rows)]
    token_ids = (rng.exponential(3000.0, size=n_rows * tokens) % 49152).astype(np.int32)
    topk_ids, topk_lps, token_lps = _nested(rng, n_rows, tokens, k, token_ids)
    offsets = np.arange(0, n_rows + 1, dtype=np.int32) * tokens
    prompts = _text(rng, n_rows, 18)
    response = _text(rng, n_rows, 40)
    conf = rng.beta(5, 2, size=(n_rows, 5))
    split = rng.choice(np.array(["train", "val", "test"]), size=n_rows, p=[0.8, 0.1, 0.1])
    return pa.table({
        "prompt_id": ids, "parent_id": ids, "source": ["synthetic.jsonl"] * n_rows,
        "category": np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), n_rows)],
        "template_id": pa.nulls(n_rows, pa.string()), "split": split,
        "prompt": prompts, "label": np.where(rng.random(n_rows) < 0.5, "positive", "negative"),
        "teacher_prompt": ["Classify the sentiment of this review: " + p for p in prompts],
        "response": response, "reasoning": response, "answer": np.where(rng.random(n_rows) < 0.5, "positive", "negative"),
        "conf_mean_token_prob": conf[:, 0], "conf_min_token_prob": conf[:, 1] * conf[:, 0],
        "conf_answer_prob": conf[:, 2], "conf_margin": conf[:, 3], "conf_entropy": conf[:, 4] * 3,
        "token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(token_ids)),
        "token_logprobs": pa.ListArray.from_arrays(pa.array(offsets), pa.array(token_lps)),
        "topk_ids": topk_ids, "topk_logprobs": topk_lps,
    })


def change_rows(table: pa.Table, fraction: float, seed: int = 1) -> tuple[pa.Table, int]:
    """A child: `fraction` of the rows, scattered, get a new teacher answer (response and tokens)."""
    rng = np.random.default_rng(seed)
    n = table.num_rows
    picked = np.sort(rng.choice(n, size=max(1, int(n * fraction)), replace=False))
    fresh = synth(len(picked), tokens=len(table["token_ids"][0]), k=len(table["topk_ids"][0][0]), seed=seed + 100)
    keep = np.ones(n, dtype=bool)
    keep[picked] = False
    replaced = table.take(pa.array(picked))
    for col in ("response", "reasoning", "token_ids", "token_logprobs", "topk_ids", "topk_logprobs"):
        replaced = replaced.set_column(replaced.column_names.index(col), col, fresh[col])
    return pa.concat_tables([table.filter(pa.array(keep)), replaced]), len(picked)


def swap_rows(table: pa.Table, fraction: float, seed: int = 2) -> pa.Table:
    """A child: half of `fraction` of the rows removed, as many new prompts added."""
    rng = np.random.default_rng(seed)
    n = table.num_rows
    drop = rng.choice(n, size=max(1, int(n * fraction / 2)), replace=False)
    keep = np.ones(n, dtype=bool)
    keep[drop] = False
    added = synth(len(drop), tokens=len(table["token_ids"][0]), k=len(table["topk_ids"][0][0]), seed=seed + 200, start=10 ** 9)
    return pa.concat_tables([table.filter(pa.array(keep)), added])


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "data").rglob("*.parquet"))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


LINEAGE = {"spec_text": "name: bench\n", "spec_hash": "bench", "teacher": "synthetic", "code_version": "bench", "stats": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n, reps = args.rows, args.repeats

    t0 = time.perf_counter()
    table = synth(n)
    print(f"synthetic: {n:,} examples x 128 tokens x top-20, {table.nbytes / 1e9:.2f} GB in memory"
          f" (generated in {time.perf_counter() - t0:.1f} s)")
    tmp = Path(tempfile.mkdtemp(prefix="store-bench-"))
    try:
        commit_times = []
        for r in range(reps):
            shutil.rmtree(tmp / "s", ignore_errors=True)
            s = store.open(tmp / "s")
            t0 = time.perf_counter()
            s.commit("bench", {"examples": table}, LINEAGE, parent=None)
            commit_times.append(time.perf_counter() - t0)
        parent_bytes = disk_bytes(s.root)
        files = len(s.resolve("bench@1").files["examples"])
        print(f"commit (fresh store):          median {statistics.median(commit_times):6.2f} s over {reps}"
              f"  ({', '.join(f'{t:.2f}' for t in commit_times)})")
        print(f"bytes on disk:                 {parent_bytes / 1e6:8.1f} MB in {files} files"
              f"  ({parent_bytes / n:,.0f} B/example; in-memory Arrow {table.nbytes / 1e6:,.0f} MB)")

        q = ("SELECT category, split, count(*) AS n, avg(conf_mean_token_prob) AS conf, avg(len(token_ids)) AS tokens"
             " FROM examples GROUP BY ALL ORDER BY ALL")
        t, out = timed(lambda: s.sql(q, at="bench@1"), 5)
        print(f"GROUP BY over all rows:        median {t * 1000:6.0f} ms over 5  ({out.num_rows} groups)")
        tq = "SELECT split, count(*) AS n, avg(exp(topk_logprobs[1])) AS p FROM tokens GROUP BY ALL"
        t, out = timed(lambda: s.sql(tq, at="bench@1"), 3)
        print(f"GROUP BY over all {n * 128 / 1e6:.1f}M tokens:  median {t * 1000:6.0f} ms over 3")

        child, changed = change_rows(table, 0.01)
        t0 = time.perf_counter()
        r = s.commit("bench", {"examples": child}, {**LINEAGE, "spec_hash": "bench-2"}, parent=1)
        t_child = time.perf_counter() - t0
        added = disk_bytes(s.root) - parent_bytes
        v = s.resolve(f"bench@{r.version}")
        print(f"child, 1% rows changed ({changed:,} new answers, scattered): commit {t_child:.2f} s,"
              f" adds {added / 1e6:.1f} MB = {100 * added / parent_bytes:.2f}% of the parent"
              f" ({len(v.files['examples'])} files, {v.row_counts['examples']:,} rows)")
        before = disk_bytes(s.root)
        swapped = swap_rows(child, 0.01)
        t0 = time.perf_counter()
        r = s.commit("bench", {"examples": swapped}, {**LINEAGE, "spec_hash": "bench-3"}, parent=r.version)
        t_swap = time.perf_counter() - t0
        added = disk_bytes(s.root) - before
        print(f"grandchild, 0.5% rows removed + 0.5% new prompts: commit {t_swap:.2f} s,"
              f" adds {added / 1e6:.1f} MB = {100 * added / parent_bytes:.2f}% of the parent")
        t, _ = timed(lambda: s.sql(q, at=f"bench@{r.version}"), 5)
        print(f"GROUP BY over the grandchild (deletion vectors applied): median {t * 1000:.0f} ms over 5")
        t0 = time.perf_counter()
        same = s.commit("bench", {"examples": swapped}, {**LINEAGE, "spec_hash": "bench-3"}, parent=r.version)
        print(f"re-commit of identical data:   {time.perf_counter() - t0:6.2f} s (created={same.created})")
        t, df = timed(lambda: s.read(f"bench@{r.version}", "examples"), 1)
        print(f"read grandchild into polars:   {t:6.2f} s ({df.height:,} rows)")
        t0 = time.perf_counter()
        rep = s.verify()
        print(f"verify (re-hash all files):    {time.perf_counter() - t0:6.2f} s, {rep.files} files,"
              f" {rep.bytes / 1e6:.0f} MB, ok={rep.ok}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
