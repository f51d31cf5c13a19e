"""Student kinds side by side: size, answer latency, accuracy and retention of each, over seeds.

    .venv/bin/python bench/students.py [--spec specs/demo.yaml --spec specs/bench/language.yaml]
                                       [--seeds 0,1,2] [--quick] [--store out/bench-store] [--out FILE]

For each spec (default: the demo, and specs/bench/language.yaml, where the teacher reads a detailed
instruction and the students only the bare text), the spec is curated as `syllabus run` does
(engine.curate.pipeline.run into the bench's store: cached, so a second run pays no teacher call),
then the students of KINDS below replace the spec's own (spec.model_copy), are trained per seed
(engine.train.runs.train_seeds) and scored (engine.train.runs.evaluate) on the test split and on
each of the spec's eval.sources:

    scratch        a fresh Llama like the demo's `tiny` (config:), about a twelfth of the teacher
    drop6          six of the teacher's 30 layers, full width (from_teacher: layers)
    tenth          the demo's `tenth`: the 6 most influential layers, hidden 384, MLP 1024, 6 query
                   heads in 2 kv groups, vocabulary trimmed to the dataset's ids + 2000 frequent ones
    tenth-hidden   tenth trained with the hidden-state loss as well (training.loss.hidden)

and, by name with --only: prune (12 layers, hidden 384, MLP 1024, 6 heads, full vocabulary),
prune-vocab (prune with the trimmed vocabulary), drop6-hidden, prune-hidden.

Students that need a training setting the others lack (the hidden-state loss) train in their own
run. A kind whose spec field or trainer part is missing is listed as skipped, naming it.

Per model: parameters and size ratio to the teacher; batch-1 greedy latency per answer, each
model answering from its own context (the teacher its instruction, a student what it was trained
on), median over --speed-prompts test rows, and the teacher/student ratio of it (per seed, the
teacher and that seed's students are loaded together and answer prompt by prompt in rotating
order, so a shared machine's load falls on all alike; the teacher's time pools its seeds);
accuracy against gold with its 95% Wilson interval, and retention (student accuracy / teacher
accuracy on the same rows) with its 95% paired bootstrap interval, both from the eval report.
With several seeds: the mean over seeds, the 95% interval averaged over seeds (what sampling the
rows leaves open) and the min-max over seeds (what training noise moves). The full figures, per
seed too, go to a JSON file (path printed); --show FILE prints an earlier run's tables again.
--quick: one seed, at most 30 training steps, 16 calibration sequences: a smoke run.

Cost on 2 shared cores (SYLLABUS_THREADS=1): --quick about 10-17 minutes per spec (curation
2-3 minutes the first time); the language spec with 3 seeds about 2 hours.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

import store  # noqa: E402
from engine.curate import pipeline  # noqa: E402
from engine.models import chat_prompt_ids, load_causal_lm, set_threads  # noqa: E402
from engine.spec import FromTeacher, Loss, Spec, Student, load_spec  # noqa: E402
from engine.train import runs  # noqa: E402
from engine.train.data import student_texts  # noqa: E402

DEFAULT_SPECS = ["specs/demo.yaml", "specs/bench/language.yaml"]
PRUNE = {"keep_layers": 12, "hidden_size": 384, "intermediate_size": 1024, "heads": 6}
TENTH = {"keep_layers": 6, "hidden_size": 384, "intermediate_size": 1024, "heads": 6, "kv_heads": 2,
         "vocab": {"keep_frequent": 2000}}
HIDDEN_LOSS = {"weight": 1.0, "distance": "cosine"}  # every student layer mapped, last onto last
QUICK_STEPS, QUICK_CALIBRATION = 30, 16


@dataclass
class Kind:
    """One row of the table: a student (as a spec writes it) and the training settings it needs."""
    name: str
    what: str
    student: dict
    loss: dict = field(default_factory=dict)  # training.loss fields this kind adds (its own training run)

    def missing(self) -> str | None:
        """Why this kind cannot be built with the engine as it is, or None."""
        ft = self.student.get("from_teacher") or {}
        if "vocab" in ft:
            if "vocab" not in FromTeacher.model_fields:
                return "needs from_teacher.vocab (engine/spec.py FromTeacher has no `vocab` field yet)"
            if importlib.util.find_spec("engine.train.vocab") is None:
                return "needs from_teacher.vocab, which the trainer does not build yet (no engine/train/vocab.py)"
        if "hidden" in self.loss:
            if "hidden" not in Loss.model_fields:
                return "needs training.loss.hidden (engine/spec.py Loss has no `hidden` field yet)"
            if importlib.util.find_spec("engine.train.hidden") is None:
                return "needs training.loss.hidden, which the trainer does not apply yet (no engine/train/hidden.py)"
        return None


KINDS = [
    Kind("scratch", "config: fresh, like the demo's tiny",
         {"config": {"hidden_size": 192, "num_layers": 4, "num_heads": 4, "intermediate_size": 512}}),
    Kind("drop6", "from_teacher: layers 0,6,12,18,24,29", {"from_teacher": {"layers": [0, 6, 12, 18, 24, 29]}}),
    Kind("tenth", "from_teacher: keep 6 layers, width 384/1024/6 heads/2 kv, vocab keep_frequent 2000",
         {"from_teacher": TENTH}),
    Kind("tenth-hidden", "tenth + hidden-state loss (cosine, weight 1)", {"from_teacher": TENTH},
         loss={"hidden": HIDDEN_LOSS}),
]
EXTRA_KINDS = [  # by name with --only
    Kind("prune", "from_teacher: keep 12 layers, width 384/1024/6 heads", {"from_teacher": dict(PRUNE)}),
    Kind("prune-vocab", "prune + vocab keep_frequent 2000",
         {"from_teacher": {**PRUNE, "vocab": {"keep_frequent": 2000}}}),
    Kind("drop6-hidden", "drop6 + hidden-state loss (cosine, weight 1)",
         {"from_teacher": {"layers": [0, 6, 12, 18, 24, 29]}}, loss={"hidden": HIDDEN_LOSS}),
    Kind("prune-hidden", "prune + hidden-state loss (cosine, weight 1)", {"from_teacher": dict(PRUNE)},
         loss={"hidden": HIDDEN_LOSS}),
]


# --- specs ---------------------------------------------------------------------------------


def group_specs(spec: Spec, kinds: list[Kind], quick: bool) -> list[tuple[Spec, list[Kind]]]:
    """The spec with the bench's students patched in: one spec per distinct training setting."""
    groups: dict[str, list[Kind]] = {}
    for kind in kinds:
        groups.setdefault(json.dumps(kind.loss, sort_keys=True), []).append(kind)
    out = []
    for key, members in groups.items():
        students = []
        for kind in members:
            body = json.loads(json.dumps(kind.student))
            if quick and "from_teacher" in body:
                body["from_teacher"]["calibration"] = QUICK_CALIBRATION
            students.append(Student.model_validate({"name": kind.name, **body}))
        loss = spec.training.loss.model_validate({**spec.training.loss.model_dump(exclude_unset=True),
                                                  **json.loads(key)})
        update = {"loss": loss, "seeds": None}
        if quick:
            update["max_steps"] = QUICK_STEPS
        training = spec.training.model_copy(update=update)
        out.append((spec.model_copy(update={"students": students, "training": training}), members))
    return out


