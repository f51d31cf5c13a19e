"""Store commands: versions, show, sql, diff, export, tag, gc, verify. Thin: parse, call the store, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from engine.cli.common import StoreOption, app, err, open_store, out, print_answer_format, print_cut_off, print_gold
from engine.scoring import GOLD


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@app.command()
def versions(name: Optional[str] = typer.Argument(None, help="dataset name (default: all)"),
             store: Optional[Path] = StoreOption):
    """List dataset versions with their lineage: parent, rows per split, spec hash, teacher, tags."""
    rows = open_store(store).versions(name)
    table = Table()
    numeric = ("examples", "train", "val", "test", "rejected")
    for column in ("version", "parent", "created", *numeric, "spec", "teacher", "tags"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for v in rows:
        splits = v.split_counts()
        table.add_row(v.ref, f"{v.dataset}@{v.parent}" if v.parent else "-", v.created[:19].replace("T", " "),
                      str(v.row_counts.get("examples", 0)), *(str(splits.get(k, "")) for k in ("train", "val", "test")),
                      str(v.row_counts.get("rejections", 0)), (v.spec_hash or "")[:12], v.teacher or "",
                      ", ".join(v.tags))
    out.print(table)


@app.command()
def show(ref: str = typer.Argument(..., help="NAME@V, NAME@latest or NAME@TAG"),
         store: Optional[Path] = StoreOption,
         measure: Optional[str] = typer.Option(None, "--measure", help="confidence column for the histogram"
                                               " (default: the spec's mining.confidence)")):
    """One version: rows per category and split, confidence histogram, rejections, full lineage."""
    st = open_store(store)
    info = st.resolve(ref)
    s = st.summary(ref, measure=measure or _spec_measure(info.spec_text))
    out.print(f"[bold]{info.ref}[/]" + (f"  tags: {', '.join(info.tags)}" if info.tags else ""))
    if s.by_category_split is not None:
        _print_crosstab(s.by_category_split)
        if s.test_split:
            out.print(s.test_split, highlight=False)
    if s.histogram:
        total = sum(n for _, _, n in s.histogram) or 1
        peak = max(n for _, _, n in s.histogram) or 1
        out.print(f"\n[bold]{s.measure}[/] ({total} examples)")
        for lo, hi, n in s.histogram:
            bar = "█" * round(40 * n / peak)
            out.print(f"  {lo:6.2f} – {hi:<6.2f} {n:>7}  {bar}", highlight=False)
    if s.cut_off is not None:
        out.print()
        print_cut_off(out, s.cut_off)
    print_answer_format(out, info.stats.get("teach") if isinstance(info.stats, dict) else None)
    gold = info.stats.get(GOLD) if isinstance(info.stats, dict) else None
    if gold:
        out.print()
        print_gold(out, gold)
    if s.rejections is not None:
        out.print(f"\n[bold]rejections[/] ({info.row_counts.get('rejections', 0)})")
        if s.rejections.height:
            _print_frame(s.rejections)
        else:
            out.print("  none")
    out.print("\n[bold]lineage[/]")
    lines = [("dataset", info.ref), ("parent", f"{info.dataset}@{info.parent}" if info.parent else "-"),
             ("created", info.created), ("spec hash", info.spec_hash or "-"), ("teacher", info.teacher or "-"),
             ("code version", info.code_version or "-")]
    if info.lineage.get("teacher_chain"):  # the teacher was a trained student (models:RUN_ID/STUDENT)
        from engine.models import describe_chain

        lines.insert(5, ("teacher chain", describe_chain(info.lineage["teacher_chain"])))
    if info.lineage.get("spec_path"):
        lines.append(("spec path", str(info.lineage["spec_path"])))
    for table_name, f in s.files.items():
        shared = f" ({f['shared_files']} files, {_size(f['shared_bytes'])} shared with the parent)" if info.parent else ""
        lines.append((f"table {table_name}", f"{f['rows']} rows in {f['files']} files, {_size(f['bytes'])}{shared}"))
    for key, value in lines:
        out.print(f"  {key:<16} {value}", highlight=False)
    if info.stats:
        out.print("  stages")
        for stage, stats in info.stats.items():
            if stage == GOLD:  # said above, under `teacher vs gold`
                continue
            context = stats.get("teacher_context") if isinstance(stats, dict) else None
            if context:
                stats = {k: v for k, v in stats.items() if k != "teacher_context"}
            text = "  ".join(f"{k}={v}" for k, v in stats.items()) if isinstance(stats, dict) else str(stats)
            out.print(f"    {stage:<12} {text}", highlight=False, soft_wrap=True)
            if context:
                _print_context(context)
    for m in s.models:
        out.print(f"  model            models:{m['run_id']}/{m['student']} -> {m['path']}"
                  + (f" (teacher: {_model_teacher(m)})" if m["lineage"] else ""), highlight=False, soft_wrap=True)
    if info.spec_text:
        out.print("\n[bold]spec[/]")
        out.print(info.spec_text.rstrip(), highlight=False, markup=False)


def _print_context(context: dict) -> None:
    """What the teacher read besides each row's prompt (teach stage stats: the first row's, rendered)."""
    out.print(f"    {'':<12} teacher context: {'chat' if context.get('chat', True) else 'plain text (chat: false)'}",
              highlight=False)
    turns = ([("system", context["system"])] if context.get("system") is not None else []) + [
        (m.get("role"), m.get("content")) for m in context.get("messages") or []]
    for role, content in turns:
        shown = " ".join(str(content).split())
        shown = shown if len(shown) <= 100 else shown[:97] + "..."
        out.print(f"    {'':<12}   {role}: {shown}", highlight=False, markup=False, soft_wrap=True)


def _model_teacher(m: dict) -> str:
    """A trained model's teacher, with the chain when the teacher was itself a trained student."""
    from engine.models import describe_chain

    lineage = m["lineage"]
    chain = lineage.get("teacher_chain")
    return describe_chain(chain) if chain else str(lineage.get("teacher") or "-")


