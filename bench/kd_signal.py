"""What each teacher signal is worth: stored top-k at several k, sampled targets, the online teacher and
on-policy steps, for one full-vocabulary student at equal steps, over seeds.

    .venv/bin/python bench/kd_signal.py [--spec specs/demo.yaml --spec specs/bench/language.yaml]
                                        [--seeds 0,1,2] [--only ARMS] [--max-steps N] [--quick]
                                        [--store out/bench-store]
    .venv/bin/python bench/kd_signal.py --show out/bench/kd_signal-TIME.json [MORE.json]   # the tables again

The harness is bench/quality.py's (imported, not copied): per spec the reference arm `top20` is the spec
curated with teacher.logprobs {top_k: 20, mode: topk} and trained on stored targets; every other arm
changes one thing, at the reference's number of optimizer steps and, for a curation change, at most the
reference's rows per category:

    top5, top50    stored top-k at k = 5 and 50 (teacher.logprobs.top_k: a curation change)
    sampled20      teacher.logprobs {mode: sampled, top_k: 20}: 20 draws per token, the same budget as
                   top-20. Training on draws is unbiased only for forward KL at T = 1 (engine/train/sampled.py
                   refuses anything else), so this arm trains at T = 1 while top20 trains at the spec's T
    top20-T1       stored top-20 at T = 1: the control that separates "draws vs top-k" from "T = 1 vs T"
    online         training.teacher_signal: online: the live teacher's full distribution, no curation change
    on-policy      training.on_policy {share: 0.5, max_new_tokens: the spec's teacher.generation.max_new_tokens}
                   on top of stored top-20, so share 0 is top20 itself and the change is on-policy alone
                   (on top of online, it would mix two levers; run online alone for that)

All arms train one student: STUDENT, the demo's `tenth` without vocabulary trimming (online, on-policy and
sampled targets refuse a trimmed vocabulary; a trimmed one would also fold top-50's rarer ids into the tail
and favour small k), so every arm differs by its signal alone. --student overrides it (JSON, as a spec
writes it).

What a new k costs: the teach stage's request-cache key (engine/stages/teach.py: generation_params, through
engine/teachers/request_cache.py: request_key) holds teacher.logprobs.top_k, and logprobs_mode when it is
not topk, and the teach stage's own cache slice holds the whole teacher section: each k and the sampled arm
ask the teacher again for every row it answers (generation, not a re-read of cached logits), and each arm's
eval asks it again for the shared rows. Generation is greedy, so the responses, token_logprobs and mean token
prob (the specs' mining measure) are those of top-20: `same_rows` in the JSON checks that each curation arm
kept exactly the reference's train rows. Recorded teacher speed here (the bench store's request cache):
0.49 s per answered row, so a new k costs ~2.5 minutes of teacher time per spec (demo ~300 rows asked,
language ~280), plus ~1 minute of eval answers.

Reported per arm and shared set (the reference version's test split, drawn before the teacher answered and
never mined, and each eval.source): retention as mean over seeds [95% interval averaged over seeds]
(min-max over seeds), and the change against top20 with a 95% two-level paired bootstrap (quality.compare:
each seed's run paired with top20's run of that seed; seeds resampled, then rows);
cost per optimizer step: the student's own step (metrics.json seconds_per_step), the teacher's forwards
(teacher_forward_seconds / steps) and the on-policy sampling and scoring (on_policy sampling_seconds,
scoring_seconds / steps); peak memory (metrics.json peak_memory: host RSS, CUDA allocated; the bench resets
the process's peak RSS before each arm through /proc/self/clear_refs, so an arm's figure is its own seeds'
curation and training, not an earlier arm's peak; what the process already held still counts, so the table
also shows the growth over the RSS at the arm's start; a run reused from the store keeps the figure it was
trained with; for a strict comparison run `--only ARM` in a fresh process); bytes stored
per response token, measured from the version's Parquet files: the compressed sizes of the topk_ids and
topk_logprobs column chunks (pyarrow metadata, scaled by live rows for shared files) over the response
tokens (sum of token_ids lengths), beside the uncompressed size and the raw 6 bytes x k (int32 id + float16
log-prob per slot). The verdict says which arm wins and by how much only where the paired interval excludes
0; otherwise "no clear difference". Under each table, sampled20 against its control top20-T1 (CONTROLS), with the
same interval.

Cost (2 shared cores, SYLLABUS_THREADS=1). The quick test's tiny random teacher is the student's size, so its
per-step figures give only the shape: there online took 1.6-2.2x the stored step and on-policy 2.6-3.3x
(sampling ~45% of it), top-k, sampled and T1 within noise of top-20. The real teacher is ~5x the student, so
the estimate takes per-step times from the bench store's recorded runs of the same specs: 210 (demo) and 220
(language) steps per seed; a stored step of the trimmed `tenth` 1.1 s, to which the untrimmed 49152-way head
adds ~0.5-1 s (~2 s); a teacher forward over a batch of 8 ~2.5 s (tenth-hidden: 460-630 s over 210-220
steps); a student sampling 12-16 tokens at batch 8 ~0.3 s. Per spec and seed: each stored arm (top20, top5,
top50, sampled20, top20-T1) ~7 min; online ~16 min (a teacher forward every step); on-policy ~12 min (half
the steps sample and are scored by the teacher). That is ~63 min per spec and seed, ~6.3 hours for 3 seeds x
2 specs, plus ~15 minutes of new teacher answers and ~25 minutes of evals: about 7 hours, 40% of it online
and on-policy. --max-steps N trains every arm N steps instead of the spec's epochs (the table says how
many); --only splits it (each run is cached in the store, so a later full run reuses it). The quick
test (7 arms x 2 seeds x <= 12 steps) takes 40-65 s.

Output: a JSON file of every figure (out/bench/kd_signal-TIME.json) and a markdown table, printed and
written beside it. --quick: seeds 0 and 1, at most quality.QUICK_STEPS steps: a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/quality.py, the shared harness

import pyarrow.parquet as pq  # noqa: E402
from rich.console import Console  # noqa: E402

import quality  # noqa: E402
import store  # noqa: E402
from engine.models import set_threads  # noqa: E402
from quality import Arm, Settings  # noqa: E402

DEFAULT_SPECS = ["specs/demo.yaml", "specs/bench/language.yaml"]
# The demo's `tenth` with its full vocabulary: online, on-policy and sampled targets refuse a trimmed one.
STUDENT = {"name": "tenth-full", "from_teacher": {"keep_layers": 6, "hidden_size": 384, "intermediate_size": 1024,
                                                  "heads": 6, "kv_heads": 2}}
REFERENCE_K = 20
TOPK_COLUMNS = ("topk_ids", "topk_logprobs")
RAW_BYTES_PER_SLOT = 4 + 2  # int32 id + float16 log-prob


# --- arms ------------------------------------------------------------------------------------


def with_logprobs(raw: dict, top_k: int, mode: str = "topk") -> dict:
    out = copy.deepcopy(raw)
    out["teacher"]["logprobs"] = {"top_k": top_k, "mode": mode}
    return out


def reference_raw(raw: dict) -> dict:
    """The spec as the reference arm runs it: stored top-20 targets, whatever the spec asked."""
    out = with_logprobs(raw, REFERENCE_K)
    training = out.setdefault("training", {})
    training.pop("teacher_signal", None)
    training.pop("on_policy", None)
    return out


def max_new_tokens(raw: dict) -> int:
    return int(((raw["teacher"].get("generation") or {}).get("max_new_tokens")) or 64)


def arms_for(raw: dict) -> list[Arm]:
    t1 = {"temperature": 1.0, "temperature_end": None}
    return [
        *[Arm(f"top{k}", f"stored top-{k}", curation=lambda r, k=k: with_logprobs(r, k)) for k in (5, 50)],
        Arm("sampled20", f"sampled: {REFERENCE_K} draws per token, T 1 (forward KL)",
            curation=lambda r: with_logprobs(r, REFERENCE_K, "sampled"), loss={**t1, "divergence": "forward_kl"}),
        Arm("top20-T1", "stored top-20 at T 1: the sampled arm's control", loss=t1),
        Arm("online", "the live teacher's full distribution", training={"teacher_signal": "online"}),
        Arm("on-policy", f"stored top-20 + on-policy share 0.5, {max_new_tokens(raw)} new tokens",
            training={"on_policy": {"share": 0.5, "max_new_tokens": max_new_tokens(raw)}}),
    ]


def reads_stored_targets(arm: Arm) -> bool:
    return arm.training.get("teacher_signal") != "online"


# --- what each arm cost ------------------------------------------------------------------------


def stored_bytes(st, dataset: str) -> dict:
    """Bytes of the examples' topk_ids + topk_logprobs per response token, from the Parquet files."""
    info = st.resolve(dataset)
    compressed = uncompressed = 0.0
    for seg in info.segments["examples"]:
        meta = pq.ParquetFile(seg.path).metadata
        live = seg.live_rows / seg.rows if seg.rows else 0.0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".")[0] in TOPK_COLUMNS:
                    compressed += column.total_compressed_size * live
                    uncompressed += column.total_uncompressed_size * live
    examples = st.read(dataset, "examples", columns=["token_ids", "topk_ids"])
    tokens = int(examples["token_ids"].list.len().sum())
    slots = int(examples["topk_ids"].list.first().list.len().max() or 0)  # k: every token row holds k slots
    return {"response_tokens": tokens, "k": slots, "parquet_zstd_per_token": compressed / tokens if tokens else None,
            "parquet_uncompressed_per_token": uncompressed / tokens if tokens else None,
            "raw_per_token": RAW_BYTES_PER_SLOT * slots}


