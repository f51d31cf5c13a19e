"""Teacher vs students on sets the teacher's confidence never chose: size, speed, accuracy, agreement, KL.

Two kinds of set are scored, each reported on its own:

- the eval split of the dataset version (spec.eval.split, `test` by default). It is drawn
  right after dedup, before the teacher answers (engine.stages.split), and mining and
  selection pass it through untouched. The teacher's answers are the stored ones.
- each of eval.sources: labelled rows read as written (never deduplicated, mined or
  selected). The teacher answers them through its prompt and the request cache
  (engine.stages.teach.ask_teacher), so each prompt is asked once, ever.

Students answer greedily from the context they were trained on (training.student_prompt, in
training.student_chat/system/messages: engine.train.data.student_conversations), the teacher's
token KL is taken in its own context (teacher.prompt in teacher.chat/system/messages).

Every accuracy carries n and a 95% Wilson score interval, beside the majority-class baseline
(the most frequent gold label's share on the same rows), per-category accuracy, a confusion
table (gold x answer, "no answer" for a reply naming no label) and the most frequent answer,
so a model answering one label to nearly everything shows as such. Retention (student
accuracy / teacher accuracy on the same rows) carries a 95% paired-bootstrap interval:
BOOTSTRAP_RESAMPLES resamples of the rows, seed BOOTSTRAP_SEED, 2.5th and 97.5th percentiles.
With several training seeds, each student is summarised by the mean and the min–max over them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from transformers import GenerationConfig

from engine.errors import TrainError
from engine.models import load_causal_lm, resolve_causal_lm, set_threads
from engine.prompts import prompt_ids
# The statistics of answers against gold live in engine.scoring (light: `syllabus run` uses them too).
from engine.scoring import (NO_ANSWER, ONE_ANSWER_SHARE, Z95, accuracy, majority_baseline,  # noqa: F401
                            score, shown_answer, wilson)
from engine.spec import Spec, SpecError
from engine.teachers.answers import normalise_answer, split_answer
from engine.train.data import collate, encode, response_logits, student_conversations
from engine.train.device import resolve_device, to_device
from engine.train.losses import token_kl

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
METHODS = {
    "interval": "95% Wilson score interval",
    "retention_interval": f"95% paired bootstrap over rows ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}, "
                          "2.5th-97.5th percentiles)",
    "baseline": "majority class: the most frequent gold label's share of the same rows",
    "spread": "min-max over training seeds (sd beside it)",
    "one_answer": f"a model whose most frequent answer covers at least {ONE_ANSWER_SHARE:.0%} of the rows",
    "token_kl": "mean over response tokens of KL(teacher's stored top-k + tail bucket at T=1 || model), "
                "teacher-forced; none on sampled targets (teacher.logprobs.mode: sampled), whose counts would "
                "bias it upward by H(p) - E[H(q)], nor for a trimmed vocabulary",
}


# --- statistics -------------------------------------------------------------------------


def retention_interval(student: np.ndarray, teacher: np.ndarray, *, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> list[float] | None:
    """95% paired bootstrap interval of mean(student) / mean(teacher) over rows (0/1 correctness each).

    Rows are resampled with replacement, the same rows for both; resamples where the teacher
    gets nothing right have no ratio and are left out.
    """
    student, teacher = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    n = len(student)
    if n == 0 or teacher.sum() == 0:
        return None
    rng = np.random.default_rng(seed)
    ratios = []
    chunk = max(1, min(resamples, 2_000_000 // n))  # bounded memory for large sets
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        s, t = student[idx].mean(axis=1), teacher[idx].mean(axis=1)
        ratios.append(s[t > 0] / t[t > 0])
    ratios = np.concatenate(ratios)
    if not ratios.size:
        return None
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def summarise_seeds(rows: list[dict]) -> list[dict]:
    """Per student trained with several seeds: mean, min, max and sd of each figure over its seeds."""
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] != "teacher" and r.get("seed") is not None:
            by_name.setdefault(r["name"], []).append(r)
    out = []
    for name, runs in by_name.items():
        if len(runs) < 2:
            continue
        entry = {"name": name, "kind": runs[0]["kind"], "seeds": [r["seed"] for r in runs],
                 "params": runs[0]["params"], "disk_bytes": runs[0]["disk_bytes"],
                 "decode_tok_s": float(np.mean([r["decode_tok_s"] for r in runs])), "n": runs[0]["n"]}
        for key in ("accuracy", "agreement", "retention", "token_kl"):
            values = [r[key] for r in runs if r.get(key) is not None]
            entry[key] = ({"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values)),
                           "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
                          if values else None)
        worst = max(runs, key=lambda r: r["top_answer"]["share"] or 0)
        entry["top_answer"] = {**worst["top_answer"], "seed": worst["seed"]}
        entry["one_answer_seeds"] = [r["seed"] for r in runs if r["one_answer"]]
        out.append(entry)
    return out


# --- the sets ---------------------------------------------------------------------------


@dataclass
class EvalSet:
    name: str  # "test split", "eval.sources[0] (reviews.jsonl)"
    kind: str  # "split" | "source"
    description: str
    rows: pl.DataFrame  # teacher_prompt, answer, label, category, token_ids, topk_ids, topk_logprobs, ...
    labels: set[str] = field(default_factory=set)  # gold labels answers are mapped onto


@dataclass
class StudentRun:
    name: str
    folder: Path
    seed: int | None = None


def split_set(spec: Spec, examples: pl.DataFrame, described: str = "") -> EvalSet | None:
    """The dataset's eval split as a set, or None when it has no rows."""
    rows = examples.filter(pl.col("split") == spec.eval.split)
    if rows.is_empty():
        return None
    labels = set(examples["label"].drop_nulls().to_list()) if "label" in examples.columns else set()
    name = f"{spec.eval.split} split"
    return EvalSet(name, "split", described or name, rows, labels)


