"""What each data and loss lever is worth: ablations at equal data size and steps, over seeds.

    .venv/bin/python bench/quality.py [--spec specs/bench/topic.yaml --spec specs/bench/sentiment.yaml]
                                      [--seeds 0,1,2] [--only ARMS] [--max-steps N] [--quick]
                                      [--store out/bench-store]
    .venv/bin/python bench/quality.py --show out/bench/quality-TIME.json     # the tables again

Per spec, the spec as written is the `base` arm: curated as `syllabus run` does (into the bench's
store: teacher answers and embeddings are cached there, so every other arm, and a second run, pays
only for what is new), then one student (the demo's `tenth`: pruned from the teacher to about a
tenth, trimmed vocabulary) is trained per seed and evaluated. Every other arm changes one lever:

    hard          hard labels only (kd_weight 0, hard_weight 1) instead of the spec's KD mix
    T1, T2, T5    the KD temperature (the one equal to the spec's own is the base)
    random        no mining band and no cluster balancing: a seeded random choice from the same pool
    no-dedup      no semantic dedup and no cluster balancing
    no-variations without the teacher-written variations (augment entries with teacher: true)
    options-kd    KD on the teacher's option distribution instead of its token top-k (loss.kd_target:
                  options), where the spec gives a fixed answer set

Equal data size and steps: a curation arm keeps, per category, as many train and val rows as the
base kept (coverage max set to the base's counts), and every arm trains for the base's number of
optimizer steps (training.max_steps). An arm the spec gives nothing to change for (no variations
by the teacher, no answer set) is listed as not applicable.

Every arm is scored on the same rows: the base version's own test split (drawn before the teacher
answered, never mined: the in-distribution set) and each of the spec's eval.sources (wording held
out from curation). Per arm and set: accuracy and retention (student / teacher accuracy on the same
rows) as the mean over seeds with the 95% interval averaged over seeds and the min-max over seeds;
and against the base, the change in retention with a 95% two-level paired bootstrap interval (each seed's
run paired with the base's run of that seed; seeds resampled, then rows: a seed that collapses widens it).
The verdict says "gain" or "loss" only where that interval excludes 0, and "no clear difference" otherwise.

Output: a JSON file of every figure (out/bench/quality-TIME.json) and a markdown table, printed and
written beside it. --quick: seeds 0 and 1, at most QUICK_STEPS steps, small calibration, the first
QUICK_EVAL_ROWS rows of each shared set: a smoke run of the whole shape in minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402

import store  # noqa: E402
from engine.curate import pipeline  # noqa: E402
from engine.models import set_threads  # noqa: E402
from engine.spec import Spec, parse_spec  # noqa: E402
from engine.train import runs  # noqa: E402

DEFAULT_SPECS = ["specs/bench/topic.yaml", "specs/bench/sentiment.yaml"]
# The demo's `tenth` (specs/demo.yaml): what a user would train.
STUDENT = {"name": "tenth", "from_teacher": {"keep_layers": 6, "hidden_size": 384, "intermediate_size": 1024,
                                             "heads": 6, "kv_heads": 2, "vocab": {"keep_frequent": 2000}}}
QUICK_STEPS, QUICK_CALIBRATION, QUICK_SEEDS, QUICK_EVAL_ROWS = 12, 8, [0, 1], 24
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0
IN_DISTRIBUTION = "in-distribution"


# --- arms ------------------------------------------------------------------------------------


@dataclass
class Arm:
    """One lever changed from the base: a change to the curation (raw spec -> raw spec), to the
    training loss, to other training settings (`training`: e.g. teacher_signal), or several;
    `applies` says why it cannot be run on a spec (None: it can)."""
    name: str
    what: str
    curation: Callable[[dict], dict] | None = None
    loss: dict = field(default_factory=dict)
    applies: Callable[[dict], str | None] = lambda raw: None
    training: dict = field(default_factory=dict)


def _teacher_written(raw: dict) -> list[dict]:
    return [a for a in raw.get("augment") or [] if a.get("teacher")]


def _has_options(raw: dict) -> bool:
    categories = (raw.get("coverage") or {}).get("categories") or {}
    return any(s.get("options") for s in raw.get("sources") or []) or \
        any((c or {}).get("options") for c in categories.values())


def _one_cluster(raw: dict) -> dict:
    """No cluster balancing: one cluster, so selection takes a seeded random order (and a spec with
    teach.order: selection keeps the clusters it needs)."""
    seed = (raw.get("diversity") or {}).get("seed", 0)
    return {**raw, "diversity": {"clusters": 1, "seed": seed}}


def _random(raw: dict) -> dict:
    out = _one_cluster(raw)
    out.pop("mining", None)
    return out


def _no_dedup(raw: dict) -> dict:
    out = _one_cluster(raw)
    dedup = dict(out.get("dedup") or {})
    dedup.pop("semantic", None)
    out["dedup"] = dedup
    return out


def _no_variations(raw: dict) -> dict:
    kept = [a for a in raw.get("augment") or [] if not a.get("teacher")]
    out = {k: v for k, v in raw.items() if k != "augment"}
    return {**out, "augment": kept} if kept else out


def temperature_arms(raw: dict) -> list[Arm]:
    base_t = float(((raw.get("training") or {}).get("loss") or {}).get("temperature", 2.0))
    return [Arm(f"T{t:g}", f"KD temperature {t:g} (base {base_t:g})", loss={"temperature": float(t)})
            for t in (1, 2, 5) if not math.isclose(t, base_t)]


def arms_for(raw: dict) -> list[Arm]:
    return [
        Arm("hard", "hard labels only: kd 0, hard 1", loss={"kd_weight": 0.0, "hard_weight": 1.0}),
        *temperature_arms(raw),
        Arm("random", "no band, no clusters: a random choice of the same size from the same pool", curation=_random,
            applies=lambda r: None if r.get("mining") else "the spec mines no band"),
        Arm("no-dedup", "no semantic dedup, no cluster balancing", curation=_no_dedup,
            applies=lambda r: None if (r.get("dedup") or {}).get("semantic") or r.get("diversity")
            else "the spec has neither semantic dedup nor clusters"),
        Arm("no-variations", "without the teacher-written variations", curation=_no_variations,
            applies=lambda r: None if _teacher_written(r) else "the spec has no teacher-written variations"),
        Arm("options-kd", "KD on the option distribution, not the token top-k", loss={"kd_target": "options"},
            applies=lambda r: None if _has_options(r) else "the spec gives no fixed answer set (options:)"),
    ]


# --- specs -----------------------------------------------------------------------------------


def read_raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def equal_quotas(raw: dict, kept: dict[str, int]) -> dict:
    """The raw spec with each category capped at the base's train+val count (equal data size)."""
    out = copy.deepcopy(raw)
    for name, category in out["coverage"]["categories"].items():
        category = category or {}
        for key in ("share", "min"):
            category.pop(key, None)
        category["max"] = max(1, kept.get(name, 0))
        out["coverage"]["categories"][name] = category
    out["coverage"].pop("total", None)
    return out