# --- latency -------------------------------------------------------------------------------


@torch.inference_mode()
def answer_latency(models: list[tuple[str, str, list[str]]], max_new: int) -> dict[str, dict]:
    """Batch-1 greedy answers, per model: ms per answer and tokens per answer.

    models: (key, model name or folder, texts: what that model reads). All are loaded first; then
    for each prompt index every model answers in turn, the order rotating, so that the load of a
    shared machine falls on all of them alike.
    """
    loaded = []
    for key, name, texts in models:
        model, tokenizer = load_causal_lm(name)
        eos = model.generation_config.eos_token_id
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=eos if eos is not None else tokenizer.eos_token_id)
        prompts = [chat_prompt_ids(tokenizer, t) for t in texts]
        _generate(model, prompts[0], config)  # warm-up
        loaded.append((key, model, config, prompts))
    out = {key: {"ms": [], "tokens": [], "prompt_tokens": [len(p) for p in prompts]}
           for key, _, _, prompts in loaded}
    for i in range(min(len(p) for *_, p in loaded)):
        turn = i % len(loaded)
        for key, model, config, prompts in loaded[turn:] + loaded[:turn]:
            start = time.perf_counter()
            n_new = _generate(model, prompts[i], config)
            out[key]["ms"].append(1000 * (time.perf_counter() - start))
            out[key]["tokens"].append(n_new)
    return out