@app.command()
def models(name: Optional[str] = typer.Argument(None, help="dataset name (default: all)"),
           store: Optional[Path] = StoreOption,
           as_json: bool = typer.Option(False, "--json", help="print the rows as JSON")):
    """Trained students: the name another spec's teacher can use (models:RUN_ID/STUDENT), the data
    each was trained on, and its teacher (with the chain when that teacher was itself a student)."""
    st = open_store(store)
    if name is not None:
        st.versions(name)  # an unknown dataset is an error, not an empty list
    rows = [m for m in st.models() if name is None or m["dataset"] == name]
    if as_json:
        sys.stdout.write(json.dumps([{**m, "name": f"models:{m['run_id']}/{m['student']}", "path": str(m["path"])}
                                     for m in rows], indent=2, default=str) + "\n")
        return
    table = Table()
    for column in ("model", "dataset", "teacher", "created"):
        table.add_column(column)
    for m in rows:
        table.add_row(f"models:{m['run_id']}/{m['student']}", m["ref"], _model_teacher(m) if m["lineage"] else "-",
                      m["created"][:19].replace("T", " "))
    out.print(table)
    if not rows:
        out.print("no trained students yet: `syllabus train SPEC` trains them", style="dim")


def _spec_measure(spec_text: str | None) -> str | None:
    """The confidence measure the spec mined by (mining.confidence), if the spec says."""
    if not spec_text:
        return None
    try:
        import yaml

        spec = yaml.safe_load(spec_text)
        measure = (spec.get("mining") or {}).get("confidence") if isinstance(spec, dict) else None
        return measure if isinstance(measure, str) else None
    except Exception:  # a lineage spec that no longer parses still shows
        return None


def _print_crosstab(frame) -> None:
    import polars as pl

    if "category" in frame.columns and "split" in frame.columns:
        pivot = frame.pivot(on="split", index="category", values="n").fill_null(0)
        order = [c for c in ("train", "val", "test") if c in pivot.columns]
        pivot = pivot.select(["category", *order, *sorted(c for c in pivot.columns if c not in order and c != "category")])
        pivot = pivot.with_columns(total=pl.sum_horizontal(pivot.columns[1:]))
        total = {"category": "total", **{c: int(pivot[c].sum()) for c in pivot.columns[1:]}}
        frame = pl.concat([pivot.cast({c: pl.Int64 for c in pivot.columns[1:]}),
                           pl.DataFrame([total], schema=pivot.cast({c: pl.Int64 for c in pivot.columns[1:]}).schema)])
    _print_frame(frame)


def _print_frame(frame) -> None:
    table = Table()
    for name in frame.columns:
        table.add_column(name, justify="right" if frame.schema[name].is_numeric() else "left")
    for row in frame.iter_rows():
        table.add_row(*(_cell(v) for v in row))
    out.print(table)


@app.command()
def sql(query: Optional[str] = typer.Argument(None, help="SQL over the views examples, tokens, rejections and"
                                              " <dataset>_v<N>_<table>; none: an interactive prompt"),
        at: Optional[str] = typer.Option(None, "--at", help="dataset version the plain views show: NAME@V, NAME@latest, NAME@TAG"),
        store: Optional[Path] = StoreOption,
        fmt: str = typer.Option("table", "--format", help="table | csv | json"),
        timeout: float = typer.Option(60.0, "--timeout", help="seconds a query may run before it is stopped"),
        memory_limit: str = typer.Option("50%", "--memory-limit", help="memory a query may use: e.g. 4GB, 50% (of RAM)")):
    """Read-only SQL (DuckDB) over dataset versions; without a query, an interactive prompt."""
    import store as store_api

    if fmt not in SQL_FORMATS:
        raise store_api.StoreError(f"unknown --format {fmt!r}: use {', '.join(SQL_FORMATS)}")
    st = open_store(store)
    limits = {"timeout": timeout, "memory_limit": memory_limit}
    if query is not None:
        print_arrow(st.sql(query, at=at, **limits), fmt)
        return
    _repl(st, at, fmt, limits)