def _metrics(st, arm: dict, student: str) -> list[dict]:
    return [json.loads((st.root / "models" / run_id / student / "metrics.json").read_text())
            for run_id in arm["runs"].values()]


def cost_figures(metrics: list[dict]) -> dict:
    """Per optimizer step, medians over seeds: the student's step, the teacher's forwards, on-policy work."""
    def per_step(m: dict, seconds) -> float:
        return (seconds or 0.0) / m["steps"] if m.get("steps") else 0.0

    student = [m.get("seconds_per_step") or 0.0 for m in metrics]
    teacher = [per_step(m, m.get("teacher_forward_seconds")) for m in metrics]
    sampling = [per_step(m, (m.get("on_policy") or {}).get("sampling_seconds")) for m in metrics]
    scoring = [per_step(m, (m.get("on_policy") or {}).get("scoring_seconds")) for m in metrics]
    parts = {"student_s": student, "teacher_forward_s": teacher, "on_policy_sampling_s": sampling,
             "on_policy_scoring_s": scoring}
    out = {name: statistics.median(values) for name, values in parts.items()}
    out["total_s"] = statistics.median(sum(v) for v in zip(*parts.values()))
    out["steps_by_seed"] = [m.get("steps") for m in metrics]
    out["on_policy_steps_by_seed"] = [(m.get("on_policy") or {}).get("steps") for m in metrics]
    out["peak_host_rss_bytes"] = max((m.get("peak_memory") or {}).get("host_rss_bytes") or 0 for m in metrics)
    cuda = [(m.get("peak_memory") or {}).get("cuda_allocated_bytes") for m in metrics]
    out["peak_cuda_allocated_bytes"] = max(cuda) if any(c is not None for c in cuda) else None
    out["teacher_signal"] = metrics[0].get("teacher_signal") if metrics else None
    out["targets"] = metrics[0].get("targets") if metrics else None
    return out