def bench_spec(raw: dict, path: Path, *, arm: str, loss: dict, steps: int | None, base_ref: str | None,
               quick: bool, student: dict | None = None, training_changes: dict | None = None) -> Spec:
    """The spec an arm curates and trains with: its own dataset name, the bench's student, the
    shared eval sets (the base's test split first, then the spec's eval.sources)."""
    out = copy.deepcopy(raw)
    out["name"] = raw["name"] if arm == "base" else f"{raw['name']}-{arm}"
    student = copy.deepcopy(student or STUDENT)
    if quick and "from_teacher" in student:
        student["from_teacher"]["calibration"] = QUICK_CALIBRATION
    out["students"] = [student]
    training = out.setdefault("training", {})
    training.pop("seeds", None)
    training["loss"] = {**(training.get("loss") or {}), **loss}
    training.update(copy.deepcopy(training_changes or {}))
    if quick:
        steps = min(steps or QUICK_STEPS, QUICK_STEPS)
    if steps is not None:
        training["max_steps"] = steps
        training["epochs"] = max(int(training.get("epochs", 1)), 1000)  # max_steps decides; the data is equal
    evaluation = out.setdefault("eval", {})
    sources = list(evaluation.get("sources") or [])
    if base_ref is not None:
        first = next(iter(raw.get("sources") or [{}]))
        shared = {"from": base_ref, "where": "split = 'test'", "text": "prompt", "category": "category",
                  "label": "label"}
        if first.get("options"):
            shared["options"] = first["options"]
        sources = [shared] + sources
    if quick:  # a smoke run scores the first rows of each shared set: the shape, not the figures
        sources = [{**src, "limit": QUICK_EVAL_ROWS} for src in sources]
    evaluation["sources"] = sources
    evaluation["split"] = "val"  # every arm is scored on the shared sets above; its own val is small
    evaluation["speed_prompts"] = 1
    evaluation["speed_tokens"] = 4
    return parse_spec(out, path=path)


