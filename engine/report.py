"""`syllabus report NAME@V`: one self-contained HTML page about a dataset version and its students.

Three steps: gather the figures from the store (the version's rows, rejections and lineage stats; a
training run's metrics.json; its eval.json), draw each chart as inline SVG (engine/report_charts.py),
and render templates/report.html.j2. Nothing is fetched when the page is opened: no
script, font or stylesheet comes from elsewhere. A section without data says why in one line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import yaml

from engine.errors import SpecError, UserError
from engine.report_charts import (SPLITS, augmentation_chart, cluster_chart, coverage_chart, funnel_chart,
                                  histogram_chart, scatter_chart, training_charts)

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "report.html.j2"
HIST_BINS = 20


# ---- gathering ---------------------------------------------------------------------------------


@dataclass
class Section:
    """One part of the page: its figures, its chart(s), or `missing` (why there is nothing to show)."""

    data: object = None
    charts: list[str] = field(default_factory=list)
    missing: str | None = None


def version_spec(info):
    """The spec the version was made from, parsed by today's rules; None when it no longer parses."""
    from engine.spec import parse_spec

    try:
        data = yaml.safe_load(info.spec_text or "")
        path = Path(info.lineage["spec_path"]) if info.lineage.get("spec_path") else None
        return parse_spec(data, path=path, text=info.spec_text or "") if isinstance(data, dict) else None
    except (yaml.YAMLError, SpecError):
        return None


def read_table(st, info, table: str, wanted: list[str]) -> pl.DataFrame | None:
    """The columns of `wanted` the version's table has (None: no such table)."""
    if table not in info.segments:
        return None
    have = set(pl.read_parquet_schema(info.segments[table][0].path)) if info.segments[table] else set()
    return st.read(info, table, columns=[c for c in wanted if c in have] or None)


def coverage(examples: pl.DataFrame, stats: dict, spec) -> list[dict]:
    """Per category: rows per split, and its quota (what selection keeps at most over train and val)."""
    if "category" not in examples.columns:
        return []
    quotas = _quotas(stats, spec)
    frame = examples.with_columns(pl.col("category").fill_null("(none)"))
    rows = []
    for category in sorted(set(frame["category"].to_list()) | set(quotas)):
        mine = frame.filter(pl.col("category") == category)
        counts = {s: mine.filter(pl.col("split") == s).height if "split" in mine.columns else 0 for s in SPLITS}
        if "split" not in mine.columns:
            counts["train"] = mine.height
        rows.append({"category": category, **counts, "total": mine.height, "quota": quotas.get(category)})
    return rows


def _quotas(stats: dict, spec) -> dict[str, int | None]:
    """Quotas as selection recorded them in the lineage, else as the spec's coverage gives them."""
    chosen = (stats.get("select") or {}).get("categories") if isinstance(stats.get("select"), dict) else None
    if isinstance(chosen, dict) and chosen:
        return {name: c.get("quota") for name, c in chosen.items() if isinstance(c, dict)}
    if spec is not None and spec.coverage is not None and spec.coverage.categories:
        from engine.stages.select import quotas

        return {name: q.keep for name, q in quotas(spec.coverage).items()}
    return {}


def stage_order(spec, stats: dict) -> list[str]:
    """The stages the version went through, in the order its spec ran them."""
    from engine.stages import all_stages, stages_for

    names = [s.name for s in stages_for(spec)] if spec is not None else [c.name for c in all_stages()]
    ran = [n for n in names if isinstance(stats.get(n), dict)]
    return ran + sorted(n for n, s in stats.items() if isinstance(s, dict) and "rows_out" in s and n not in ran)


def funnel(stats: dict, rejections: pl.DataFrame | None, order: list[str]) -> list[dict]:
    """Per stage: rows in and out, and its drops by kind of reason (from the rejections table)."""
    from store.inspect import reason_kind

    drops = pl.DataFrame(schema={"stage": pl.String, "kind": pl.String, "example": pl.String, "n": pl.UInt32})
    if rejections is not None and rejections.height:
        drops = (rejections.with_columns(kind=pl.col("reason").map_elements(reason_kind, return_dtype=pl.String))
                 .group_by("stage", "kind").agg(example=pl.col("reason").first(), n=pl.len())
                 .sort(["n", "kind"], descending=[True, False]))
    rows = []
    for name in order:
        stage = stats.get(name) or {}
        mine = drops.filter(pl.col("stage") == name)
        reasons = [{"kind": k, "example": e, "n": int(n)} for k, e, n in mine.select("kind", "example", "n").iter_rows()]
        rows.append({"stage": name, "rows_in": stage.get("rows_in"), "rows_out": stage.get("rows_out"),
                     "dropped": sum(r["n"] for r in reasons), "reasons": reasons})
    return rows