def source_sets(spec: Spec, ctx) -> list[EvalSet]:
    """Each of eval.sources read as written, the teacher's answers attached (asked through the request cache)."""
    from engine.stages.sources import ROW_SCHEMA, check_bad_rows, read_source
    from engine.stages.teach import Teach, ask_teacher, render_teacher_prompts

    sets = []
    for index, src in enumerate(spec.eval.sources):
        path = spec.resolve_path(src.path) if src.path is not None else None
        read = read_source(src, path=path, store=ctx.store, index=index)
        check_bad_rows(src, read)
        frame = pl.DataFrame(read.rows, schema=ROW_SCHEMA)  # every row, duplicates included: nothing is curated
        prompts, problems = render_teacher_prompts(frame, spec)
        for pid, problem in zip(frame["prompt_id"], problems):
            if problem:
                raise TrainError(f"eval.sources[{index}]: row {pid[:12]}: {problem}")
        name = f"eval.sources[{index}] ({src.origin})"
        outputs, _ = ask_teacher(ctx, prompts, f"eval {name}")
        rows = Teach._attach(frame, prompts, outputs, spec)
        labels = set(rows["label"].drop_nulls().to_list())
        sets.append(EvalSet(name, "source", f"{name}: {rows.height} rows as written (not deduplicated, mined or "
                                                 "selected)", rows, labels))
    ctx.teacher = None  # the generation backend is done; students come next
    return sets


# --- evaluation ---------------------------------------------------------------------------


def evaluate(spec: Spec, examples: pl.DataFrame, student_dirs: dict[str, Path], *, progress: bool = True) -> list[dict]:
    """One row per model, the teacher first, on the rows of split spec.eval.split."""
    found = split_set(spec, examples)
    if found is None:
        raise SpecError(f"{spec.path or '<spec>'}: eval.split: no rows in split {spec.eval.split!r}")
    students = [StudentRun(name, Path(folder)) for name, folder in student_dirs.items()]
    return evaluate_sets(spec, [found], students, progress=progress)[0]["models"]