def _repl(st, at: Optional[str], fmt: str, limits: dict) -> None:
    """Read statements line by line until ';', print each result; `.quit` (or end of input) leaves."""
    import store as store_api

    tty = sys.stdin.isatty()
    if tty:
        err.print(f"syllabus sql{' at ' + st.resolve(at).ref if at else ''}: end statements with ';', "
                  "'.tables' lists views, '.quit' leaves", highlight=False)
    buffer: list[str] = []
    while True:
        if tty:
            err.print("...> " if buffer else "sql> ", end="")
        line = sys.stdin.readline()
        if not line:
            break
        stripped = line.strip()
        if not buffer and stripped in (".quit", ".exit", "\\q"):
            break
        if not buffer and stripped == ".tables":
            info = st.resolve(at) if at else None
            names = (sorted(info.segments) + ["tokens"] if info else []) + [
                f"{v.dataset}_v{v.version}_<table>" for v in st.versions()[-5:]]
            out.print("  ".join(names) or "(no versions yet)", highlight=False)
            continue
        if not stripped and not buffer:
            continue
        buffer.append(line)
        if stripped.endswith(";"):
            statement = "".join(buffer)
            buffer = []
            try:
                print_arrow(st.sql(statement, at=at, **limits), fmt)
            except store_api.StoreError as e:
                err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
    if buffer and "".join(buffer).strip():
        try:
            print_arrow(st.sql("".join(buffer), at=at, **limits), fmt)
        except store_api.StoreError as e:
            err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)


@app.command()
def diff(a: str = typer.Argument(..., help="NAME@A (the older)"), b: str = typer.Argument(..., help="NAME@B"),
         store: Optional[Path] = StoreOption,
         sample: int = typer.Option(5, "--sample", help="rows shown per kind"),
         show_sql: bool = typer.Option(False, "--sql", help="print the query (runs as is in `syllabus sql`) and stop")):
    """Rows added, removed and changed (same prompt_id, different response, answer, label, category or split)."""
    st = open_store(store)
    d = st.diff(a, b, sample=0 if show_sql else sample)
    if show_sql:
        sys.stdout.write(d.query + "\n")
        return
    out.print(f"[bold]{d.a} -> {d.b}[/]: {d.totals['added']} added, {d.totals['removed']} removed,"
              f" {d.totals['changed']} changed")
    if d.counts.height:
        _print_frame(d.counts)
    for kind, rows in d.samples.items():
        if rows.height:
            out.print(f"\n[bold]{kind}[/] (first {rows.height} by prompt_id)")
            keep = [c for c in ("prompt_id", "category", "split", "what", "prompt", "response_a", "response_b",
                                "label_a", "label_b") if c in rows.columns]
            if kind != "changed":
                keep = [c for c in keep if c not in ("what", "response_a", "response_b", "label_a", "label_b")]
            _print_frame(rows.select(keep).with_columns(
                *([rows["prompt_id"].str.slice(0, 12)] if "prompt_id" in keep else [])))
    out.print(f"\nrefine it: syllabus diff {a} {b} --sql", style="dim")


@app.command()
def export(ref: str = typer.Argument(..., help="NAME@V"),
           fmt: str = typer.Option(..., "--format", help="jsonl (chat messages) | parquet (every column, token ids and"
                                   " top-k, plus messages) | hf (datasets save_to_disk: messages)"),
           out_path: Path = typer.Option(..., "--out", help="file (jsonl, parquet) or folder (hf) to write"),
           split: Optional[str] = typer.Option(None, "--split", help="only this split (e.g. train)"),
           prompt: Optional[str] = typer.Option(None, "--prompt", help="the user turn: student (default: what"
                                                " `syllabus train` fed the students) | teacher | source (the bare prompt)"),
           with_meta: bool = typer.Option(False, "--with-meta", help="jsonl, hf: prompt_id, category, split, label,"
                                          " conf_* and finish_reason beside messages"),
           system: Optional[str] = typer.Option(None, "--system", help="a system message for every example"
                                                " where the spec gives none (the trainer sent none)"),
           force: bool = typer.Option(False, "--force", help="replace an existing file (or hf folder) at --out"),
           store: Optional[Path] = StoreOption):
    """Export a version's examples as chat (what the students learn from): JSONL, Parquet, or a datasets folder.
    A student reading plain text (chat: false) gets `text` and `completion` instead of `messages`."""
    from engine.export import chat_turns

    st = open_store(store)
    info = st.resolve(ref)
    turns = chat_turns(info, prompt, system)
    if turns.note:
        err.print(f"note: {turns.note}", highlight=False, soft_wrap=True, markup=False)
    r = st.export(info.ref, fmt, out_path, split=split, user=turns.user, system=turns.system,
                  meta=with_meta, force=force, plain=turns.plain)
    out.print(f"exported {r.ref}: {r.rows} examples as {r.format} -> {r.path}", highlight=False)