def measure_column(columns: list[str], spec) -> str | None:
    """The confidence column mining decided by; else mean token prob; else any conf_ column."""
    wanted = [f"conf_{spec.mining.confidence}"] if spec is not None and spec.mining is not None else []
    for name in [*wanted, "conf_mean_token_prob", *sorted(c for c in columns if c.startswith("conf_"))]:
        if name in columns:
            return name
    return None


def confidence_histogram(examples: pl.DataFrame, rejections: pl.DataFrame | None, column: str, spec,
                         bins: int = HIST_BINS) -> dict:
    """Kept rows (the version's examples) and rows mining dropped, binned by the teacher's confidence.

    The rejections table keeps no score column: mining writes the score into each reason
    ("conf_mean_token_prob 0.5411 outside band [...]"), which is read back here. Rows dropped later
    (selection's quotas) have no recorded score and are counted apart.
    """
    from store.inspect import PROBABILITY

    kept = [float(v) for v in examples[column].drop_nulls().to_list()]
    rejected, unscored = [], 0
    pattern = re.compile(rf"^{re.escape(column)} (\S+) outside band")
    if rejections is not None:
        for stage, reason in rejections.select("stage", "reason").iter_rows():
            found = pattern.match(reason or "") if stage == "mine" else None
            if found:
                rejected.append(float(found.group(1)))
            elif stage in ("mine", "select"):
                unscored += 1
    lo, hi = (0.0, 1.0) if column.removeprefix("conf_") in PROBABILITY else _span(kept + rejected)
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    band = list(spec.mining.band) if spec is not None and spec.mining is not None else None
    return {"measure": column, "edges": edges, "kept": _bin(kept, lo, hi, bins), "rejected": _bin(rejected, lo, hi, bins),
            "band": band, "unscored_rejected": unscored}


