"""Scale on paper: each stage's measured throughput here, projected to a 10M-prompt run on N workers and M endpoints.

    SYLLABUS_THREADS=1 .venv/bin/python bench/scale.py [--spec specs/demo.yaml] [--quick]
        [--prompts 10000000] [--workers 1,8,64] [--endpoints 1,8,32] [--teacher-rows-per-s R] [--out FILE]

What is measured, on one core (SYLLABUS_THREADS=1; faiss held to one thread):
  - per-row stages before the teacher (sources, assign, augment, split) on the spec's sources repeated
    to --source-rows rows (each copy's text made distinct), so fixed costs do not dominate;
  - the spec run stage by stage on its own data (fresh caches): embed with the embedder already loaded;
    the teacher stages (teach, options) on the first --teach-rows rows, the bundled teacher's load
    excluded (rows/s = rows / generation seconds); the taught rows are then repeated to --post-rows
    rows (new prompt_ids) for confidence and mine. The spec's own run also gives the rows each stage
    sees per source prompt: what augmentation adds, what dedup and mining drop;
  - driver-side stages on synthetic prompts and unit vectors (bench/curation.py's): dedup (exact +
    semantic, the stage as it runs: flat index below semantic.exact_search_below, IVF above) at each
    --dedup-sizes size, flat vs IVF greedy search at --index-size, clustering (the diversity stage)
    and curation.py's select-like round robin at the same sizes; the commit of --commit-rows examples
    of the spec's shape (max_new_tokens tokens x top-k, bench/store_100k.py's synthetic rows).

The projection (project()): stages run one after another (no overlap between stages). Per-row stages
(sources, assign, augment, embed, split, confidence, mine) divide by --workers; teacher stages (teach,
options) by --endpoints, at the measured rows/s per endpoint of the bundled teacher on one CPU core, or
--teacher-rows-per-s (a GPU server's measured figure, e.g. vLLM's: an input, not measured here; the
output says which). Driver-side stages stay on one node, growing from the largest measured size as
rows^exponent: dedup 1.5 (IVF with ~4*sqrt(n) lists and 8 probed: each query scans ~2*sqrt(n) rows, and
the coarse k-means trains on 40 points per list), clustering 1.0 (faiss k-means samples at most 256
points per centroid, then one assignment pass at fixed k), select 1.0 (a sort; n log n taken as linear),
commit 1.0. The measured growth between dedup sizes is printed beside the assumed one. Selection's
quotas are taken to grow with the data, so the commit is charged for every row that reaches select
(an upper bound). Not modelled: network, Ray or other scheduling overheads, gathering embeddings to
the driver, memory (10M x 384 float32 embeddings = 15 GB on the driver), cache hits, retries.
Cost on 2 shared cores (loaded by another benchmark): default about 3 minutes, --quick under 1 minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("SYLLABUS_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

TEACHER_STAGES = ("teach", "options", "ensemble")  # one model call per row: divided by endpoints
DRIVER_EXPONENTS = {"dedup": 1.5, "diversity": 1.0, "select": 1.0, "commit": 1.0}  # one node, rows^exponent
SIZES = {"quick": dict(source_rows=4_000, teach_rows=8, post_rows=4_000, dedup_sizes="12000,24000",
                       index_size=5_000, commit_rows=2_000),
         "default": dict(source_rows=20_000, teach_rows=32, post_rows=20_000, dedup_sizes="25000,100000",
                         index_size=10_000, commit_rows=20_000)}


# --- the projection: arithmetic only (tests/test_bench_scale.py checks it) ------------------------

@dataclass
class StageRate:
    """One stage as measured: `seconds` for `rows` rows; it sees `rows_per_prompt` rows per source prompt."""

    name: str
    kind: str  # "per_row" (divided by workers), "teacher" (by endpoints) or "driver" (one node)
    rows: float
    seconds: float
    rows_per_prompt: float = 1.0
    exponent: float = 1.0  # driver: seconds grow as rows^exponent from the measured point

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


def stage_hours(rate: StageRate, prompts: int, workers: int, endpoints: int) -> float:
    rows = prompts * rate.rows_per_prompt
    if rate.kind == "driver":
        return rate.seconds * (rows / rate.rows) ** rate.exponent / 3600
    parallel = endpoints if rate.kind == "teacher" else workers
    return rows / rate.rows_per_s / parallel / 3600


def project(rates: list[StageRate], prompts: int, workers: int, endpoints: int) -> dict:
    """Hours per stage, the total (stages in sequence) and the stage that takes longest."""
    hours = {r.name: stage_hours(r, prompts, workers, endpoints) for r in rates}
    return {"workers": workers, "endpoints": endpoints, "hours": hours, "total_hours": sum(hours.values()),
            "limiting": max(hours, key=hours.get)}


def stage_kind(name: str) -> str:
    if name in TEACHER_STAGES:
        return "teacher"
    return "driver" if name in DRIVER_EXPONENTS else "per_row"


def markdown_table(projections: list[dict], stages: list[str]) -> str:
    head = ["workers", "endpoints", *stages, "total h", "limiting"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in projections:
        cells = [str(p["workers"]), str(p["endpoints"]), *(f"{p['hours'][s]:.2f}" for s in stages),
                 f"**{p['total_hours']:.1f}**", p["limiting"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- measuring ----------------------------------------------------------------------------------

def one_thread() -> int:
    import faiss

    from engine.models import set_threads

    faiss.omp_set_num_threads(1)
    return set_threads()


def timed(fn, *args):
    """(what fn returns, seconds): the stages' own stats round seconds to 0.01, too coarse for cheap stages."""
    began = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - began


