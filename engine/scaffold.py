"""`syllabus init DOMAIN --prompts FILE`: a starter spec and teacher template for a prompts file.

The spec reads a sample of the file (`limit:`), with its format and columns detected,
and validates and runs as written on the bundled teacher; its comments say what to
change next. Nothing is written unless the whole scaffold is valid, and existing files
are kept unless the caller forces it.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.spec import SOURCE_FORMATS, SpecError, parse_spec
from engine.stages.sources import check_bad_rows, read_source
from engine.templates import ROW_VARIABLES, check_variables, compile_template

# Column names that say what a column holds, best first (compared case-insensitively).
TEXT_NAMES = ("prompt", "question", "instruction", "text", "input", "query", "review")
CATEGORY_NAMES = ("category", "topic", "task", "domain", "type")
LABEL_NAMES = ("answer", "label", "gold", "target", "output")

SAMPLE_ROWS = 50  # rows the scaffolded spec reads: enough to see the pipeline work, quick on a CPU
DETECT_ROWS = 200  # rows looked at to pick the columns
CATEGORY_SCAN_ROWS = 100_000  # rows scanned for the category values the coverage section lists
MAX_CATEGORIES = 20  # more distinct values than this is not a category column
TEACHER = "smollm2-135m-instruct"
MAX_NEW_TOKENS = 32


class ScaffoldError(SpecError):
    """A scaffold that cannot be made; one line naming the file or argument."""


@dataclass
class Columns:
    text: str | None = None  # None for text files: each line is a prompt
    category: str | None = None
    label: str | None = None
    categories: dict[str, int] = field(default_factory=dict)  # value -> rows, in the scanned rows


@dataclass
class Scaffold:
    spec_path: Path
    template_path: Path
    source_path: str  # as the spec names it
    format: str
    columns: Columns
    bad_rows: int  # malformed rows in the sample, tolerated by the spec's max_bad_rows


def scaffold(domain: str, prompts: Path, out_dir: Path = Path("."), *, force: bool = False,
             sample: int = SAMPLE_ROWS) -> Scaffold:
    """Write out_dir/specs/DOMAIN.yaml and out_dir/templates/DOMAIN_teacher.j2."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", domain):
        raise ScaffoldError(f"domain {domain!r}: use letters, digits, '_' and '-' (it names the spec and the dataset)")
    prompts, out_dir = Path(prompts), Path(out_dir)
    if not prompts.is_file():
        raise ScaffoldError(f"{prompts}: no such prompts file")
    spec_path = out_dir / "specs" / f"{domain}.yaml"
    template_path = out_dir / "templates" / f"{domain}_teacher.j2"
    if not force:
        for path in (spec_path, template_path):
            if path.exists():
                raise ScaffoldError(f"{path}: already exists (use --force to overwrite)")

    fmt = detect_format(prompts)
    columns = detect_columns(prompts, fmt)
    source = _source_entry(prompts, out_dir, fmt, columns, sample)
    bad_rows = _sample_bad_rows(source, prompts)
    source["max_bad_rows"] = bad_rows
    made = Scaffold(spec_path, template_path, source["path"], fmt, columns, bad_rows)
    template_rel = template_path.relative_to(out_dir).as_posix()
    spec_text = spec_yaml(domain, prompts, source, columns, template_rel, explicit_format=_needs_format(prompts))
    template_text = teacher_template(domain, prompts, columns)
    _check(spec_text, template_text, spec_path, template_path)

    spec_path.parent.mkdir(parents=True, exist_ok=True)
    template_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(spec_text, encoding="utf-8")
    template_path.write_text(template_text, encoding="utf-8")
    return made


# --- detection ---------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    """From the extension; otherwise JSONL if the first line is a JSON object, else plain text."""
    known = SOURCE_FORMATS.get(path.suffix.lower())
    if known:
        return known
    with path.open("rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace").strip()
            if line:
                try:
                    return "jsonl" if isinstance(json.loads(line), dict) else "text"
                except json.JSONDecodeError:
                    return "text"
    return "text"


def _needs_format(path: Path) -> bool:
    return path.suffix.lower() not in SOURCE_FORMATS


def detect_columns(path: Path, fmt: str) -> Columns:
    """Which column holds the prompt, the category and the gold label, from the first rows."""
    if fmt == "text":
        return Columns()
    records = _first_records(path, fmt, DETECT_ROWS)
    names = list(dict.fromkeys(k for r in records for k in r))
    if not names:
        raise ScaffoldError(f"{path}: found no {fmt.upper()} rows with columns to read prompts from")
    textual = [n for n in names if _is_textual([r.get(n) for r in records])]
    category = _named(textual, CATEGORY_NAMES)
    label = _named([n for n in names if n != category], LABEL_NAMES)
    candidates = [n for n in textual if n not in (category, label)]
    text = _named(candidates, TEXT_NAMES) or _longest(candidates, records)
    if text is None:
        raise ScaffoldError(f"{path}: no column holds text to use as prompts (columns: {', '.join(names)})")
    return Columns(text=text, category=category, label=label)