def evaluate_sets(spec: Spec, sets: list[EvalSet], students: list[StudentRun], *, progress: bool = True) -> list[dict]:
    """Each set's report: its rows, majority baseline, one row per model (teacher first) and per-seed summaries."""
    if not sets:
        raise SpecError(f"{spec.path or '<spec>'}: eval: nothing to evaluate on "
                        f"(no rows in split {spec.eval.split!r} and no eval.sources)")
    set_threads()
    device = resolve_device(spec.training.device, str(spec.path or "<spec>"))
    marker = spec.teacher.reasoning.answer_marker if spec.teacher.reasoning else None
    max_new = spec.eval.max_new_tokens or spec.teacher.generation.max_new_tokens
    batch = spec.teacher.batch_size
    kinds = {s.name: s.kind for s in spec.students}
    first = sets[0].rows
    n_speed = min(spec.eval.speed_prompts, first.height)

    golds = [s.rows["label"].to_list() if "label" in s.rows.columns else [None] * s.rows.height for s in sets]
    categories = [s.rows["category"].to_list() if "category" in s.rows.columns else [None] * s.rows.height
                  for s in sets]
    teacher_answers = [[normalise_answer(a or "", s.labels) for a in s.rows["answer"].to_list()] for s in sets]
    reports = [{"name": s.name, "kind": s.kind, "description": s.description, "rows": s.rows.height,
                "baseline": majority_baseline(g, s.labels), "models": []} for s, g in zip(sets, golds)]
    # What each side reads (engine.prompts): the teacher its stored prompt in teacher.chat/system/messages,
    # the students theirs in training.student_*, exactly as teaching and training built them.
    from engine.stages.teach import teacher_contexts

    teacher_reads = [teacher_contexts(s.rows, spec) for s in sets]
    sampled = spec.teacher.logprobs.mode == "sampled"  # no token KL from draws' counts (METHODS)
    student_reads = [student_conversations(_as_examples(s.rows), spec) for s in sets]

    batches = sum(-(-s.rows.height // batch) for s in sets)
    steps = (batches + n_speed) + len(students) * (2 * batches + n_speed)
    with Progress(TextColumn("[bold]eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                  disable=not progress) as bar:
        task = bar.add_task(spec.teacher.model, total=steps)
        tick = lambda: bar.advance(task)  # noqa: E731

        teacher, tokenizer = load_causal_lm(spec.teacher.model)
        teacher.to(device)  # training.device, as the students trained (float32 here, no autocast)
        # Every model is timed on the same ids: the teacher's context of the first set's first rows.
        speed_ids = [prompt_ids(tokenizer, c) for c in teacher_reads[0][:n_speed]]
        size = {"params": count_params(teacher), "disk_bytes": weights_bytes(resolve_causal_lm(spec.teacher.model)),
                "decode_tok_s": decode_speed(teacher, tokenizer, speed_ids, spec.eval.speed_tokens, tick)}
        teacher_scores = []
        for s, report, gold, cats, answers, reads in zip(sets, reports, golds, categories, teacher_answers,
                                                         teacher_reads):
            scores = score(answers, gold, cats, s.labels)
            teacher_scores.append(scores)
            if sampled:
                kl = skip_token_kl(s.rows, batch, tick)
            else:
                kl = mean_token_kl(teacher, tokenizer, s.rows, reads, batch, tick)
            report["models"].append(_row(spec.teacher.model, "teacher", None, s, size, scores, kl, report["baseline"],
                                         retention=1.0 if scores["accuracy"] else None, retention_ci=None))
        del teacher

        for run in students:
            bar.update(task, description=run.name if run.seed is None else f"{run.name} (seed {run.seed})")
            model, tok = load_causal_lm(str(run.folder))  # with the tokenizer saved beside it
            model.to(device)
            # A trimmed vocabulary (from_teacher vocab:) has a tokenizer of its own: it reads the same
            # texts as its own ids, for speed as for answers.
            trimmed = tok.get_vocab() != tokenizer.get_vocab()
            ids = [prompt_ids(tok, c) for c in teacher_reads[0][:n_speed]] if trimmed else speed_ids
            size = {"params": count_params(model), "disk_bytes": weights_bytes(Path(run.folder)),
                    "decode_tok_s": decode_speed(model, tok, ids, spec.eval.speed_tokens, tick)}
            for s, report, gold, cats, reference, t_scores, texts in zip(sets, reports, golds, categories,
                                                                         teacher_answers, teacher_scores,
                                                                         student_reads):
                prompts = [prompt_ids(tok, t) for t in texts]
                answers = [normalise_answer(split_answer(r, marker)[1], s.labels)
                           for r in generate_texts(model, tok, prompts, max_new, batch, tick)]
                scores = score(answers, gold, cats, s.labels, reference)
                acc, t_acc = scores["accuracy"], t_scores["accuracy"]
                retention = acc / t_acc if acc is not None and t_acc else None
                ci = retention_interval(np.array(scores["correct_rows"]), np.array(t_scores["correct_rows"]))
                if trimmed or sampled:
                    # Token KL is skipped (None) on sampled targets (METHODS) and for a trimmed vocabulary:
                    # the stored responses may hold ids it lacks (the eval rows were not in the vocabulary's
                    # choice), and folding the top-k ids it lacks into the tail gives a coarser KL, not
                    # comparable with the other rows'.
                    kl = skip_token_kl(s.rows, batch, tick)
                else:
                    kl = mean_token_kl(model, tok, s.rows, texts, batch, tick)
                report["models"].append(_row(run.name, kinds.get(run.name, "student"), run.seed, s, size, scores, kl,
                                             report["baseline"], retention=retention, retention_ci=ci))
            del model
    for report in reports:
        for row in report["models"]:
            # Saved compactly, one character per labelled row in the set's order: paired comparisons of
            # two runs on the same rows (bench/quality.py) need each row's outcome, not only the counts.
            row["correct_by_row"] = "".join("1" if c else "0" for c in row.pop("correct_rows", []))
        report["seeds"] = summarise_seeds(report["models"])
    return reports


def _row(name: str, kind: str, seed: int | None, s: EvalSet, size: dict, scores: dict, kl: float | None,
         baseline: dict | None, *, retention: float | None, retention_ci: list[float] | None) -> dict:
    return {"name": name, "kind": kind, "seed": seed, "set": s.name, "examples": s.rows.height, **size, **scores,
            "baseline": baseline, "token_kl": kl, "retention": retention, "retention_ci": retention_ci}


# Columns a student template may name (engine.templates.EXAMPLE_VARIABLES) that an eval source lacks.
_EXAMPLE_EXTRAS = {"cluster": pl.Int32, "split": pl.String, "conf_mean_token_prob": pl.Float64,
                   "conf_min_token_prob": pl.Float64, "conf_answer_prob": pl.Float64, "conf_margin": pl.Float64,
                   "conf_entropy": pl.Float64, "options": pl.List(pl.String), "option_probs": pl.List(pl.Float64),
                   "conf_option_answer_prob": pl.Float64, "conf_option_margin": pl.Float64,
                   "conf_option_entropy": pl.Float64}


def _as_examples(rows: pl.DataFrame) -> pl.DataFrame:
    missing = {c: t for c, t in _EXAMPLE_EXTRAS.items() if c not in rows.columns}
    return rows.with_columns(pl.lit(None, t).alias(c) for c, t in missing.items()) if missing else rows


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix in WEIGHT_SUFFIXES)


def _greedy(model, tokenizer, n_new: int, *, exactly: bool) -> GenerationConfig:
    eos = model.generation_config.eos_token_id
    return GenerationConfig(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new if exactly else 0,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos if eos is not None else tokenizer.eos_token_id)


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: list[list[int]], max_new: int, batch: int, tick=lambda: None) -> list[str]:
    """Greedy replies, batched with left padding, cut at the first end-of-sequence token."""
    config = _greedy(model, tokenizer, max_new, exactly=False)
    stops = set(np.atleast_1d(config.eos_token_id).tolist())
    texts = []
    for start in range(0, len(prompts), batch):
        padded = tokenizer.pad({"input_ids": prompts[start : start + batch]}, padding=True,
                               return_tensors="pt").to(model.device)
        out = model.generate(**padded, generation_config=config)
        for row in out[:, padded["input_ids"].shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
        tick()
    return texts


@torch.inference_mode()
def decode_speed(model, tokenizer, prompts: list[list[int]], n_tokens: int, tick=lambda: None) -> float:
    """Median batch-1 greedy tokens/s over the prompts, each decoding exactly n_tokens."""
    config = _greedy(model, tokenizer, n_tokens, exactly=True)
    model.generate(torch.tensor([prompts[0]], device=model.device),
                   generation_config=_greedy(model, tokenizer, 2, exactly=True))  # warm-up
    rates = []
    for ids in prompts:
        start = time.perf_counter()
        model.generate(torch.tensor([ids], device=model.device),
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                       generation_config=config)
        rates.append(n_tokens / (time.perf_counter() - start))
        tick()
    return float(np.median(rates))


def skip_token_kl(rows: pl.DataFrame, batch: int, tick=lambda: None) -> None:
    """No token KL for these rows: advance the progress bar by the batches mean_token_kl would have run."""
    for _ in range(-(-rows.height // batch)):
        tick()


@torch.inference_mode()
def mean_token_kl(model, tokenizer, rows: pl.DataFrame, texts: list[str], batch: int, tick=lambda: None) -> float | None:
    """Mean over response tokens of KL(teacher top-k + tail at T=1 || model), teacher-forced."""
    encoded = encode(rows, tokenizer, texts)
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch):
        b = to_device(collate(encoded[start : start + batch], tokenizer.pad_token_id), model.device)
        kl = token_kl(response_logits(model, b), b["topk_ids"], b["topk_logprobs"], temperature=1.0)
        total, count = total + kl.sum().item(), count + kl.numel()
        tick()
    return total / count if count else None


# --- printing -------------------------------------------------------------------------------


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _interval(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]"


def _spread(entry: dict | None, percent: bool = True) -> str:
    if not entry:
        return "–"
    f = (lambda x: f"{100 * x:.1f}") if percent else (lambda x: f"{x:.4f}")
    return f"{f(entry['mean'])}{'%' if percent else ''} ({f(entry['min'])}–{f(entry['max'])})"


def _top(top: dict, flagged: bool) -> str:
    if not top or top.get("answer") is None:
        return "–"
    return f"{top['answer']} {_share(top['share'])}" + (" ⚠" if flagged else "")


def _model_name(name: str) -> str:
    return Path(name).name or name  # a teacher given as a path shows its folder name


def format_table(rows: list[dict], title: str = "teacher vs students", seeds: list[dict] | None = None) -> Table:
    """Models of one set. With per-seed summaries, each summarised student is one row of
    mean (min–max over seeds) in place of its per-seed rows."""
    summarised = {s["name"]: s for s in seeds or []}
    table = Table(title=title)
    columns = ("model", "kind", "params", "disk", "decode tok/s", "n", "accuracy [95% CI]", "agreement", "token KL",
               "retention [95% CI]", "top answer")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "kind", "top answer") else "right")
    shown = set()
    for r in rows:
        if r["name"] in summarised and r["kind"] != "teacher":
            if r["name"] in shown:
                continue
            shown.add(r["name"])
            s = summarised[r["name"]]
            table.add_row(f"{r['name']} ({len(s['seeds'])} seeds)", s["kind"], f"{s['params'] / 1e6:.1f}M",
                          f"{s['disk_bytes'] / 1e6:.1f} MB", f"{s['decode_tok_s']:.1f}", str(s["n"]),
                          _spread(s["accuracy"]), _spread(s["agreement"]), _spread(s["token_kl"], percent=False),
                          _spread(s["retention"]),
                          _top(s["top_answer"], bool(s["one_answer_seeds"])) + f" (seed {s['top_answer']['seed']})")
            continue
        table.add_row(
            _label(r), r["kind"], f"{r['params'] / 1e6:.1f}M", f"{r['disk_bytes'] / 1e6:.1f} MB",
            f"{r['decode_tok_s']:.1f}", str(r.get("n", "–")),
            _share(r["accuracy"]) + _interval(r.get("accuracy_ci")), _share(r["agreement"]),
            "–" if r["token_kl"] is None else f"{r['token_kl']:.4f}",
            _share(r["retention"]) + _interval(r.get("retention_ci")), _top(r.get("top_answer"), r.get("one_answer")),
        )
    return table


def category_table(rows: list[dict]) -> Table | None:
    """Accuracy per category (n) for each model of one set; None when the set has one category or none."""
    names = sorted({c for r in rows for c in r.get("per_category", {})})
    if len(names) < 2:
        return None
    table = Table(title="accuracy per category [95% CI] (n)")
    table.add_column("model")
    for c in names:
        table.add_column(c, justify="right")
    for r in rows:
        cells = []
        for c in names:
            entry = r["per_category"].get(c)
            cells.append("–" if entry is None else f"{_share(entry['accuracy'])}{_interval(entry['ci'])} ({entry['n']})")
        table.add_row(_label(r), *cells)
    return table


def confusion_table(rows: list[dict]) -> Table | None:
    """Gold x answer counts for each model of one set (answers naming no label are `no answer`)."""
    answers = sorted({a for r in rows for row in r.get("confusion", {}).values() for a in row},
                     key=lambda a: (a == NO_ANSWER, a))
    if not answers:
        return None
    table = Table(title="confusion: gold (rows) x answer (columns)")
    table.add_column("model")
    table.add_column("gold")
    for a in answers:
        table.add_column(a, justify="right")
    for r in rows:
        for gold, counts in r["confusion"].items():
            table.add_row(_label(r), gold, *(str(counts.get(a, 0)) for a in answers))
    return table


def _label(r: dict) -> str:
    return _model_name(r["name"]) + (f" (seed {r['seed']})" if r["kind"] != "teacher" and r.get("seed") is not None else "")


def set_heading(report: dict) -> str:
    base = report.get("baseline")
    line = f"{report['description']}"
    if base:
        line += (f"\nmajority baseline: {base['label']} {_share(base['accuracy'])}{_interval(base['ci'])} "
                 f"(n={base['n']})")
    return line


def one_answer_warnings(report: dict) -> list[str]:
    """A line per model that gives one answer to nearly every row of the set."""
    out = []
    for r in report["models"]:
        if r.get("one_answer"):
            top = r["top_answer"]
            gives = "names no label" if top["answer"] == NO_ANSWER else f"answers {top['answer']!r}"
            out.append(f"{_label(r)} {gives} for {_share(top['share'])} of the rows of {report['name']}: "
                       "its accuracy says little beyond the majority baseline")
    return out