def train_steps(spec: Spec, train_rows: int) -> int:
    per_epoch = -(-train_rows // spec.training.batch_size)
    return max(1, spec.training.epochs * per_epoch) if not spec.training.max_steps else \
        min(spec.training.max_steps, spec.training.epochs * per_epoch)


def split_counts(st, ref: str) -> tuple[int, dict[str, int]]:
    """Train rows, and train+val rows per category, of a version."""
    examples = st.read(ref, "examples")
    chosen = examples.filter(examples["split"] != "test")
    per_category = dict(chosen.group_by("category").len().iter_rows())
    return examples.filter(examples["split"] == "train").height, per_category


# --- one arm ---------------------------------------------------------------------------------


@dataclass
class Settings:
    """What every arm of a bench run shares."""
    st: object  # the store
    seeds: list[int]
    quick: bool
    progress: bool
    student: dict
    console: Console
    max_steps: int | None = None  # every arm trains at most this many steps (default: the spec's epochs)


def run_arm(arm: Arm, raw: dict, path: Path, bench: Settings, base: dict | None) -> dict:
    """Curate (when the arm changes curation), train per seed, evaluate on the shared sets."""
    began = time.perf_counter()
    st, seeds, progress = bench.st, bench.seeds, bench.progress
    common = {"quick": bench.quick, "student": bench.student}
    if base is not None:
        common["training_changes"] = arm.training
    if base is None:
        spec = bench_spec(raw, path, arm="base", loss={}, steps=None, base_ref=None, **common)
    elif arm.curation is None:  # a training lever: the base's data
        spec = bench_spec(raw, path, arm="base", loss=arm.loss, steps=base["steps"], base_ref=base["dataset"],
                          **common)
    else:
        spec = bench_spec(equal_quotas(arm.curation(raw), base["kept_per_category"]), path, arm=arm.name,
                          loss=arm.loss, steps=base["steps"], base_ref=base["dataset"], **common)
    if base is not None and arm.curation is None:
        dataset, calls, created = base["dataset"], 0, False
    else:
        curation = pipeline.run(spec, st, progress=progress, console=Console(stderr=True, quiet=not progress))
        dataset, calls, created = f"{spec.name}@{curation.version}", curation.teacher_calls, curation.created
    train_rows, per_category = split_counts(st, dataset)
    out = {"arm": arm.name, "what": arm.what, "dataset": dataset, "train_rows": train_rows,
           "kept_per_category": per_category, "teacher_calls": calls, "curation_created": created}
    if base is None:  # the base decides the steps of all, and the shared in-distribution set
        steps = train_steps(spec, train_rows)
        spec = bench_spec(raw, path, arm="base", loss={}, steps=min(steps, bench.max_steps or steps),
                          base_ref=dataset, **common)
    out["steps"] = spec.training.max_steps
    trained = runs.train_seeds(spec, st, dataset, seeds, progress=progress)
    report, report_path = runs.evaluate(spec, st, dataset, seeds=seeds, progress=progress)
    out.update(runs={str(seed): r.run_id for seed, r in trained}, eval_json=str(report_path),
               sets=[set_figures(entry) for entry in report["sets"]],
               seconds_per_step=_seconds_per_step(trained), wall_s=time.perf_counter() - began)
    bench.console.print(f"  {arm.name}: {dataset}, {train_rows} train rows, {out['steps']} steps x {len(seeds)} seed(s), "
                  f"{out['wall_s']:.0f} s", highlight=False)
    return out


def _seconds_per_step(trained) -> float | None:
    values = []
    for _, result in trained:
        for name in result.students:
            metrics = json.loads((result.run_dir / name / "metrics.json").read_text())
            if metrics.get("seconds_per_step"):
                values.append(metrics["seconds_per_step"])
    return statistics.median(values) if values else None


def set_figures(entry: dict) -> dict:
    teacher = next(r for r in entry["models"] if r["kind"] == "teacher")
    students = [r for r in entry["models"] if r["kind"] != "teacher"]
    return {"name": entry["name"], "own_split": entry["kind"] == "split", "description": entry["description"], "n": teacher["n"],
            "baseline": entry["baseline"], "teacher_accuracy": teacher["accuracy"],
            "teacher_accuracy_ci": teacher["accuracy_ci"], "teacher_correct": teacher.get("correct_by_row", ""),
            "accuracy": seed_figure(students, "accuracy", "accuracy_ci"),
            "retention": seed_figure(students, "retention", "retention_ci"),
            "correct_by_seed": {str(r["seed"]): r.get("correct_by_row", "") for r in students},
            "one_answer_seeds": [r["seed"] for r in students if r.get("one_answer")]}


def seed_figure(rows: list[dict], key: str, ci_key: str) -> dict:
    """Mean over seeds, the 95% interval averaged over seeds, min-max over seeds."""
    values = [r[key] for r in rows if r.get(key) is not None]
    cis = [r[ci_key] for r in rows if r.get(ci_key)]
    return {"mean": statistics.fmean(values) if values else None,
            "ci": [statistics.fmean(c[0] for c in cis), statistics.fmean(c[1] for c in cis)] if cis else None,
            "min": min(values) if values else None, "max": max(values) if values else None,
            "per_seed": {str(r["seed"]): r.get(key) for r in rows}}


# --- comparison with the base ---------------------------------------------------------------


def seed_rows(correct_by_seed: dict[str, str]) -> dict[str, np.ndarray] | None:
    """Each seed's row outcomes (None when the seeds' rows differ)."""
    rows = {seed: np.array([c == "1" for c in s], dtype=float) for seed, s in correct_by_seed.items() if s}
    if not rows or len({len(r) for r in rows.values()}) != 1:
        return None
    return rows


def paired_change(arm: dict[str, np.ndarray], base: dict[str, np.ndarray], teacher_accuracy: float, *,
                  resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """The change in retention from base to arm, each seed's run paired with the base's run of that seed,
    with a 95% two-level bootstrap interval: seeds, then rows. Resampling rows alone would take the
    seeds' mean for certain, and a short run's seeds can differ by more than the arms do."""
    seeds = [s for s in arm if s in base]
    diff = np.stack([(arm[s] - base[s]) / teacher_accuracy for s in seeds])  # seeds x rows
    rng = np.random.default_rng(seed)
    n_seeds, n_rows = diff.shape
    picked_seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds, 1))
    picked_rows = rng.integers(0, n_rows, size=(resamples, 1, n_rows))
    means = diff[picked_seeds, picked_rows].mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return {"change": float(diff.mean()), "ci": [float(low), float(high)], "verdict": verdict(low, high),
            "seeds": len(seeds)}


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "gain"
    if high < 0:
        return "loss"
    return "no clear difference"