def train_rows(st, dataset: str) -> list[str]:
    examples = st.read(dataset, "examples", columns=["prompt_id", "split"])
    return sorted(examples.filter(examples["split"] == "train")["prompt_id"].to_list())


# --- one spec ---------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Linux: restart the process's peak-RSS count (metrics.json's peak_memory is getrusage's high-water mark,
    which would otherwise carry one arm's peak into every later arm of the same bench process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux), what an arm's peak starts from."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def run_one(arm: Arm, raw: dict, path: Path, bench: Settings, reference: dict | None) -> dict:
    peak_reset = reset_peak_rss()
    resident = resident_bytes()
    figures = quality.run_arm(arm, raw, path, bench, reference)
    figures["peak_reset"], figures["rss_at_start_bytes"] = peak_reset, resident
    figures["cost"] = cost_figures(_metrics(bench.st, figures, bench.student["name"]))
    figures["reads_stored_targets"] = reads_stored_targets(arm)
    figures["bytes"] = stored_bytes(bench.st, figures["dataset"])
    figures["same_rows"] = reference is None or train_rows(bench.st, figures["dataset"]) == \
        train_rows(bench.st, reference["dataset"])
    if reference is not None:
        quality.compare(figures, reference)
    return figures


def bench_one(path: Path, only: set[str] | None, bench: Settings) -> dict:
    raw = reference_raw(quality.read_raw(path))
    if not raw.get("coverage"):
        raise SystemExit(f"{path}: coverage: the bench needs coverage quotas to hold data size equal")
    bench.console.print(f"[bold]{path}[/]", highlight=False)
    result = {"spec": str(path), "seeds": bench.seeds, "quick": bench.quick, "student": bench.student, "arms": []}
    reference = run_one(Arm("top20", f"stored top-{REFERENCE_K} (reference)"), raw, path, bench, None)
    result["arms"].append(reference)
    for arm in arms_for(raw):
        if not only or arm.name in only:
            result["arms"].append(run_one(arm, raw, path, bench, reference))
    return result


