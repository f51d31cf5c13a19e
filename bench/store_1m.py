"""Store benchmark at 1M examples: a filtered count and a GROUP BY over all rows (target: < 1 s each).

Rows have every column of the engine's examples; to keep memory sane on a 24 GB machine the
generated responses are 16 tokens x top-20 (the 100k benchmark uses 128): these two queries read
only scalar columns, which Parquet stores apart from the token lists.

    .venv/bin/python bench/store_1m.py [--rows 1000000] [--tokens 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_100k import LINEAGE, change_rows, disk_bytes, synth, timed  # noqa: E402

import store  # noqa: E402

QUERIES = {
    "filtered count": "SELECT count(*) AS n FROM examples WHERE category = 'books' AND split = 'train'"
                      " AND conf_mean_token_prob BETWEEN 0.6 AND 0.85",
    "GROUP BY": "SELECT category, split, count(*) AS n, avg(conf_mean_token_prob) AS conf, max(conf_entropy) AS ent"
                " FROM examples GROUP BY ALL ORDER BY ALL",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    n = args.rows

    t0 = time.perf_counter()
    table = synth(n, tokens=args.tokens)
    print(f"synthetic: {n:,} examples x {args.tokens} tokens x top-20, {table.nbytes / 1e9:.2f} GB in memory"
          f" (generated in {time.perf_counter() - t0:.1f} s)")
    tmp = Path(tempfile.mkdtemp(prefix="store-bench-1m-"))
    try:
        s = store.open(tmp / "s")
        t0 = time.perf_counter()
        s.commit("bench", {"examples": table}, LINEAGE, parent=None)
        v = s.resolve("bench@1")
        print(f"commit: {time.perf_counter() - t0:.1f} s, {disk_bytes(s.root) / 1e6:,.0f} MB in {len(v.files['examples'])} files")
        child, _ = change_rows(table, 0.01)
        del table
        s.commit("bench", {"examples": child}, {**LINEAGE, "spec_hash": "2"}, parent=1)
        del child
        for ref, what in (("bench@1", "fresh version"), ("bench@2", "child, 1% changed (deletion vectors)")):
            for name, q in QUERIES.items():
                t, out = timed(lambda: s.sql(q, at=ref), 5)
                print(f"{what:<38} {name:<15} median {t * 1000:6.0f} ms over 5 (in-process, includes view setup"
                      f" and the integrity check)")
        exe = str(Path(sys.executable).parent / "syllabus")
        env = {**os.environ, "SYLLABUS_STORE": str(s.root)}
        for name, q in QUERIES.items():
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                subprocess.run([exe, "sql", q, "--at", "bench@2", "--format", "csv"], env=env, check=True,
                               capture_output=True)
                times.append(time.perf_counter() - t0)
            print(f"`syllabus sql` {name:<15} median {statistics.median(times) * 1000:6.0f} ms over 3"
                  " (a whole CLI process: interpreter start and imports included)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