def context(spec, root: Path):
    import store
    from engine.stages.base import RunContext

    return RunContext(spec=spec, cache_dir=root / "cache", progress=False, store=store.open(root / "store"))


def repeated_sources(spec, rows: int, folder: Path):
    """The spec with each JSONL source repeated to about `rows` rows in all, every copy's text made distinct."""
    per_source = max(1, rows // max(1, len(spec.sources)))
    sources = []
    for i, src in enumerate(spec.sources):
        path = spec.resolve_path(src.path) if src.path else None
        if path is None or path.suffix != ".jsonl":
            sources.append(src)  # only JSONL files are repeated; other sources are read as they are
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out = folder / f"source{i}.jsonl"
        with out.open("w") as f:
            for n in range(per_source):
                record = dict(records[n % len(records)])
                record[src.text] = f"{record[src.text]} (copy {n // len(records)})"
                f.write(json.dumps(record) + "\n")
        sources.append(src.model_copy(update={"path": str(out)}))
    return spec.model_copy(update={"sources": sources})


def measure_source_stages(spec, rows: int, root: Path) -> dict[str, tuple[int, float]]:
    """(rows in, seconds) of the per-row stages before embedding, and split, over the repeated sources."""
    from engine.curate.curation import run_stage
    from engine.stages import stages_for

    spec = repeated_sources(spec, rows, root)
    ctx, frame, measured = context(spec, root / "repeated"), None, {}
    for stage in stages_for(spec):
        if stage.name not in ("sources", "assign", "augment", "split"):
            continue  # split needs only prompt ids: it runs here on the un-deduplicated rows
        (frame, _, stats), seconds = timed(run_stage, stage, frame, ctx)
        measured[stage.name] = (frame.height if stage.name == "sources" else stats["rows_in"], seconds)
    return measured


def resized(frame, rows: int):
    """(`frame` cut to its first `rows` rows or repeated to `rows` with new prompt ids, how many rows of the
    original each row now stands for): the factor keeps rows-per-prompt true across the resize."""
    import polars as pl

    if frame.height >= rows:
        return frame.head(rows), frame.height / rows
    copies = -(-rows // frame.height)
    tiled = pl.concat([frame.with_columns(prompt_id=pl.col("prompt_id") + f"-{c}") for c in range(copies)]).head(rows)
    return tiled, frame.height / rows


def measure_spec_run(spec, teach_rows: int, post_rows: int, root: Path) -> list[dict]:
    """The spec's stages on its own data: rows in, seconds and rows per source prompt, stage by stage."""
    from engine.curate.curation import run_stage
    from engine.embedder import embed_texts
    from engine.stages import stages_for

    ctx, frame, weight, prompts, out = context(spec, root / "spec"), None, 1.0, 1, []
    names = [s.name for s in stages_for(spec)]
    last_teacher = max((i for i, n in enumerate(names) if n in TEACHER_STAGES), default=None)
    if "embed" in names:
        embed_texts(["load the embedder"], spec.embed, root / "warmup", progress=False)  # load outside the timing
    for i, stage in enumerate(stages_for(spec)):
        if stage.name in TEACHER_STAGES and frame.height > teach_rows:
            frame, factor = resized(frame, teach_rows)
            weight *= factor
        if last_teacher is not None and i == last_teacher + 1:
            frame, factor = resized(frame, post_rows)
            weight *= factor
        rows_in = 0 if frame is None else frame.height
        (frame, _, stats), seconds = timed(run_stage, stage, frame, ctx)
        if stage.name == "teach":
            seconds = ctx.counters.get("teacher_seconds", seconds)  # generation only, not the teacher's load
        if stage.name == "sources":
            prompts = rows_in = frame.height
        out.append({"stage": stage.name, "rows": rows_in, "seconds": seconds, "rows_per_prompt": rows_in * weight / prompts})
    select_share = next((r["rows_per_prompt"] for r in out if r["stage"] == "select"), out[-1]["rows_per_prompt"])
    out.append({"stage": "commit", "rows": None, "seconds": None, "rows_per_prompt": select_share})
    return out


def measure_driver_scaling(spec, sizes: list[int], root: Path) -> dict[str, list[tuple[int, float]]]:
    """(rows, seconds) per size for dedup (the stage), clustering and select, on synthetic prompts and vectors."""
    import curation
    from engine.spec import Dedup as DedupSpec
    from engine.spec import Diversity as DiversitySpec
    from engine.spec import SemanticDedup
    from engine.stages.dedup import Dedup
    from engine.stages.diversity import Diversity
    from engine.stages.embed import with_embeddings

    semantic = spec.dedup.semantic if spec.dedup and spec.dedup.semantic else SemanticDedup(threshold=curation.THRESHOLD)
    clusters = spec.diversity.clusters if spec.diversity else 64
    ctx = curation.ctx_for(curation.Spec(dedup=DedupSpec(exact=True, semantic=semantic),
                                         diversity=DiversitySpec(clusters=clusters, seed=0)), root / "synthetic")
    points = {"dedup": [], "diversity": [], "select": []}
    for n in sizes:
        frame, plan = curation.synthetic_prompts(n, seed=1)
        frame = with_embeddings(frame, curation.synthetic_vectors(plan, seed=1))
        (kept, _, _), seconds = curation.timed(Dedup().run, frame, ctx)
        points["dedup"].append((n, seconds))
        (clustered, _, _), seconds = curation.timed(Diversity().run, frame, ctx)
        points["diversity"].append((n, seconds))
        _, seconds = curation.timed(curation.select_round_robin, clustered, n // (2 * clustered["category"].n_unique()))
        points["select"].append((n, seconds))
    return points


def measure_index_choice(threshold: float, n: int) -> dict:
    """Greedy semantic search over n synthetic vectors: flat (exact, ~n^2) vs IVF (~n^1.5) seconds."""
    import curation
    from engine.stages.dedup import greedy_keep

    _, plan = curation.synthetic_prompts(n, seed=2)
    vectors = curation.synthetic_vectors(plan, seed=2)
    _, flat = curation.timed(greedy_keep, vectors, threshold, 10**12)
    _, ivf = curation.timed(greedy_keep, vectors, threshold, 1)
    return {"rows": n, "flat_seconds": flat, "ivf_seconds": ivf}


def measure_commit(spec, rows: int, root: Path) -> float:
    """Seconds to commit `rows` examples of the spec's answer shape to a fresh store."""
    import store
    import store_100k

    table = store_100k.synth(rows, tokens=spec.teacher.generation.max_new_tokens, k=spec.teacher.logprobs.top_k)
    began = time.perf_counter()
    store.open(root / "commit").commit("bench", {"examples": table}, store_100k.LINEAGE, parent=None)
    return time.perf_counter() - began


def growth_exponent(points: list[tuple[int, float]]) -> float | None:
    import math

    (a, ta), (b, tb) = points[0], points[-1]
    return math.log(tb / ta) / math.log(b / a) if b > a and ta > 0 and tb > 0 else None


# --- putting it together --------------------------------------------------------------------------

def stage_rates(flow: list[dict], repeated: dict, driver: dict, commit: tuple[int, float],
                teacher_rows_per_s: float | None) -> list[StageRate]:
    """Each stage's rate: the repeated-sources figure where there is one, the synthetic scaling for
    driver-side stages (anchored at the largest size), the spec run's otherwise."""
    rates = []
    for step in flow:
        name, kind = step["stage"], stage_kind(step["stage"])
        rows, seconds = repeated.get(name, (step["rows"], step["seconds"]))
        if name in driver:
            rows, seconds = driver[name][-1]
        if name == "commit":
            rows, seconds = commit
        if name == "teach" and teacher_rows_per_s:
            rows, seconds = teacher_rows_per_s, 1.0
        rates.append(StageRate(name, kind, rows, max(seconds, 1e-6), step["rows_per_prompt"],
                               DRIVER_EXPONENTS.get(name, 1.0)))
    return rates


def footnote(args, rates: list[StageRate], teacher_source: str, driver: dict, index: dict) -> str:
    measured = growth_exponent(driver["dedup"])
    by_name = {r.name: r for r in rates}
    per_row = ", ".join(f"{r.name} {r.rows_per_s:,.0f}" if r.rows_per_s >= 100 else f"{r.name} {r.rows_per_s:.3g}"
                        for r in rates if r.kind != "driver")
    return (f"{args.prompts:,} source prompts; rows/s per worker on one core: {per_row}. Teacher: {teacher_source}. "
            f"Per-row stages divide by workers, teacher stages by endpoints; dedup, diversity (clustering), select and "
            f"commit run on one node from their largest measured size (dedup {driver['dedup'][-1][0]:,} rows "
            f"{driver['dedup'][-1][1]:.1f}s), growing as rows^1.5 for dedup (IVF: ~4*sqrt(n) lists, 8 probed; "
            f"measured {'n/a' if measured is None else f'{measured:.2f}'} between {driver['dedup'][0][0]:,} and "
            f"{driver['dedup'][-1][0]:,}) and linearly for the rest; flat exact search at {index['rows']:,} rows took "
            f"{index['flat_seconds']:.1f}s vs IVF {index['ivf_seconds']:.1f}s and grows as n^2. Rows per source prompt "
            f"(augmentation adds, dedup and mining drop) come from the spec's own run; the commit is charged for every row "
            f"reaching select ({by_name['commit'].rows_per_prompt:.2f} per prompt). Stages run in sequence; network, Ray "
            f"and scheduling overheads, gathering embeddings to the driver and its memory are not modelled.")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("specs/demo.yaml"))
    parser.add_argument("--quick", action="store_true", help="small samples: under a minute")
    parser.add_argument("--prompts", type=int, default=10_000_000)
    parser.add_argument("--workers", default="1,8,64")
    parser.add_argument("--endpoints", default="1,8,32")
    parser.add_argument("--teacher-rows-per-s", type=float, help="per endpoint, e.g. a vLLM server's measured figure")
    parser.add_argument("--out", type=Path, default=Path("out/bench/scale.json"))
    for name, value in SIZES["default"].items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), help=f"default {value}, --quick "
                            f"{SIZES['quick'][name]}")
    args = parser.parse_args()
    for name, value in SIZES["quick" if args.quick else "default"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main() -> None:
    args = parse_args()
    from engine.spec import load_spec

    spec = load_spec(args.spec)
    threads = one_thread()
    print(f"{threads} torch thread(s), faiss 1 thread; load average {os.getloadavg()[0]:.1f} at start; spec {args.spec}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        repeated = measure_source_stages(spec, args.source_rows, root)
        flow = measure_spec_run(spec, args.teach_rows, args.post_rows, root)
        sizes = [int(s) for s in args.dedup_sizes.split(",") if s]
        driver = measure_driver_scaling(spec, sizes, root)
        threshold = spec.dedup.semantic.threshold if spec.dedup and spec.dedup.semantic else 0.92
        index = measure_index_choice(threshold, args.index_size)
        commit = (args.commit_rows, measure_commit(spec, args.commit_rows, root))
    teach = next((s for s in flow if s["stage"] == "teach"), None)
    measured_teacher = f"{teach['rows'] / teach['seconds']:.2f} rows/s" if teach else "no teach stage"
    teacher_source = (f"{args.teacher_rows_per_s:g} rows/s per endpoint, given (--teacher-rows-per-s); the bundled teacher "
                      f"measured {measured_teacher} on one CPU core" if args.teacher_rows_per_s else
                      f"the bundled teacher measured here, {measured_teacher} per endpoint on one CPU core "
                      f"({spec.teacher.model}, batch {spec.teacher.batch_size})")
    rates = stage_rates(flow, repeated, driver, commit, args.teacher_rows_per_s)
    configs = [(int(w), int(m)) for w in args.workers.split(",") for m in args.endpoints.split(",")]
    projections = [project(rates, args.prompts, w, m) for w, m in configs]
    stages = [r.name for r in rates]
    print("\nmeasured (one core):")
    for r in rates:
        print(f"  {r.name:<11} {r.kind:<8} {r.rows:>10,.0f} rows {r.seconds:>8.2f}s = {r.rows_per_s:>10,.1f} rows/s"
              f"   {r.rows_per_prompt:.3f} rows per prompt" + (f", grows as rows^{r.exponent:g}" if r.kind == "driver" else ""))
    table = markdown_table(projections, stages)
    note = footnote(args, rates, teacher_source, driver, index)
    print(f"\nprojected hours for {args.prompts:,} prompts:\n\n{table}\n\n{note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "spec": str(args.spec), "quick": args.quick, "prompts": args.prompts, "threads": threads,
        "teacher": teacher_source, "spec_run": flow, "repeated_sources": repeated, "driver_scaling": driver,
        "dedup_growth_exponent": growth_exponent(driver["dedup"]), "index_choice": index,
        "commit": {"rows": commit[0], "seconds": commit[1]}, "rates": [asdict(r) for r in rates],
        "projections": projections, "table": table, "assumptions": note}, indent=2))
    print(f"\nfigures: {args.out}")


if __name__ == "__main__":
    main()