def _generate(model, ids: list[int], config) -> int:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         generation_config=config)
    return out.shape[1] - len(ids)


# --- one spec -----------------------------------------------------------------------------


def bench_spec(path: str, kinds: list[Kind], seeds: list[int], args, st, console: Console) -> dict:
    began = time.perf_counter()
    spec = load_spec(Path(path))
    result = {"spec": path, "dataset": None, "seeds": seeds, "quick": args.quick, "skipped": [], "groups": [],
              "timings_s": {}}
    chosen = []
    for kind in kinds:
        why = kind.missing()
        if why:
            result["skipped"].append({"name": kind.name, "what": kind.what, "reason": why})
            console.print(f"[yellow]skip[/] {kind.name}: {why}", highlight=False)
        else:
            chosen.append(kind)

    start = time.perf_counter()
    run = pipeline.run(spec, st, progress=args.progress, console=Console(stderr=True, quiet=not args.progress))
    dataset = f"{spec.name}@{run.version}"
    result["dataset"] = dataset
    result["curation"] = {"rows": run.rows, "teacher_calls": run.teacher_calls, "created": run.created}
    result["timings_s"]["curate"] = time.perf_counter() - start
    console.print(f"{path}: {dataset}, {run.rows} examples, {run.teacher_calls} teacher calls "
                  f"({result['timings_s']['curate']:.0f} s)", highlight=False)

    examples = st.read(dataset, "examples")
    rows = examples.filter(examples["split"] == spec.eval.split).head(args.speed_prompts)
    max_new = spec.eval.max_new_tokens or spec.teacher.generation.max_new_tokens

    reports, timed = [], []
    for group_spec, members in group_specs(spec, chosen, args.quick):
        names = ", ".join(k.name for k in members)
        start = time.perf_counter()
        trained = runs.train_seeds(group_spec, st, dataset, seeds, progress=args.progress)
        train_s = time.perf_counter() - start
        console.print(f"  trained {names} x {len(seeds)} seed(s) in {train_s:.0f} s"
                      + ("" if any(r.created for _, r in trained) else " (reused from the store)"), highlight=False)
        start = time.perf_counter()
        report, report_path = runs.evaluate(group_spec, st, dataset, seeds=seeds, progress=args.progress)
        eval_s = time.perf_counter() - start
        console.print(f"  evaluated in {eval_s:.0f} s: {report_path}", highlight=False)
        texts = student_texts(rows, group_spec.training.student_prompt)
        timed += [(seed, (kind.name, str(r.run_dir / kind.name), texts)) for seed, r in trained for kind in members]
        result["groups"].append({"students": [k.name for k in members], "loss": members[0].loss,
                                 "runs": {str(seed): r.run_id for seed, r in trained}, "eval_json": str(report_path),
                                 "train_s": train_s, "eval_s": eval_s})
        reports.append((members, report))

    # Latency: per seed, the teacher and that seed's students, interleaved prompt by prompt.
    start = time.perf_counter()
    teacher = ("teacher", spec.teacher.model, rows["teacher_prompt"].to_list())
    latency = {}
    for seed in seeds:
        measured = answer_latency([teacher] + [m for s, m in timed if s == seed], max_new)
        latency.update({(key, seed): figures for key, figures in measured.items()})
    result["timings_s"]["latency"] = time.perf_counter() - start

    result["sets"] = summarise(spec, reports, latency)
    result["timings_s"]["total"] = time.perf_counter() - began
    return result


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _figure(rows: list[dict], key: str, ci_key: str) -> dict:
    """Mean over seeds, the 95% interval averaged over seeds, min-max and sd over seeds, per seed."""
    values = [r.get(key) for r in rows]
    cis = [r.get(ci_key) for r in rows if r.get(ci_key)]
    present = [v for v in values if v is not None]
    return {"mean": _mean(values),
            "ci": [_mean(c[0] for c in cis), _mean(c[1] for c in cis)] if cis else None,
            "min": min(present) if present else None, "max": max(present) if present else None,
            "sd": statistics.stdev(present) if len(present) > 1 else None,
            "per_seed": {str(r.get("seed")): {"value": r.get(key), "ci": r.get(ci_key)} for r in rows}}