def _span(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _bin(values: list[float], lo: float, hi: float, bins: int) -> list[int]:
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    return counts


def cluster_sizes(examples: pl.DataFrame) -> list[dict]:
    """Rows per diversity cluster, largest first."""
    if "cluster" not in examples.columns or examples["cluster"].is_null().all():
        return []
    sizes = examples.drop_nulls("cluster").group_by("cluster").agg(n=pl.len()).sort(["n", "cluster"], descending=[True, False])
    return [{"cluster": int(c), "n": int(n)} for c, n in sizes.iter_rows()]


def augmentation_yield(examples: pl.DataFrame, rejections: pl.DataFrame | None, spec) -> list[dict]:
    """Per template: variations made, kept in the version, and the teacher's accuracy on the kept ones."""
    if "template_id" not in examples.columns:
        return []
    made = _variations_made(examples, rejections, spec)
    from engine.teachers.answers import normalise_answer

    labels = set(examples["label"].drop_nulls().to_list()) if "label" in examples.columns else set()
    # Per template file: a template_id also names the entry's vars (`frame.j2#lead=...`), one per combination.
    variations = examples.filter(pl.col("template_id").is_not_null()).with_columns(
        _template=pl.col("template_id").str.split("#").list.first())
    rows = []
    for template in sorted(set(variations["_template"].to_list()) | set(made)):
        mine = variations.filter(pl.col("_template") == template)
        graded = mine.filter(pl.col("label").is_not_null()) if labels and "answer" in mine.columns else mine.clear()
        correct = sum(normalise_answer(a or "", labels) == normalise_answer(g, labels)
                      for a, g in graded.select("answer", "label").iter_rows()) if graded.height else 0
        rows.append({"template": template, "made": made.get(template), "kept": mine.height,
                     "graded": graded.height, "correct": correct,
                     "accuracy": correct / graded.height if graded.height else None})
    return rows


def _variations_made(examples: pl.DataFrame, rejections: pl.DataFrame | None, spec) -> dict[str, int]:
    """Variations each template file made in the first round: the rejections table keeps no template_id, so
    this re-draws each augment entry's combinations over the originals that reached augmentation (they
    depend on the entry and the parent's id only). Top-up rounds' variations are not counted."""
    if spec is None or not spec.augment:
        return {}
    from engine.stages.augment import combinations, entries_for, template_id

    originals = [examples.filter(pl.col("prompt_id") == pl.col("parent_id")).select("prompt_id", "category")]
    if rejections is not None and rejections.height:
        originals.append(rejections.filter((pl.col("prompt_id") == pl.col("parent_id"))
                                           & ~pl.col("stage").is_in(["sources", "assign"])).select("prompt_id", "category"))
    made: dict[str, int] = {}
    for pid, category in pl.concat(originals).unique("prompt_id").iter_rows():
        for entry in entries_for(spec, category):
            for combo in combinations(entry, pid):
                name = template_id(entry, combo).split("#", 1)[0]
                made[name] = made.get(name, 0) + 1
    return made


# ---- training runs and eval ---------------------------------------------------------------------


def pick_run(st, info, run: str | None) -> str | None:
    """--train RUN (checked against the store), else the latest run trained on this version, if any."""
    mine = st.models(info.dataset, info.version)
    if run is None:
        return mine[-1]["run_id"] if mine else None
    if any(m["run_id"] == run for m in mine):
        return run
    elsewhere = [m["ref"] for m in st.models() if m["run_id"] == run]
    if elsewhere:
        raise UserError(f"--train {run}: that run was trained on {elsewhere[0]}, not {info.ref}")
    known = ", ".join(dict.fromkeys(m["run_id"] for m in mine)) or "none"
    raise UserError(f"--train {run}: no such training run in {st.root} (runs on {info.ref}: {known})")


def training_curves(st, info, run_id: str) -> list[dict]:
    """Per student of the run: its training loss, each loss component and the val loss, by step."""
    students = []
    for m in st.models(info.dataset, info.version):
        if m["run_id"] != run_id:
            continue
        metrics = m["metrics"] or {}
        students.append({
            "student": m["student"], "params": metrics.get("params"), "steps": metrics.get("steps"),
            "loss": _points(metrics.get("loss_curve")),
            "components": {name: _points(curve) for name, curve in (metrics.get("loss_components") or {}).items()},
            "val": [(float(step), float(loss)) for _, step, loss in metrics.get("val_losses") or []],
        })
    return students


def _points(curve) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in curve or [] if y is not None and math.isfinite(y)]


def find_eval(st, run_id: str) -> tuple[dict, Path] | None:
    """The run's eval.json: beside its models, else the newest report over several seeds naming it."""
    own = st.root / "models" / run_id / "eval.json"
    if own.is_file():
        return json.loads(own.read_text()), own
    found = []
    for path in (st.root / "models").glob("*/eval.json"):
        report = json.loads(path.read_text())
        if run_id in (report.get("runs") or {}).values():
            found.append((path.stat().st_mtime, report, path))
    return (max(found, key=lambda f: f[0])[1:]) if found else None


def eval_models(entry: dict) -> list[dict]:
    """One row per model of an eval set: the teacher, then each student (its mean over seeds, with several)."""
    teacher = [m for m in entry["models"] if m["kind"] == "teacher"]
    if entry.get("seeds"):
        students = [{**s, "accuracy": s["accuracy"]["mean"], "retention": (s.get("retention") or {}).get("mean"),
                     "agreement": (s.get("agreement") or {}).get("mean"), "token_kl": (s.get("token_kl") or {}).get("mean"),
                     "accuracy_ci": [s["accuracy"]["min"], s["accuracy"]["max"]], "spread": True}
                    for s in entry["seeds"]]
    else:
        students = [m for m in entry["models"] if m["kind"] != "teacher"]
    return teacher + students


# ---- the page -----------------------------------------------------------------------------------