@app.command()
def tag(ref: str = typer.Argument(..., help="NAME@V to name"), name: str = typer.Argument(..., help="tag, e.g. prod"),
        force: bool = typer.Option(False, "--force", help="move the tag if it names another version"),
        delete: bool = typer.Option(False, "--delete", help="remove the tag (REF is NAME or NAME@TAG)"),
        store: Optional[Path] = StoreOption):
    """Name a version: NAME@TAG then resolves to it everywhere. Tags move only with --force."""
    st = open_store(store)
    if delete:
        dataset = ref.split("@")[0]
        version = st.untag(dataset, name)
        out.print(f"removed tag {dataset}@{name} (was {dataset}@{version})")
        return
    info, before = st.tag(ref, name, force=force)
    if before is None:
        out.print(f"tagged {info.ref} as {info.dataset}@{name}")
    elif before == info.version:
        out.print(f"{info.dataset}@{name} already names {info.ref}")
    else:
        out.print(f"moved {info.dataset}@{name}: {info.dataset}@{before} -> {info.ref}")


@app.command()
def gc(dry_run: bool = typer.Option(False, "--dry-run", help="list what would be removed, remove nothing"),
       grace: float = typer.Option(3600, "--grace", help="seconds an unlocked staging entry of another tool is spared"),
       checkpoints: bool = typer.Option(False, "--checkpoints",
                                        help="also remove interrupted training runs' checkpoints (no resuming them)"),
       store: Optional[Path] = StoreOption):
    """Remove staging leftovers, data files no version references and finished runs' checkpoints."""
    st = open_store(store)
    report = st.gc(dry_run=dry_run, grace_s=grace, checkpoints=checkpoints)
    verb = "would remove" if dry_run else "removed"
    for item in report.items:
        out.print(f"{verb} {item.path.relative_to(st.root)}  ({item.why}, {_size(item.bytes)})", highlight=False)
    for item in report.kept:
        out.print(f"kept {item.path.relative_to(st.root)}  ({item.why}, {_size(item.bytes)})", highlight=False)
    out.print(f"{verb} {len(report.items)} item(s), {_size(report.bytes)}" if report.items else "nothing to remove")


@app.command()
def verify(store: Optional[Path] = StoreOption):
    """Re-hash every data file of every version; report any missing or altered file (exit 1)."""
    import store as store_api

    st = open_store(store)
    report = st.verify()
    for p in report.problems:
        refs = ", ".join(p.refs[:5]) + (f" and {len(p.refs) - 5} more" if len(p.refs) > 5 else "")
        err.print(f"[red]bad:[/] {p.path}: {p.what} (used by {refs})", highlight=False, soft_wrap=True)
    if report.catalog != "ok":
        err.print(f"[red]bad:[/] catalog: {report.catalog}", highlight=False)
    if not report.ok:
        raise store_api.StoreError(f"verify found {len(report.problems)} bad file(s)"
                                   + ("" if report.catalog == "ok" else " and a damaged catalog"))
    out.print(f"ok: {report.files} files, {_size(report.bytes)}, every sha256 matches; catalog ok")


SQL_FORMATS = ("table", "csv", "json")


def print_arrow(result, fmt: str) -> None:
    import polars as pl

    frame = pl.from_arrow(result)
    if fmt == "csv":
        # CSV has no lists or structs: such cells are written as JSON text.
        nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
        frame = frame.with_columns(pl.Series(name, [None if v is None else json.dumps(v, default=str, ensure_ascii=False)
                                                    for v in frame[name].to_list()], pl.String) for name in nested)
        sys.stdout.write(frame.write_csv())
    elif fmt == "json":
        sys.stdout.write(json.dumps(frame.to_dicts(), default=str, ensure_ascii=False) + "\n")
    else:
        table = Table(show_lines=False)
        for name in frame.columns:
            table.add_column(name)
        for row in frame.iter_rows():
            table.add_row(*(_cell(v) for v in row))
        out.print(table)
        out.print(f"{frame.height} row(s)", style="dim")


def _cell(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."