def summarise(spec: Spec, reports: list, latency: dict) -> list[dict]:
    """Per eval set: the teacher and one entry per student kind, from every group's report.

    latency: {(model key, seed): answer_latency figures}; the teacher's are pooled over seeds."""
    teacher_ms = statistics.median(ms for (key, _), lat in latency.items() if key == "teacher" for ms in lat["ms"])
    teacher_tokens = statistics.median(n for (key, _), lat in latency.items() if key == "teacher" for n in lat["tokens"])
    sets: dict[str, dict] = {}
    for members, report in reports:
        for entry in report["sets"]:
            out = sets.get(entry["name"])
            teacher = next(r for r in entry["models"] if r["kind"] == "teacher")
            if out is None:
                out = sets[entry["name"]] = {
                    "name": entry["name"], "description": entry["description"], "rows": entry["rows"],
                    "baseline": entry["baseline"],
                    "teacher": {"name": teacher["name"], "params": teacher["params"], "n": teacher["n"],
                                "accuracy": teacher["accuracy"], "accuracy_ci": teacher["accuracy_ci"],
                                "ms_per_answer": teacher_ms, "tokens_per_answer": teacher_tokens,
                                "latency_per_seed": {str(seed): lat for (key, seed), lat in latency.items()
                                                     if key == "teacher"},
                                "decode_tok_s": teacher["decode_tok_s"]},
                    "students": []}
            for kind in members:
                rows = [r for r in entry["models"] if r["name"] == kind.name]
                ms = [v for (name, _), lat in latency.items() if name == kind.name for v in lat["ms"]]
                tokens = [v for (name, _), lat in latency.items() if name == kind.name for v in lat["tokens"]]
                student_ms = statistics.median(ms)
                out["students"].append({
                    "name": kind.name, "what": kind.what, "student": kind.student, "loss": kind.loss,
                    "params": rows[0]["params"], "size_ratio": rows[0]["params"] / teacher["params"],
                    "disk_bytes": rows[0]["disk_bytes"], "ms_per_answer": student_ms,
                    "tokens_per_answer": statistics.median(tokens), "speed_ratio": teacher_ms / student_ms,
                    "latency_per_seed": {str(seed): lat for (name, seed), lat in latency.items() if name == kind.name},
                    "decode_tok_s": _mean(r["decode_tok_s"] for r in rows), "n": rows[0]["n"],
                    "accuracy": _figure(rows, "accuracy", "accuracy_ci"),
                    "retention": _figure(rows, "retention", "retention_ci"),
                    "agreement": _figure(rows, "agreement", "agreement_ci"),
                    "token_kl": _mean(r["token_kl"] for r in rows),
                    "one_answer_seeds": [r.get("seed") for r in rows if r.get("one_answer")],
                })
    order = {k.name: i for i, k in enumerate(KINDS)}
    for out in sets.values():
        out["students"].sort(key=lambda s: order.get(s["name"], len(order)))
    return list(sets.values())


# --- printing --------------------------------------------------------------------------------


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "" if not ci or ci[0] is None else f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]"


def _spread(fig: dict) -> str:
    if fig["sd"] is None:
        return "–"
    return f"{100 * fig['min']:.1f}–{100 * fig['max']:.1f}"


def table(result: dict, entry: dict) -> Table:
    base = entry["baseline"]
    seeds = len(result["seeds"])
    title = (f"{result['spec']} ({result['dataset']}): {entry['name']}, n={entry['teacher']['n']}"
             + (f", majority baseline {_pct(base['accuracy'])}" if base else "")
             + (f", {seeds} seeds: mean [95% CI averaged over seeds]" if seeds > 1 else ""))
    t = Table(title=title, title_justify="left")
    for column in ("model", "params", "size", "ms/answer", "tokens", "speed", "accuracy [95% CI]", "over seeds",
                   "retention [95% CI]", "over seeds"):
        t.add_column(column, justify="left" if column == "model" else "right")
    te = entry["teacher"]
    t.add_row("teacher", f"{te['params'] / 1e6:.1f}M", "1.00x", f"{te['ms_per_answer']:.0f}",
              f"{te['tokens_per_answer']:.0f}", "1.00x", _pct(te["accuracy"]) + _ci(te["accuracy_ci"]), "–", "100%", "–")
    for s in entry["students"]:
        flag = " ⚠" if s["one_answer_seeds"] else ""
        t.add_row(s["name"] + flag, f"{s['params'] / 1e6:.1f}M", f"{s['size_ratio']:.2f}x", f"{s['ms_per_answer']:.0f}",
                  f"{s['tokens_per_answer']:.0f}", f"{s['speed_ratio']:.2f}x",
                  _pct(s["accuracy"]["mean"]) + _ci(s["accuracy"]["ci"]), _spread(s["accuracy"]),
                  _pct(s["retention"]["mean"]) + _ci(s["retention"]["ci"]), _spread(s["retention"]))
    for skip in result["skipped"]:
        t.add_row(f"{skip['name']} (skipped)", *["–"] * 9)
    return t