def compare_all(results: list[dict]) -> list[dict]:
    """Every arm's change against its spec's first arm, computed again (as --show prints earlier runs)."""
    for result in results:
        for arm in result["arms"][1:]:
            for figures in arm["sets"]:
                figures.pop("vs_base", None)
            compare(arm, result["arms"][0])
    return results


def change_between(figures: dict, other: dict) -> dict | None:
    """One set's change in retention from `other` to `figures` (paired_change), or None where the two runs
    cannot be paired: an arm's own split, no teacher accuracy, no common seed or other rows."""
    if figures["own_split"] or not figures["teacher_accuracy"]:
        return None
    mine, theirs = seed_rows(figures["correct_by_seed"]), seed_rows(other["correct_by_seed"])
    if mine is None or theirs is None or not set(mine) & set(theirs) or \
            len(next(iter(mine.values()))) != len(next(iter(theirs.values()))):
        return None
    return paired_change(mine, theirs, figures["teacher_accuracy"])


def compare(arm: dict, base: dict) -> None:
    """Adds each set's change against the base (same set name, same rows) to the arm's figures."""
    by_name = {s["name"]: s for s in base["sets"]}
    for figures in arm["sets"]:
        other = by_name.get(figures["name"])
        change = None if other is None else change_between(figures, other)
        if change is not None:
            figures["vs_base"] = change


# --- one spec ---------------------------------------------------------------------------------