# --- tables ------------------------------------------------------------------------------------


def arm_verdict(arm: dict) -> str:
    """Which way the arm moved retention against top-20, set by set, where its interval excludes 0."""
    said = []
    for figures in arm["sets"]:
        vs = figures.get("vs_base")
        if vs and vs["verdict"] != "no clear difference":
            word = "beats top-20" if vs["verdict"] == "gain" else "worse than top-20"
            said.append(f"{word} by {abs(100 * vs['change']):.1f} pts on {quality.set_label(figures['name'])}")
    return "; ".join(said) or "no clear difference"


def winner(result: dict) -> str:
    best = None
    for arm in result["arms"][1:]:
        for figures in arm["sets"]:
            vs = figures.get("vs_base")
            if vs and vs["verdict"] == "gain" and (best is None or vs["change"] > best[1]["change"]):
                best = (arm["arm"], vs, quality.set_label(figures["name"]))
    if best is None:
        return "Nothing beats stored top-20 here: no clear difference."
    name, vs, label = best
    return (f"Largest gain: {name}, +{100 * vs['change']:.1f} retention points on {label} "
            f"[{100 * vs['ci'][0]:+.1f}, {100 * vs['ci'][1]:+.1f}] over stored top-20.")


# An arm that changes two things at once is also compared with the arm that changes only the second: sampled
# targets train at T = 1, so draws against top-k is sampled20 against top20-T1, not against top20.
CONTROLS = {"sampled20": "top20-T1"}


def against_controls(result: dict) -> list[str]:
    """One line per arm with a control in this result: its change against the control, set by set."""
    by_name = {arm["arm"]: arm for arm in result["arms"]}
    lines = []
    for name, control_name in CONTROLS.items():
        arm, control = by_name.get(name), by_name.get(control_name)
        if arm is None or control is None:
            continue
        theirs = {s["name"]: s for s in control["sets"]}
        said = []
        for figures in arm["sets"]:
            other = theirs.get(figures["name"])
            vs = None if other is None else quality.change_between(figures, other)
            if vs is not None:
                said.append(f"{quality.set_label(figures['name'])} {quality.format_change(vs)}")
        if said:
            lines.append(f"{name} against its control {control_name}: " + "; ".join(said) + ".")
    return lines


def _bytes_cell(arm: dict) -> str:
    b = arm["bytes"]
    if not arm["reads_stored_targets"]:
        return "0 read (teacher live)"
    zstd = b["parquet_zstd_per_token"]
    return f"{zstd:.1f} ({b['raw_per_token']} raw)" if zstd is not None else "–"


def _time_cell(arm: dict, reference: dict) -> str:
    cost, base = arm["cost"], reference["cost"]["total_s"]
    extra = cost["teacher_forward_s"] + cost["on_policy_sampling_s"] + cost["on_policy_scoring_s"]
    text = f"{cost['total_s']:.3f}"
    if extra:
        text += f" (teacher {cost['teacher_forward_s']:.3f}, sampling {cost['on_policy_sampling_s']:.3f})"
    return text + (f" x{cost['total_s'] / base:.1f}" if base else "")