def print_results(console: Console, results: list[dict], speed_prompts: int) -> None:
    for result in results:
        for entry in result["sets"]:
            console.print(table(result, entry))
        for skip in result["skipped"]:
            console.print(f"skipped {skip['name']} ({skip['what']}): {skip['reason']}", highlight=False)
        t = result["timings_s"]
        groups = "; ".join(f"{'+'.join(g['students'])}: train {g['train_s']:.0f} s, eval {g['eval_s']:.0f} s"
                           for g in result["groups"])
        console.print(f"{result['spec']}: curate {t['curate']:.0f} s; {groups}; latency {t.get('latency', 0):.0f} s; "
                      f"total {t['total']:.0f} s",
                      style="dim", highlight=False)
    console.print("size: parameters / the teacher's; ms/answer: median batch-1 greedy answer on "
                  f"{speed_prompts} test rows, each model from its own context; tokens: median answer length; "
                  "speed: teacher ms / student ms; retention: student / teacher accuracy on the same rows "
                  "(95% paired bootstrap); ⚠: one answer to >= 90% of rows in some seed", style="dim", highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", action="append", help="spec to bench (repeatable; default: "
                        + " and ".join(DEFAULT_SPECS) + ")")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: seed 0 only, at most {QUICK_STEPS} "
                        f"training steps, {QUICK_CALIBRATION} calibration sequences")
    parser.add_argument("--only", help="student kinds to run, comma-separated (default: "
                        + ", ".join(k.name for k in KINDS) + "; also "
                        + ", ".join(k.name for k in EXTRA_KINDS) + ")")
    parser.add_argument("--store", type=Path, default=Path("out/bench-store"),
                        help="store the bench curates and trains into; cached across runs (default out/bench-store)")
    parser.add_argument("--fresh", action="store_true", help="use a new temporary store: every cost is paid again")
    parser.add_argument("--speed-prompts", type=int, default=16, help="test rows timed per model (default 16)")
    parser.add_argument("--out", type=Path, help="JSON file of every figure (default out/bench/students-<time>.json)")
    parser.add_argument("--progress", action="store_true", help="show the engine's progress bars")
    parser.add_argument("--show", type=Path, help="print the tables of an earlier run's JSON file, run nothing")
    args = parser.parse_args()
    console = Console()
    if not console.is_terminal:  # piped or redirected: rich would wrap the tables at 80 columns
        console = Console(width=200)
    if args.show:
        saved = json.loads(args.show.read_text())
        print_results(console, saved["specs"], saved["speed_prompts"])
        return
    seeds = [0] if args.quick else list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    kinds = KINDS if not args.only else [k for k in KINDS + EXTRA_KINDS if k.name in args.only.split(",")]
    threads = set_threads()
    console.print(f"{threads} torch thread(s); seeds {','.join(map(str, seeds))}{' (quick)' if args.quick else ''}; "
                  f"students {', '.join(k.name for k in kinds)}", highlight=False)

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        st = store.open(Path(tmp) / "store" if args.fresh else args.store)
        results = [bench_spec(path, kinds, seeds, args, st, console) for path in (args.spec or DEFAULT_SPECS)]
    wall = time.perf_counter() - began

    print_results(console, results, args.speed_prompts)
    out = args.out or Path("out/bench") / f"students-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": threads, "seeds": seeds, "quick": args.quick, "wall_s": wall,
                               "speed_prompts": args.speed_prompts,
                               "specs": results}, indent=2, default=str))
    console.print(f"wall {wall:.0f} s; figures written to {out}", highlight=False)


if __name__ == "__main__":
    main()