def bench_one(path: Path, only: set[str] | None, bench: Settings) -> dict:
    raw = read_raw(path)
    if not raw.get("coverage"):
        raise SystemExit(f"{path}: coverage: the quality bench needs coverage quotas to hold data size equal")
    bench.console.print(f"[bold]{path}[/]", highlight=False)
    result = {"spec": str(path), "seeds": bench.seeds, "quick": bench.quick, "student": bench.student, "arms": [],
              "not_applicable": []}
    base = run_arm(Arm("base", "the spec as written"), raw, path, bench, None)
    result["arms"].append(base)
    for arm in arms_for(raw):
        if only and arm.name not in only:
            continue
        why = arm.applies(raw)
        if why:
            result["not_applicable"].append({"arm": arm.name, "what": arm.what, "why": why})
            continue
        figures = run_arm(arm, raw, path, bench, base)
        compare(figures, base)
        result["arms"].append(figures)
    return result


# --- tables ------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _figure(fig: dict) -> str:
    text = _pct(fig["mean"])
    if fig.get("ci"):
        text += f" [{100 * fig['ci'][0]:.0f}–{100 * fig['ci'][1]:.0f}]"
    if fig["min"] is not None and len(fig["per_seed"]) > 1:
        text += f" ({100 * fig['min']:.0f}–{100 * fig['max']:.0f})"
    return text


def format_change(vs: dict) -> str:
    """A paired_change as the tables print it: points [interval] verdict."""
    return f"{100 * vs['change']:+.1f} [{100 * vs['ci'][0]:+.1f}, {100 * vs['ci'][1]:+.1f}] {vs['verdict']}"


def _change(figures: dict) -> str:
    vs = figures.get("vs_base")
    return format_change(vs) if vs else "–"