def _memory_cell(arm: dict) -> str:
    cost, start = arm["cost"], arm.get("rss_at_start_bytes")
    text = f"{cost['peak_host_rss_bytes'] / 2**30:.2f} GiB"
    if arm.get("peak_reset") and start:
        text += f" (+{max(0, cost['peak_host_rss_bytes'] - start) / 2**30:.2f})"
    if cost["peak_cuda_allocated_bytes"] is not None:
        text += f", cuda {cost['peak_cuda_allocated_bytes'] / 2**30:.2f} GiB"
    return text


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        reference = result["arms"][0]
        shared = [s for s in reference["sets"] if not s["own_split"]]
        lines += [f"### {result['spec']} ({reference['dataset']}, student {result['student']['name']}, "
                  f"{len(result['seeds'])} seed(s), {reference['steps']} steps{', quick' if result['quick'] else ''})",
                  ""]
        for s in shared:
            lines.append(f"- {quality.set_label(s['name'])}: n={s['n']}, teacher {quality._pct(s['teacher_accuracy'])}")
        lines.append("")
        header = ["arm", "steps"]
        for s in shared:
            label = quality.set_label(s["name"])
            header += [f"{label} retention", f"{label} vs top-20"]
        header += ["s/step", "peak memory", "bytes/token stored", "verdict"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for arm in result["arms"]:
            lines.append("| " + " | ".join(_row(arm, reference, shared)) + " |")
        lines += ["", winner(result), *against_controls(result), ""]
    lines.append("retention: student / teacher accuracy on the same rows, mean over seeds [95% interval averaged "
                 "over seeds] (min–max over seeds); vs top-20: change in retention, points [95% paired bootstrap "
                 "over seeds, then rows; each seed paired with top-20's]; s/step: median over seeds of the "
                 "student's step + the teacher's forwards + on-policy sampling and scoring, per optimizer step "
                 "(xN: against top-20); "
                 "peak memory: host RSS high-water mark of the arm's training (+growth over the RSS at its start); "
                 "bytes/token: topk_ids + topk_logprobs of the version's examples, zstd Parquet, per response token "
                 "(raw: 6 bytes x k).")
    return "\n".join(lines)


def _row(arm: dict, reference: dict, shared: list[dict]) -> list[str]:
    by_name = {s["name"]: s for s in arm["sets"]}
    cells = [f"{arm['arm']}: {arm['what']}" + ("" if arm["same_rows"] else " (other rows!)"), str(arm["steps"])]
    for s in shared:
        mine = by_name.get(s["name"])
        cells += ["–", "–"] if mine is None else [quality._figure(mine["retention"]), quality._change(mine)]
    verdict = "reference" if arm is reference else arm_verdict(arm)
    return cells + [_time_cell(arm, reference), _memory_cell(arm), _bytes_cell(arm), verdict]


def merged(results: list[dict]) -> list[dict]:
    """One result per spec: the arms of runs split by --only, each arm once (the first run's), the
    reference first. Runs of one spec must share seeds, student and steps, or their arms do not compare."""
    by_spec: dict[str, dict] = {}
    for result in results:
        first = by_spec.setdefault(result["spec"], {**result, "arms": []})
        reference = result["arms"][0]
        known = {a["arm"] for a in first["arms"]}
        if first["arms"]:
            ours = first["arms"][0]
            if (result["seeds"], result["student"], reference["steps"], reference["dataset"]) != \
                    (first["seeds"], first["student"], ours["steps"], ours["dataset"]):
                raise SystemExit(f"{result['spec']}: runs with other seeds, student, steps or reference data "
                                 "cannot share a table")
        first["arms"] += [arm for arm in result["arms"] if arm["arm"] not in known]
    return list(by_spec.values())


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quality.bench_arguments(parser, specs=DEFAULT_SPECS, student=STUDENT,
                            only_help="arms to run besides top20, comma-separated (default: all)",
                            student_help="the student every arm trains, as a spec writes it, in JSON (default: "
                                         "tenth, full vocabulary)")
    parser.add_argument("--show", type=Path, nargs="+",
                        help="print the tables of earlier runs' JSON, run nothing; runs of the same spec split by "
                             "--only (at the same seeds and steps) are merged into one table")
    args = parser.parse_args(argv)
    if args.show:
        print(markdown(quality.compare_all(merged([spec for path in args.show
                                                    for spec in json.loads(path.read_text())["specs"]]))))
        return
    console = Console(width=200) if not Console().is_terminal else Console()
    seeds = quality.QUICK_SEEDS if args.quick else \
        list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    only = set(args.only.split(",")) if args.only else None
    threads = set_threads()
    console.print(f"{threads} torch thread(s); seeds {','.join(map(str, seeds))}{' (quick)' if args.quick else ''}",
                  highlight=False)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Settings(store.open(Path(tmp) / "store" if args.fresh else args.store), seeds, args.quick,
                         args.progress, args.student, console, args.max_steps)
        results = [bench_one(path, only, bench) for path in (args.spec or map(Path, DEFAULT_SPECS))]
    quality.write_results(args, results, {"threads": threads, "seeds": seeds, "quick": args.quick,
                                          "wall_s": time.perf_counter() - began, "machine": quality.machine()},
                          console, bench="kd_signal", table_of=markdown)

if __name__ == "__main__":
    main()