def _first_records(path: Path, fmt: str, n: int) -> list[dict]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(path).iter_batches(batch_size=n), None)
        return batch.to_pylist() if batch is not None else []
    if fmt == "csv":
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            return [row for _, row in zip(range(n), csv.DictReader(f))]
    records = []
    with path.open("rb") as f:
        for raw in f:
            try:
                value = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # bad rows are the sources stage's to report
            if isinstance(value, dict):
                records.append(value)
            if len(records) >= n:
                break
    return records


def _is_textual(values: list) -> bool:
    """Mostly non-empty strings that are not numbers (a CSV's id column is not a prompt)."""
    present = [v for v in values if v not in (None, "")]
    words = [v for v in present if isinstance(v, str) and not _is_number(v)]
    return bool(present) and len(words) * 2 > len(present)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _named(names: list[str], wanted: tuple[str, ...]) -> str | None:
    by_lower = {n.lower(): n for n in reversed(names)}
    return next((by_lower[w] for w in wanted if w in by_lower), None)


def _longest(names: list[str], records: list[dict]) -> str | None:
    """The column with the longest texts: prompts are longer than ids and tags."""
    def mean_length(name: str) -> float:
        values = [r[name] for r in records if isinstance(r.get(name), str)]
        return sum(map(len, values)) / max(len(values), 1)

    return max(names, key=mean_length, default=None)


def _scan_categories(path: Path, source: dict) -> dict[str, int]:
    spec_source = _source_model({**source, "limit": CATEGORY_SCAN_ROWS, "max_bad_rows": 0})
    read = read_source(spec_source, path=path)
    return dict(Counter(r["category"] for r in read.rows if r["category"] is not None).most_common())


# --- the spec and the template -------------------------------------------------------------


def _source_entry(prompts: Path, out_dir: Path, fmt: str, columns: Columns, sample: int) -> dict:
    entry = {"path": _spec_relative(prompts, out_dir), "format": fmt}
    if columns.text is not None:
        entry["text"] = columns.text
    if columns.category is not None:
        categories = _scan_categories(prompts, {**entry, "category": columns.category})
        if 0 < len(categories) <= MAX_CATEGORIES:
            entry["category"] = columns.category
            columns.categories = categories
        else:
            columns.category = None  # an id-like column, not categories
    if columns.label is not None:
        entry["label"] = columns.label
    entry["limit"] = sample
    return entry


def _spec_relative(path: Path, out_dir: Path) -> str:
    """Paths in a spec are read from the project root (out_dir): relative inside it, absolute outside."""
    path, root = path.resolve(), out_dir.resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _source_model(entry: dict):
    return parse_spec({"name": "x", "teacher": {"model": TEACHER}, "sources": [entry]}).sources[0]


def _sample_bad_rows(source: dict, prompts: Path) -> int:
    """Malformed rows in the sample the spec reads: tolerated, so the scaffold runs as written."""
    src = _source_model({**source, "max_bad_rows": 0})
    read = read_source(src, path=prompts)
    check_bad_rows(src.model_copy(update={"max_bad_rows": len(read.bad)}), read)  # still fails with no usable rows
    return len(read.bad)


def _q(value) -> str:
    """A YAML scalar, quoted only where YAML needs it (`yes`, `1.0`, `a: b` ...)."""
    return yaml.safe_dump(value, allow_unicode=True, width=10**9).removesuffix("\n...\n").strip()