def set_label(name: str) -> str:
    """in-distribution for the base's test split (the first shared source), held-out for the spec's own."""
    return IN_DISTRIBUTION if "(from:" in name else "held-out " + Path(name.split("(", 1)[-1].rstrip(")")).name


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        base = result["arms"][0]
        shared = [s for s in base["sets"] if not s["own_split"]]
        seeds = len(result["seeds"])
        lines += [f"### {result['spec']} ({base['dataset']}, {seeds} seed(s){', quick' if result['quick'] else ''})",
                  ""]
        for s in shared:
            base_line = s["baseline"]
            lines.append(f"- {set_label(s['name'])}: n={s['n']}, teacher {_pct(s['teacher_accuracy'])} "
                         f"[{100 * s['teacher_accuracy_ci'][0]:.0f}–{100 * s['teacher_accuracy_ci'][1]:.0f}]"
                         + (f", majority class {_pct(base_line['accuracy'])}" if base_line else ""))
        lines.append("")
        header = ["arm", "train rows", "steps"]
        for s in shared:
            label = set_label(s["name"])
            header += [f"{label} accuracy", f"{label} retention", f"{label} retention vs base"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for arm in result["arms"]:
            by_name = {s["name"]: s for s in arm["sets"]}
            cells = [f"{arm['arm']}: {arm['what']}", str(arm["train_rows"]), str(arm["steps"])]
            for s in shared:
                mine = by_name.get(s["name"])
                cells += ["–"] * 3 if mine is None else [_figure(mine["accuracy"]), _figure(mine["retention"]),
                                                         _change(mine)]
            lines.append("| " + " | ".join(cells) + " |")
        for skipped in result["not_applicable"]:
            lines.append(f"| {skipped['arm']}: {skipped['what']} | not applicable: {skipped['why']} |"
                         + " |" * (len(header) - 2))
        lines.append("")
    lines.append("accuracy: mean over seeds [95% Wilson interval, averaged over seeds] (min–max over seeds); "
                 "retention: student / teacher accuracy on the same rows [95% paired bootstrap, averaged over seeds]; "
                 "vs base: change in retention, points [95% paired bootstrap over seeds, then rows; "
                 "each seed paired with the base's]; "
                 "a verdict of gain or loss only where that interval excludes 0.")
    return "\n".join(lines)


def bench_arguments(parser, *, specs: list[str], student: dict, student_help: str, only_help: str) -> None:
    """The options this bench shares with its siblings (bench/kd_signal.py)."""
    parser.add_argument("--spec", action="append", type=Path,
                        help="spec to bench (repeatable; default: " + " and ".join(specs) + ")")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--only", help=only_help)
    parser.add_argument("--max-steps", type=int, help="train every arm at most this many optimizer steps "
                                                      "(default: the spec's epochs over the base's train rows)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: seeds {QUICK_SEEDS}, at most {QUICK_STEPS} steps")
    parser.add_argument("--store", type=Path, default=Path("out/bench-store"),
                        help="store the bench curates and trains into; cached across runs (default out/bench-store)")
    parser.add_argument("--fresh", action="store_true", help="use a new temporary store: every cost is paid again")
    parser.add_argument("--out", type=Path, help="JSON of every figure (default out/bench/<bench>-<time>.json)")
    parser.add_argument("--student", type=json.loads, default=student, help=student_help)
    parser.add_argument("--progress", action="store_true", help="show the engine's progress bars")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_arguments(parser, specs=DEFAULT_SPECS, student=STUDENT, only_help="arms to run besides the base, "
                    "comma-separated (default: all)",
                    student_help="the student to train, as a spec writes it, in JSON (default: the demo's tenth)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="specs benched at once, each in its own process and its own store under --store "
                             "(one torch thread each: on 2 cores, --jobs 2 halves the wall time of two specs)")
    parser.add_argument("--show", type=Path, nargs="+", help="print the tables of earlier runs' JSON, run nothing")
    args = parser.parse_args(argv)
    console = Console(width=200) if not Console().is_terminal else Console()
    if args.show:
        print(markdown(compare_all([spec for path in args.show for spec in json.loads(path.read_text())["specs"]])))
        return
    paths = args.spec or [Path(p) for p in DEFAULT_SPECS]
    if args.jobs > 1 and len(paths) > 1:
        return in_processes(paths, args, argv if argv is not None else sys.argv[1:], console)
    seeds = QUICK_SEEDS if args.quick else list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    only = set(args.only.split(",")) if args.only else None
    threads = set_threads()
    console.print(f"{threads} torch thread(s); seeds {','.join(map(str, seeds))}{' (quick)' if args.quick else ''}",
                  highlight=False)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Settings(store.open(Path(tmp) / "store" if args.fresh else args.store), seeds, args.quick,
                         args.progress, args.student, console, args.max_steps)
        results = [bench_one(path, only, bench) for path in paths]
    write_results(args, results, {"threads": threads, "seeds": seeds, "quick": args.quick,
                                  "wall_s": time.perf_counter() - began, "machine": machine()}, console)


def write_results(args, results: list[dict], header: dict, console: Console, *, bench: str = "quality",
                  table_of=None) -> None:
    """Prints the table and writes the JSON (--out, else out/bench/BENCH-TIME.json) and the table beside it."""
    table = (table_of or markdown)(results)
    print(table)  # as is: markdown, never wrapped
    out = args.out or Path("out/bench") / f"{bench}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, "specs": results}, indent=2, default=str))
    out.with_suffix(".md").write_text(table + "\n")
    console.print(f"wall {header['wall_s']:.0f} s; figures written to {out} and {out.with_suffix('.md')}",
                  highlight=False)


def in_processes(paths: list[Path], args, argv: list[str], console: Console) -> None:
    """Each spec in its own process (its own store: two processes never write one), --jobs at a time;
    their figures are merged into one JSON and one table."""
    import subprocess

    passed = _without(argv, {"--spec", "--store", "--out", "--jobs"})
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pending, running, outs = list(paths), [], []
        while pending or running:
            while pending and len(running) < args.jobs:
                path = pending.pop(0)
                out = Path(tmp) / f"{len(outs)}-{path.stem}.json"
                command = [sys.executable, __file__, "--spec", str(path), "--store", str(args.store / path.stem),
                           "--out", str(out), *passed]
                log = args.store / path.stem / "quality.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                console.print(f"started {path}: its store {log.parent}, its log {log}", highlight=False)
                with log.open("w") as sink:
                    running.append((path, subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)))
                outs.append(out)
            time.sleep(1)
            for path, process in [r for r in running if r[1].poll() is not None]:
                running.remove((path, process))
                if process.returncode:
                    for _, other in running:
                        other.terminate()
                    raise SystemExit(f"bench/quality.py on {path} failed (exit {process.returncode})")
        runs = [json.loads(out.read_text()) for out in outs]
    results = [spec for run in runs for spec in run["specs"]]
    write_results(args, results, {**{k: runs[0][k] for k in ("threads", "seeds", "quick", "machine")},
                                  "jobs": args.jobs, "wall_s": time.perf_counter() - began}, console)


def _without(argv: list[str], options: set[str]) -> list[str]:
    """argv less the given options and their values (`--opt value` or `--opt=value`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif arg.split("=", 1)[0] not in options:
            out.append(arg)
    return out


def machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch threads {set_threads()}"


if __name__ == "__main__":
    main()
