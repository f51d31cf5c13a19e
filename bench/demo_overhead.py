"""What share of a demo curation run's wall time is spent outside the teacher (target: under 10%).

    .venv/bin/python bench/demo_overhead.py [--spec specs/demo.yaml] [--repeats 1]

Each repeat curates the spec into a fresh temporary store (no cached answers, embeddings or
stage outputs; converted models stay cached). Teacher time = loading the teacher plus its
generate calls; everything else (reading sources, embedding, dedup, clustering, scoring,
selection, the commit) is overhead.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import store
from engine.curate import pipeline
from engine.spec import load_spec


def one_run(spec_path: Path) -> dict:
    spec = load_spec(spec_path)
    with tempfile.TemporaryDirectory() as tmp:
        st = store.open(Path(tmp) / "store")
        began = time.perf_counter()
        examples, rejected, stats, counters = pipeline.curate(spec, st, progress=False)
        st.commit(spec.name, {"examples": examples.to_arrow(), "rejections": rejected.to_arrow()},
                  {"spec_text": spec.text, "spec_hash": spec.spec_hash, "teacher": "bench", "code_version": "bench",
                   "stats": stats}, parent=None)
        wall = time.perf_counter() - began
    teacher = counters.get("teacher_seconds", 0.0) + counters.get("teacher_load_seconds", 0.0)
    stage_seconds = {name: s.get("seconds", 0.0) for name, s in stats.items()}
    return {"wall": wall, "teacher": teacher, "outside": wall - teacher, "calls": counters.get("teacher_calls", 0),
            "stages": stage_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("specs/demo.yaml"))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs = [one_run(args.spec) for _ in range(args.repeats)]
    last = runs[-1]
    print(f"spec {args.spec}: {last['calls']} teacher calls per run, {len(runs)} run(s)")
    print("stage seconds (last run): " + ", ".join(f"{k} {v:.2f}" for k, v in last["stages"].items()))
    wall = statistics.median(r["wall"] for r in runs)
    teacher = statistics.median(r["teacher"] for r in runs)
    share = statistics.median(r["outside"] / r["wall"] for r in runs)
    print(f"wall {wall:.1f} s  teacher {teacher:.1f} s  outside the teacher {wall - teacher:.1f} s = {100 * share:.1f}% "
          f"(target < 10%)")


if __name__ == "__main__":
    main()
