"""Usage: .venv/bin/python bench/curation.py [--rows 100000] [--embed-sample 2000] [--scaling 50000,100000,200000] [--repeats 3] [--only embed,pipeline,scaling,index]

Curation benchmark (prints figures, not pass/fail), on seeded synthetic prompts of
realistic variety (templates x word lists, with planted exact copies, paraphrases and
augmentations):

1. embedding throughput of the real bundled embedder on --embed-sample texts (cold cache),
   and of a warm re-run (every text a cache hit);
2. embed + dedup + cluster + select-like round robin on --rows rows: time per stage and
   peak memory. Embedding 100k texts at a few hundred per second takes minutes, so unless
   --embed-sample >= --rows, the stages run on synthetic unit vectors (d=384) whose planted
   near-duplicates mirror the planted text duplicates; the output says which was used;
3. dedup time at each --scaling size (medians of --repeats) and the growth ratios;
4. exact (flat) vs approximate (IVF) semantic search by size: where the IVF index starts to
   pay, which is how semantic.exact_search_below was chosen.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from engine.embedder import embed_texts  # noqa: E402
from engine.spec import Dedup as DedupSpec  # noqa: E402
from engine.spec import Diversity as DiversitySpec  # noqa: E402
from engine.spec import Embed as EmbedSpec  # noqa: E402
from engine.spec import SemanticDedup  # noqa: E402
from engine.stages.base import RunContext, prompt_id  # noqa: E402
from engine.stages.dedup import Dedup, greedy_keep  # noqa: E402
from engine.stages.diversity import Diversity  # noqa: E402
from engine.stages.embed import with_embeddings  # noqa: E402

DIM = 384
THRESHOLD = 0.92

# --- synthetic prompts --------------------------------------------------------------

TEMPLATES = {  # category -> templates, each with a paraphrase (same meaning, other words)
    "factual": [("What is the {attr} of the {adj} {noun} made in {n}?", "Tell me the {attr} of the {adj} {noun} from {n}."),
                ("Where was the first {adj} {noun} with a {adj2} {noun2} made?", "In which place was the {adj} {noun} with a {adj2} {noun2} originally made?"),
                ("Who invented the {adj} {noun} and its {adj2} {attr}?", "Which person came up with the {adj} {noun} and its {adj2} {attr}?")],
    "analytical": [("Compare the {adj} {noun} with the {adj2} {noun2} on {attr}.", "How do the {adj} {noun} and the {adj2} {noun2} differ in {attr}?"),
                   ("If a {adj} {noun} costs {n} dollars and a {noun2} costs {m}, what do both cost?", "A {adj} {noun} is {n} dollars and a {noun2} is {m}; what is the total?")],
    "review": [("The {adj} {noun} I bought broke after {n} days; is that normal for its {attr}?", "My {adj} {noun} stopped working {n} days after I bought it. Is that normal given its {attr}?"),
               ("Is the {adj} {noun} worth {n} dollars for its {attr}?", "Does the {adj} {noun} justify a {n} dollar price when it comes to {attr}?")],
    "howto": [("How do I clean a {adj} {noun} without damaging its {adj2} {attr}?", "What is the way to clean a {adj} {noun} and not harm its {adj2} {attr}?"),
              ("How can I make my {adj} {noun} last longer than {n} months?", "What can I do so that my {adj} {noun} lasts more than {n} months?")],
    "creative": [("Write a short poem about a {adj} {noun}, a {noun2} and its {attr}.", "Compose a brief poem on a {adj} {noun}, a {noun2} and its {attr}."),
                 ("Describe a {adj} {noun} with a {adj2} {attr} to someone who has never seen one.", "Explain what a {adj} {noun} with a {adj2} {attr} is like to a person who never saw one.")],
    "reasoning": [("A {adj} {noun} is heavier than a {noun2}; is a {noun2} lighter than a {adj} {noun}?", "Given a {adj} {noun} weighs more than a {noun2}, does a {noun2} weigh less than a {adj} {noun}?"),
                  ("Can a {adj} {noun} fit inside a {adj2} {noun2}?", "Would a {adj} {noun} go inside a {adj2} {noun2}?")],
}
ADJECTIVES = ("red blue green small large heavy light old new cheap expensive wooden metal plastic glass electric "
              "manual portable folding waterproof quiet loud fast slow smart vintage modern compact soft hard bright "
              "dark round square tall short thin thick warm cold wireless").split()
NOUNS = ("kettle laptop bicycle camera chair lamp phone watch backpack blender toaster speaker drone guitar printer "
         "umbrella jacket mattress vacuum microwave keyboard monitor tablet router fridge oven fan heater tent boot "
         "helmet scooter stroller clock mirror sofa desk shelf rug pillow blanket kayak skateboard telescope").split()
ATTRS = ("weight price battery life durability noise level size colour warranty energy use comfort speed "
         "screen resolution grip material finish water resistance").split(" ")
AUG_PREFIXES = ("Briefly: ", "Formally, ", "Explain simply: ", "In one sentence: ")


def synthetic_prompts(n: int, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    """`n` rows (prompt_id, origin, category, prompt) and, per row, (kind, base row index).

    Shares: 75% new originals; 8% exact copies (case, spacing, punctuation changed); 10%
    paraphrases of an earlier original; 7% augmentations (origin "template") of one.
    """
    rng = np.random.default_rng(seed)
    cats = list(TEMPLATES)
    kinds = rng.choice(4, size=n, p=[0.75, 0.08, 0.10, 0.07])
    kinds[0] = 0
    prompts, origins, categories, base_of, templates = [], [], [], np.zeros(n, np.int64), np.zeros(n, np.int64)
    originals: list[int] = []
    words_of: dict[int, tuple] = {}  # original row -> (category, template, words): what copies reuse
    for i in range(n):
        if kinds[i] == 0 or not originals:
            kinds[i] = 0
            cat = cats[rng.integers(len(cats))]
            t = int(rng.integers(len(TEMPLATES[cat])))
            words = dict(adj=ADJECTIVES[rng.integers(len(ADJECTIVES))], adj2=ADJECTIVES[rng.integers(len(ADJECTIVES))],
                         noun=NOUNS[rng.integers(len(NOUNS))], noun2=NOUNS[rng.integers(len(NOUNS))],
                         attr=ATTRS[rng.integers(len(ATTRS))], n=int(rng.integers(2, 500)), m=int(rng.integers(2, 500)))
            text = TEMPLATES[cat][t][0].format(**words)
            prompts.append(text), origins.append("source"), categories.append(cat)
            base_of[i], templates[i] = i, cats.index(cat) * 4 + t
            originals.append(i)
            words_of[i] = (cat, t, words)
            continue
        base = originals[rng.integers(len(originals))]
        cat, t, words = words_of[base]
        base_of[i], templates[i] = base, templates[base]
        if kinds[i] == 1:
            text = prompts[base].upper() if rng.random() < 0.5 else "  " + prompts[base].rstrip("?.") + " ?!"
            origin = "source"
        elif kinds[i] == 2:
            text, origin = TEMPLATES[cat][t][1].format(**words), "source"
        else:
            text, origin = AUG_PREFIXES[rng.integers(len(AUG_PREFIXES))] + prompts[base], "template"
        prompts.append(text), origins.append(origin), categories.append(cat)
    frame = pl.DataFrame({"prompt_id": [prompt_id(p) for p in prompts], "origin": origins,
                          "category": categories, "prompt": prompts})
    return frame, np.stack([kinds, base_of, templates], axis=1)


def synthetic_vectors(plan: np.ndarray, seed: int = 0) -> np.ndarray:
    """Unit vectors shaped like sentence embeddings of the synthetic prompts: originals scatter
    around their template's centre (cos between two originals of a template ≈ 0.4); exact copies
    sit at cos ≈ 0.999 to their original, paraphrases at 0.89-0.99, augmentations at ≈ 0.95."""
    rng = np.random.default_rng(seed + 1)
    kinds, base_of, templates = plan[:, 0], plan[:, 1], plan[:, 2]
    n = len(kinds)
    centres = rng.standard_normal((templates.max() + 1, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise_scale = np.select([kinds == 0, kinds == 1, kinds == 2, kinds == 3],
                            [1.2, 0.03, 0.0, 0.3]).astype(np.float32)
    paraphrase = kinds == 2
    noise_scale[paraphrase] = rng.uniform(0.1, 0.5, paraphrase.sum())
    x = np.zeros((n, DIM), dtype=np.float32)
    originals = kinds == 0
    x[originals] = centres[templates[originals]]
    x += rng.standard_normal((n, DIM)).astype(np.float32) * (noise_scale[:, None] / np.sqrt(DIM))
    x[originals] /= np.linalg.norm(x[originals], axis=1, keepdims=True)
    copies = ~originals
    x[copies] += x[base_of[copies]]  # originals come before their copies, and are final by now
    x[copies] /= np.linalg.norm(x[copies], axis=1, keepdims=True)
    return x


# --- measuring ------------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Spec:
    def __init__(self, **parts):
        self.embed = EmbedSpec()
        self.__dict__.update(parts)


def ctx_for(spec: Spec, cache_dir: Path) -> RunContext:
    return RunContext(spec=spec, cache_dir=cache_dir, progress=False)


def select_round_robin(frame: pl.DataFrame, per_category: int, seed: int = 0) -> pl.DataFrame:
    """What the select stage does: per category, one row per cluster per turn, seeded order inside a cluster."""
    return (frame.with_columns(_draw=pl.col("prompt_id").hash(seed))
            .sort("category", "cluster", "_draw")
            .with_columns(_turn=pl.int_range(pl.len()).over("category", "cluster"))
            .sort("category", "_turn", "cluster")
            .group_by("category", maintain_order=True).head(per_category)
            .drop("_draw", "_turn"))


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def bench_embedding(frame: pl.DataFrame, sample: int, cache_dir: Path) -> None:
    texts = frame["prompt"].head(sample).to_list()
    spec = EmbedSpec()
    embed_texts(["warm up the model"], spec, cache_dir / "warmup", progress=False)  # load once, outside the timing
    counters: dict = {}
    _, cold = timed(lambda: embed_texts(texts, spec, cache_dir, progress=False, counters=counters))
    _, warm = timed(lambda: embed_texts(texts, spec, cache_dir, progress=False))
    import torch

    print(f"embedding  all-minilm-l6-v2, batch {spec.batch_size}, {torch.get_num_threads()} torch threads: "
          f"{counters['embedded']} new texts in {cold:.1f}s = {counters['embedded'] / cold:,.0f} texts/s (cold cache); "
          f"re-run {len(texts) / warm:,.0f} texts/s (all cached); 100k new texts would take "
          f"{100_000 / (counters['embedded'] / cold) / 60:.0f} min")


def bench_pipeline(frame: pl.DataFrame, plan: np.ndarray, rows: int, embed_all: bool, cache_dir: Path) -> None:
    print(f"\npipeline on {rows:,} rows ({'real embeddings of every prompt' if embed_all else 'synthetic unit vectors, d=384, planted near-duplicates'})")
    spec = Spec(dedup=DedupSpec(exact=True, semantic=SemanticDedup(threshold=THRESHOLD)),
                diversity=DiversitySpec(clusters=64, seed=0))
    ctx = ctx_for(spec, cache_dir)
    times = {}
    started = time.perf_counter()
    if embed_all:
        vectors = embed_texts(frame["prompt"].to_list(), spec.embed, cache_dir, progress=True)
    else:
        vectors = synthetic_vectors(plan)
    frame = with_embeddings(frame, vectors)
    times["embed" if embed_all else "vectors"] = (time.perf_counter() - started, frame.height, peak_rss_mb())
    (kept, rejected, dstats), t = timed(Dedup().run, frame, ctx)
    times["dedup"] = (t, kept.height, peak_rss_mb())
    (clustered, _, cstats), t = timed(Diversity().run, kept, ctx)
    times["cluster"] = (t, clustered.height, peak_rss_mb())
    per_category = clustered.height // (2 * clustered["category"].n_unique())
    selected, t = timed(select_round_robin, clustered, per_category)
    times["select"] = (t, selected.height, peak_rss_mb())
    print(f"  {'stage':<8} {'seconds':>8} {'rows out':>9} {'peak RSS MB':>12}")
    for name, (seconds, out, rss) in times.items():
        print(f"  {name:<8} {seconds:>8.2f} {out:>9,} {rss:>12,.0f}")
    planted = {k: int((plan[:, 0] == i).sum()) for i, k in enumerate(("originals", "copies", "paraphrases", "augmentations"))}
    print(f"  planted: {planted}; originals repeating another by chance: "
          f"{frame.filter(pl.Series(plan[:, 0] == 0))['prompt'].is_duplicated().sum():,}")
    print(f"  dedup: exact {dstats['exact']:,}, semantic {dstats['semantic']:,}, index {dstats['index']}; "
          f"clusters {cstats['clusters']} (sizes {cstats['smallest']}-{cstats['largest']}); "
          f"select kept {per_category:,} per category")


def bench_scaling(sizes: list[int], repeats: int, cache_dir: Path) -> None:
    print(f"\ndedup stage (exact + semantic at {THRESHOLD}, default exact_search_below={SemanticDedup().exact_search_below:,}),"
          f" synthetic vectors, median of {repeats}")
    ctx = ctx_for(Spec(dedup=DedupSpec(exact=True, semantic=SemanticDedup(threshold=THRESHOLD))), cache_dir)
    medians = []
    for n in sizes:
        frame, plan = synthetic_prompts(n, seed=1)
        frame = with_embeddings(frame, synthetic_vectors(plan, seed=1))
        runs = [timed(Dedup().run, frame, ctx) for _ in range(repeats)]
        medians.append(statistics.median(t for _, t in runs))
        stats = runs[0][0][2]
        print(f"  {n:>8,} rows  {medians[-1]:7.2f}s  index {stats['index']:<5}  dropped {stats['exact'] + stats['semantic']:,}  "
              f"peak RSS {peak_rss_mb():,.0f} MB")
    for (a, ta), (b, tb) in zip(zip(sizes, medians), zip(sizes[1:], medians[1:])):
        grow = b / a
        print(f"  {a:,} -> {b:,} rows ({grow:g}x): time x{tb / ta:.2f} (linear x{grow:g}, quadratic x{grow ** 2:g})")


def bench_index_choice(sizes: list[int], repeats: int) -> None:
    print(f"\nsemantic search, exact (flat) vs IVF, greedy pass included, median of {repeats}")
    print(f"  {'rows':>8} {'exact s':>8} {'ivf s':>8} {'same decisions':>15}")
    for n in sizes:
        _, plan = synthetic_prompts(n, seed=2)
        vectors = synthetic_vectors(plan, seed=2)
        exact = [timed(greedy_keep, vectors, THRESHOLD, 10**12) for _ in range(repeats)]
        approx = [timed(greedy_keep, vectors, THRESHOLD, 1) for _ in range(repeats)]
        same = float(np.mean(exact[0][0][0] == approx[0][0][0]))
        print(f"  {n:>8,} {statistics.median(t for _, t in exact):>8.3f} {statistics.median(t for _, t in approx):>8.3f} "
              f"{same:>15.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--embed-sample", type=int, default=2000, help="texts embedded to measure throughput")
    parser.add_argument("--scaling", default="50000,100000,200000")
    parser.add_argument("--index-sizes", default="2000,5000,10000,20000,40000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="embed,pipeline,scaling,index", help="sections to run, comma-separated")
    args = parser.parse_args()
    only = set(args.only.split(","))
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start (timings scale with it), cache {cache_dir}")

    frame, plan = synthetic_prompts(args.rows)
    print(f"{args.rows:,} synthetic prompts, e.g. {frame['prompt'][0]!r}, {frame['prompt'][min(7, args.rows - 1)]!r}")
    if args.embed_sample and "embed" in only:
        bench_embedding(frame, min(args.embed_sample, args.rows), cache_dir)
    if "pipeline" in only:
        bench_pipeline(frame, plan, args.rows, args.embed_sample >= args.rows, cache_dir)
    if "scaling" in only:
        bench_scaling([int(s) for s in args.scaling.split(",") if s], args.repeats, cache_dir)
    if "index" in only:
        bench_index_choice([int(s) for s in args.index_sizes.split(",") if s], args.repeats)


if __name__ == "__main__":
    main()