def gather(st, ref: str, run: str | None = None) -> dict:
    """Every section's figures and charts for version `ref` and training run `run` (default: its latest)."""
    info = st.resolve(ref)
    spec = version_spec(info)
    stats = info.stats if isinstance(info.stats, dict) else {}
    examples = read_table(st, info, "examples", ["prompt_id", "parent_id", "category", "split", "cluster",
                                                 "template_id", "label", "answer",
                                                 *(c for c in _columns(info) if c.startswith("conf_"))])
    rejections = read_table(st, info, "rejections", ["prompt_id", "parent_id", "category", "stage", "reason"])
    run_id = pick_run(st, info, run)
    return {"info": info, "run_id": run_id, "spec_found": spec is not None,
            "coverage": _coverage_section(examples, stats, spec),
            "funnel": _funnel_section(stats, rejections, spec),
            "confidence": _confidence_section(examples, rejections, spec),
            "clusters": _cluster_section(examples),
            "augmentation": _augmentation_section(examples, rejections, spec),
            "training": _training_section(st, info, run_id),
            "eval": _eval_section(st, run_id)}


def _columns(info) -> list[str]:
    segs = info.segments.get("examples") or []
    return list(pl.read_parquet_schema(segs[0].path)) if segs else []


def _coverage_section(examples, stats, spec) -> Section:
    rows = coverage(examples, stats, spec) if examples is not None else []
    if not rows:
        return Section(missing="the version's examples carry no category")
    return Section(rows, [coverage_chart(rows)])


def _funnel_section(stats, rejections, spec) -> Section:
    rows = funnel(stats, rejections, stage_order(spec, stats))
    if not rows:
        return Section(missing="the version's lineage records no stage statistics")
    return Section(rows, [funnel_chart(rows)])


def _confidence_section(examples, rejections, spec) -> Section:
    column = measure_column(examples.columns, spec) if examples is not None else None
    if column is None:
        return Section(missing="no confidence column: the teacher's answers were not scored")
    hist = confidence_histogram(examples, rejections, column, spec)
    return Section(hist, [histogram_chart(hist)])


def _cluster_section(examples) -> Section:
    rows = cluster_sizes(examples) if examples is not None else []
    if not rows:
        return Section(missing="no diversity clusters: the spec has no diversity stage")
    return Section(rows, [cluster_chart(rows)])


def _augmentation_section(examples, rejections, spec) -> Section:
    rows = augmentation_yield(examples, rejections, spec) if examples is not None else []
    if not rows:
        return Section(missing="no augmentation: the spec makes no variations")
    return Section(rows, [augmentation_chart(rows)])


def _training_section(st, info, run_id) -> Section:
    if run_id is None:
        return Section(missing=f"no training run on {info.ref} yet: `syllabus train SPEC --dataset {info.ref}`")
    students = training_curves(st, info, run_id)
    if not any(s["loss"] or s["val"] for s in students):
        return Section(students, missing=f"run {run_id} recorded no loss curves")
    return Section(students, training_charts(students))


def _eval_section(st, run_id) -> Section:
    if run_id is None:
        return Section(missing="no training run, so no students to evaluate")
    found = find_eval(st, run_id)
    if found is None:
        return Section(missing=f"run {run_id} has not been evaluated: `syllabus eval SPEC`")
    report, path = found
    sets = [{"name": e["name"], "description": e.get("description"), "baseline": e.get("baseline"),
             "models": eval_models(e)} for e in report.get("sets") or []]
    if not sets:
        return Section(missing=f"{path} holds no eval set")
    return Section({"path": str(path), "sets": sets, "methods": report.get("methods", {}),
                    "seeds": len(report.get("seeds") or []) > 1},
                   [scatter_chart(sets[0]["models"])])


def render(sections: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "–" if v is None else f"{v:.1%}"
    env.filters["num"] = lambda v, digits=2: "–" if v is None else f"{v:,.{digits}f}"
    env.filters["millions"] = lambda v: "–" if v is None else f"{v / 1e6:.1f}M"
    return env.get_template(TEMPLATE.name).render(**sections)


def default_path(info, run_id: str | None) -> Path:
    """out/reports/NAME-vN.html, or the run's id (which starts with NAME-vN) when a run is shown."""
    return Path("out") / "reports" / f"{run_id or f'{info.dataset}-v{info.version}'}.html"


def write_report(st, ref: str, run: str | None = None, out: Path | None = None) -> Path:
    """Render the report of `ref` (and training run `run`) to `out` (default: out/reports/...); its path."""
    sections = gather(st, ref, run)
    path = Path(out) if out is not None else default_path(sections["info"], sections["run_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(sections), encoding="utf-8")
    return path.resolve()