def spec_yaml(domain: str, prompts: Path, source: dict, columns: Columns, template: str, *,
              explicit_format: bool) -> str:
    lines = [
        f"# {domain}: a syllabus spec scaffolded by `syllabus init` from {prompts.name}.",
        "# It runs as it is on a sample of your prompts with the small bundled teacher:",
        f"#   syllabus validate specs/{domain}.yaml && syllabus run specs/{domain}.yaml",
        "# then look at the result:  syllabus sql \"SELECT prompt, answer FROM examples\" --at "
        f"{domain}@latest",
        "# Paths below are read from the folder holding specs/ and templates/: run syllabus from there.",
        f"name: {domain}",
        "",
        "teacher:",
        "  backend: transformers",
        f"  model: {TEACHER}       # bundled; or a local Hugging Face folder, or a .gguf file",
        f"  prompt: {_q(template)}   # what the teacher is asked for each row: edit it",
        f"  generation: {{max_new_tokens: {MAX_NEW_TOKENS}, temperature: 0.0}}   # raise max_new_tokens for longer answers",
        "  logprobs: {top_k: 20}   # the teacher's top-k per token: what students learn from",
        "  batch_size: 8",
        "  # Reasoning: ask for steps, then read the answer after the marker.",
        "  # reasoning: {suffix: \" Think step by step, then write 'Answer:' and the answer.\", answer_marker: \"Answer:\"}",
        "",
        "sources:",
        f"  - path: {_q(source['path'])}",
    ]
    if explicit_format:
        lines.append(f"    format: {source['format']}   # the extension does not say: detected from the content")
    if "text" in source:
        lines.append(f"    text: {_q(source['text'])}   # the column holding the prompt")
    if "category" in source:
        lines.append(f"    category: {_q(source['category'])}   # the column naming each row's category")
    if "label" in source:
        lines.append(f"    label: {_q(source['label'])}   # the gold answer: eval scores teacher and students against it")
    lines += [
        f"    limit: {source['limit']}   # a sample to start with: delete this line to read every row",
        f"    max_bad_rows: {source['max_bad_rows']}   # malformed rows allowed (they go to rejections) before a run stops"
        + (f"; the sample has {source['max_bad_rows']}" if source["max_bad_rows"] else ""),
        "",
    ]
    lines += _coverage_lines(columns)
    lines += [
        "# Variations of each prompt, made by a Jinja2 template (vars expanded as a grid):",
        "# augment:",
        "#   - {template: templates/rephrase.j2, vars: {style: [briefly, formally]}}",
        "",
        "dedup: {exact: true}   # add semantic: {threshold: 0.92} to drop near-duplicates too",
        "",
        "# Keep every complete answer (truncated: drop leaves out answers cut off at max_new_tokens).",
        "# Narrow the band to keep what the teacher answered with a confidence in a range,",
        "# e.g. band: [0.6, 0.9] with outside_band_keep: 0.1",
        "mining: {confidence: mean_token_prob, band: [0.0, 1.0], outside_band_keep: 0.0, truncated: drop}",
        "",
        "splits: {train: 0.8, val: 0.1, test: 0.1, group_by: parent_id, seed: 0}",
        "",
        "# Students to distil the dataset into (`syllabus train`, then `syllabus eval`):",
        "# students:",
        "#   - {name: drop6, from_teacher: {layers: [0, 6, 12, 18, 24, 29]}}   # 6 of the teacher's 30 layers",
        "#   - {name: tiny, config: {hidden_size: 192, num_layers: 4, num_heads: 4, intermediate_size: 512}}",
        "# training:",
        "#   loss: {kd_weight: 0.7, hard_weight: 0.3, temperature: 2.0}",
        "#   optimizer: {lr: 3.0e-4}",
        "#   epochs: 3",
        "#   batch_size: 8",
    ]
    return "\n".join(lines) + "\n"


def _coverage_lines(columns: Columns) -> list[str]:
    if not columns.categories:
        return []
    found = ", ".join(f"{name} ({n})" for name, n in columns.categories.items())
    lines = [
        f"# Categories found in {columns.category!r}: {found}.",
        "# Give each a share of a total (or a min/max count) to enforce quotas on the final dataset,",
        "# e.g. total: 400 here and {share: 0.25, describe: \"...\"} on a category.",
        "coverage:",
        "  assign: column",
        "  categories:",
    ]
    lines += [f"    {_q(name)}: {{}}" for name in columns.categories]
    return lines + [""]


def teacher_template(domain: str, prompts: Path, columns: Columns) -> str:
    origin = f"column {columns.text!r} of {prompts.name}" if columns.text else f"a line of {prompts.name}"
    known = ", ".join(v for v in ROW_VARIABLES if v != "prompt")
    return (
        f"{{#- The teacher prompt of {domain}, scaffolded by `syllabus init`.\n"
        "    Rendered over each row (sandboxed Jinja2); the result is what the teacher is asked.\n"
        f"    prompt is the text ({origin}); also known: {known}.\n"
        "    Put an instruction around the prompt, for example:\n"
        "        Answer in one short sentence.\n"
        "        Question: (the prompt variable, in double braces)\n"
        f"    `syllabus validate specs/{domain}.yaml` checks this file. -#}}\n"
        "{{ prompt }}\n"
    )


def _check(spec_text: str, template_text: str, spec_path: Path, template_path: Path) -> None:
    """The scaffold must validate as written: check it before a file is touched."""
    parse_spec(yaml.safe_load(spec_text), path=spec_path, text=spec_text)
    check_variables(compile_template(template_text, str(template_path)), ROW_VARIABLES)


def relative_to_cwd(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive
        return str(path)
