"""Sources: every format, column mappings, limits, and bad rows with file, line and reason."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import store
from engine.errors import StageError
from engine.spec import Source, SpecError, parse_spec
from engine.stages.base import RunContext, prompt_id
from engine.stages.sources import ROW_SCHEMA, Sources, read_source


def run_sources(tmp_path, *sources, st=None):
    """The sources stage over a spec whose file paths are relative to tmp_path."""
    spec = parse_spec({"name": "t", "teacher": {"model": "m"}, "sources": list(sources)}, path=tmp_path / "spec.yaml")
    return Sources().run(None, RunContext(spec=spec, cache_dir=tmp_path, progress=False, store=st))


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


# --- formats -------------------------------------------------------------------------


def test_jsonl_rows_get_identity_and_columns(tmp_path):
    path = write(tmp_path, "s.jsonl", '{"q": "Is it good?", "a": "yes", "c": "x"}\n\n{"q": "  Is   it good? ", "a": 1}\n')
    rows = read_source(Source(path=str(path), text="q", label="a", category="c"), path=path).rows
    assert [r["label"] for r in rows] == ["yes", "1"]
    assert rows[0]["prompt_id"] == rows[1]["prompt_id"] == prompt_id("Is it good?")
    assert rows[0]["parent_id"] == rows[0]["prompt_id"] and rows[0]["origin"] == "source"
    assert rows[0]["source"] == str(path) and rows[1]["category"] is None


def test_csv_quoted_fields_span_lines(tmp_path):
    path = write(tmp_path, "s.csv", 'text,gold\n"Hello, world",pos\n\n"two\nlines",neg\nBye,neg\n')
    read = read_source(Source(path=str(path), text="text", label="gold"), path=path)
    assert [(r["prompt"], r["label"]) for r in read.rows] == [("Hello, world", "pos"), ("two\nlines", "neg"), ("Bye", "neg")]
    assert read.bad == []


def test_csv_bad_rows_name_their_first_line(tmp_path):
    path = write(tmp_path, "s.csv", b'text,gold\n"two\nlines",neg\ncaf\xe9,neg\na,b,c\n,neg\n')
    read = read_source(Source(path=str(path), text="text", max_bad_rows=5), path=path)
    assert [str(b) for b in read.bad] == [
        "line 4: not UTF-8",
        "line 5: 3 fields but the header has 2 (an unquoted comma?)",
        "line 6: empty 'text' text",
    ]
    assert read.bad[0].raw == b"caf\xe9,neg"


def test_csv_without_the_text_column_says_which_columns_it_has(tmp_path):
    path = write(tmp_path, "s.csv", "body,gold\nHi,pos\n")
    with pytest.raises(StageError) as info:
        read_source(Source(path=str(path), text="text"), path=path)
    assert str(info.value) == f"{path}: no text column 'text' (columns: body, gold)"
    with pytest.raises(StageError, match=r"no label column 'answer' \(columns: body, gold\)"):
        read_source(Source(path=str(path), text="body", label="answer"), path=path)


def test_parquet_reads_mapped_columns_and_reports_rows(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"question": ["What is 2+2?", None, "Name a colour."], "gold": ["4", "x", None],
                             "topic": ["math", "math", "art"], "extra": [1, 2, 3]}), path)
    read = read_source(Source(path=str(path), text="question", label="gold", category="topic", max_bad_rows=1), path=path)
    assert [(r["prompt"], r["category"], r["label"]) for r in read.rows] == [
        ("What is 2+2?", "math", "4"), ("Name a colour.", "art", None)]
    assert [str(b) for b in read.bad] == ["row 2: empty 'question' text"]


def test_unreadable_parquet_is_one_line(tmp_path):
    path = write(tmp_path, "s.parquet", "not parquet at all")
    with pytest.raises(StageError, match=rf"^{path}: not a readable Parquet file \("):
        read_source(Source(path=str(path)), path=path)


def test_text_file_one_prompt_per_line_and_category_names_the_category(tmp_path):
    path = write(tmp_path, "s.txt", "\ufeffWhat is rain?\n\n   \r\nWhy is the sky blue?  \r\n")
    read = read_source(Source(path=str(path), category="science"), path=path)
    assert [(r["prompt"], r["category"], r["label"]) for r in read.rows] == [
        ("What is rain?", "science", None), ("Why is the sky blue?", "science", None)]
    with pytest.raises(ValueError, match=r"label needs a column; inline and text sources have none"):  # at validate time
        read_source(Source(path=str(path), label="gold"), path=path)


def test_inline_list_with_category(tmp_path):
    kept, rejected, stats = run_sources(tmp_path, {"inline": ["Is 7 prime?", "Is 9 prime?"], "category": "math"})
    assert kept["prompt"].to_list() == ["Is 7 prime?", "Is 9 prime?"]
    assert kept["category"].to_list() == ["math", "math"] and kept["source"].to_list() == ["inline", "inline"]
    assert kept.schema == pl.Schema(ROW_SCHEMA) and rejected.height == 0


def test_inline_empty_item_is_a_bad_row_named_by_item(tmp_path):
    with pytest.raises(StageError) as info:
        run_sources(tmp_path, {"inline": ["ok", " "]})
    assert str(info.value) == "sources[0] (inline): 1 bad row (max_bad_rows is 0): item 2: empty text"


@pytest.fixture
def old_store(tmp_path):
    st = store.open(tmp_path / "store")
    examples = pa.table({
        "prompt_id": ["a", "b", "c"], "prompt": ["Old one?", "Old two?", "  "],
        "category": ["x", "y", "x"], "label": ["1", "2", "3"], "split": ["train", "test", "train"],
    })
    empty = pl.DataFrame(schema={"prompt_id": pl.String, "reason": pl.String}).to_arrow()
    lineage = {"spec_text": "", "spec_hash": "x", "teacher": "t", "code_version": "0", "stats": {}}
    st.commit("old", {"examples": examples, "rejections": empty}, lineage=lineage, parent=None)
    return st


def test_from_store_version_with_where(tmp_path, old_store):
    kept, _, _ = run_sources(tmp_path, {"from": "old@1", "where": "split = 'train' AND prompt <> '  '",
                                        "category": "category", "label": "label"}, st=old_store)
    assert kept.select("prompt", "category", "label", "source").rows() == [("Old one?", "x", "1", "from:old@1")]
    assert kept["prompt_id"][0] == prompt_id("Old one?")


def test_from_store_bad_rows_and_errors_name_the_source(tmp_path, old_store):
    with pytest.raises(StageError, match=r"^sources\[0\] \(from:old@1\): 1 bad row \(max_bad_rows is 0\): row 3: empty 'prompt' text$"):
        run_sources(tmp_path, {"from": "old@1"}, st=old_store)
    with pytest.raises(StageError, match=r"^sources\[0\] \(from:old@9\): from: dataset 'old' has no version 9"):
        run_sources(tmp_path, {"from": "old@9"}, st=old_store)
    with pytest.raises(StageError, match=r"^sources\[0\] \(from:old@1\): where: "):
        run_sources(tmp_path, {"from": "old@1", "where": "no_such_column = 1"}, st=old_store)
    with pytest.raises(StageError, match=r"no text column 'question' \(columns: prompt_id, prompt, category, label, split\)"):
        run_sources(tmp_path, {"from": "old@1", "text": "question"}, st=old_store)


def test_several_sources_each_with_its_mapping_and_duplicates_rejected(tmp_path):
    write(tmp_path, "a.jsonl", '{"q": "Same prompt", "c": "one"}\n{"q": "Only in a"}\n')
    write(tmp_path, "b.csv", "body,topic\nSame   prompt,two\nOnly in b,two\n")
    kept, rejected, stats = run_sources(tmp_path, {"path": "a.jsonl", "text": "q", "category": "c"},
                                        {"path": "b.csv", "text": "body", "category": "topic"})
    assert kept.select("prompt", "source", "category").rows() == [
        ("Same prompt", "a.jsonl", "one"), ("Only in a", "a.jsonl", None), ("Only in b", "b.csv", "two")]
    assert rejected.select("prompt", "stage", "reason").rows() == [("Same   prompt", "sources", "duplicate of an earlier prompt")]
    assert stats == {"read": 4, "kept": 3, "duplicates": 1, "bad_rows": 0}


def test_limit_reads_only_the_first_good_rows(tmp_path):
    write(tmp_path, "s.jsonl", '{"q": "one"}\n{"q": ""}\n{"q": "two"}\n{"q": "three"}\nbroken\n')
    kept, rejected, stats = run_sources(tmp_path, {"path": "s.jsonl", "text": "q", "limit": 2, "max_bad_rows": 1})
    assert kept["prompt"].to_list() == ["one", "two"]  # the broken line after the sample is never read
    assert rejected["reason"].to_list() == ["line 2: empty 'q' text"]
    assert stats["bad_rows"] == 1


# --- bad input -----------------------------------------------------------------------


def bad_file(tmp_path):
    """Good rows with bad ones at lines 4 (JSON), 9 (empty text) and 12 (not UTF-8)."""
    lines = [b'{"q": "good %d"}' % i for i in range(1, 13)]
    lines[3] = b'{"q": oops}'
    lines[8] = b'{"q": "   "}'
    lines[11] = b'{"q": "caf\xe9"}'
    return write(tmp_path, "x.jsonl", b"\n".join(lines) + b"\n")


def test_bad_rows_stop_the_run_with_one_line_listing_them(tmp_path):
    path = bad_file(tmp_path)
    with pytest.raises(StageError) as info:
        run_sources(tmp_path, {"path": "x.jsonl", "text": "q"})
    assert str(info.value) == (f"{path}: 3 bad rows (max_bad_rows is 0): line 4: invalid JSON (Expecting value); "
                               "line 9: empty 'q' text; line 12: not UTF-8")
    with pytest.raises(StageError, match=r"x.jsonl: 3 bad rows \(max_bad_rows is 2\)"):
        run_sources(tmp_path, {"path": "x.jsonl", "text": "q", "max_bad_rows": 2})


def test_tolerated_bad_rows_go_to_rejections(tmp_path):
    bad_file(tmp_path)
    kept, rejected, stats = run_sources(tmp_path, {"path": "x.jsonl", "text": "q", "max_bad_rows": 3})
    assert kept.height == 9 and stats["bad_rows"] == 3
    assert rejected.select("stage", "reason", "prompt", "source").rows() == [
        ("sources", "line 4: invalid JSON (Expecting value)", '{"q": oops}', "x.jsonl"),
        ("sources", "line 9: empty 'q' text", '{"q": "   "}', "x.jsonl"),
        ("sources", "line 12: not UTF-8", '{"q": "caf\ufffd"}', "x.jsonl"),
    ]
    assert rejected["prompt_id"][2] == hashlib.sha256(b'{"q": "caf\xe9"}').hexdigest()


@pytest.mark.parametrize("content, reason", [
    ('["q"]', "line 2: expected a JSON object, got a list"),
    ('"just a string"', "line 2: expected a JSON object, got a string"),
    ('{"q": 42}', "line 2: 'q' is not text (got int)"),
    ('{"q": "' + "x" * 21 + '"}', "line 2: 'q' text is 21 characters (max_chars is 20)"),
    ('{"other": "b"}', "line 2: no 'q' field"),
    # json.loads raises ValueError past Python's int-string limit and RecursionError when deeply nested
    ('{"q": ' + "9" * 5000 + "}", f"line 2: invalid JSON (an integer over {sys.get_int_max_str_digits()} digits)"),
    ('{"q": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}", "line 2: invalid JSON (nested too deeply)"),
])
def test_each_kind_of_bad_row(tmp_path, content, reason):
    path = write(tmp_path, "bad.jsonl", '{"q": "fine"}\n' + content + "\n")
    read = read_source(Source(path=str(path), text="q", max_chars=20), path=path)
    assert [str(b) for b in read.bad] == [reason] and [r["prompt"] for r in read.rows] == ["fine"]


def test_long_rejected_lines_are_truncated(tmp_path):
    write(tmp_path, "s.jsonl", '{"q": "ok"}\n{"q": "' + "y" * 500 + '"}\n')
    _, rejected, _ = run_sources(tmp_path, {"path": "s.jsonl", "text": "q", "max_chars": 100, "max_bad_rows": 1})
    assert len(rejected["prompt"][0]) == 200 and rejected["prompt"][0].endswith("…")
    assert rejected["reason"][0] == "line 2: 'q' text is 500 characters (max_chars is 100)"


@pytest.mark.parametrize("content, message", [
    (None, "s.jsonl: no such source file"),  # as the spec names it: it is nowhere
    ("", "{path}: source file is empty"),
    ("\n\n", "{path}: source has no rows"),
    ('{"body": "x"}\n', "{path}: no text column 'q' (columns: body)"),
])
def test_unusable_files_are_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "s.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(StageError) as info:
        run_sources(tmp_path, {"path": "s.jsonl", "text": "q"})
    assert str(info.value) == message.format(path=path)


def test_only_bad_rows_is_not_a_usable_source(tmp_path):
    path = write(tmp_path, "s.jsonl", '{"q": ""}\n')
    with pytest.raises(StageError) as info:
        run_sources(tmp_path, {"path": "s.jsonl", "text": "q", "max_bad_rows": 5})
    assert str(info.value) == f"{path}: no usable rows (line 1: empty 'q' text)"


def test_json_lines_too_big_to_read_count_against_max_bad_rows(tmp_path):
    write(tmp_path, "s.jsonl", '{"q": "fine"}\n{"q": ' + "1" * 5000 + "}\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(StageError) as info:
        run_sources(tmp_path, {"path": "s.jsonl", "text": "q", "max_bad_rows": 1})
    assert str(info.value) == (f"{tmp_path / 's.jsonl'}: 2 bad rows (max_bad_rows is 1): line 2: invalid JSON "
                               f"(an integer over {sys.get_int_max_str_digits()} digits); line 3: invalid JSON (nested too deeply)")
    _, rejected, stats = run_sources(tmp_path, {"path": "s.jsonl", "text": "q", "max_bad_rows": 2})
    assert stats["bad_rows"] == 2 and rejected["reason"].str.starts_with("line ").all()


@pytest.mark.parametrize("name, reason", [("a" * 300 + ".jsonl", "File name too long"), ("folder.jsonl", "Is a directory")])
def test_a_source_path_the_os_refuses_is_one_line(tmp_path, name, reason):
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(StageError) as info:
        run_sources(tmp_path, {"path": name, "text": "q"})
    assert str(info.value) == f"{tmp_path / name if len(name) < 255 else name}: cannot read the source ({reason})"


# --- Hugging Face `datasets` folders ---------------------------------------------------


ROWS = {"q": ["What is 2+2?", "Name a colour.", "Is 7 prime?"], "topic": ["math", "art", "math"], "gold": ["4", "red", "yes"]}


def save_dataset(folder, columns=ROWS, features=None, splits=None):
    """A Dataset (or, with splits {name: row indices}, a DatasetDict) written by save_to_disk."""
    import datasets  # imported by the tests that need it: it is slow to import

    data = datasets.Dataset.from_dict(columns, features=features)
    if splits:
        data = datasets.DatasetDict({name: data.select(rows) for name, rows in splits.items()})
    data.save_to_disk(str(folder))
    return folder


def as_jsonl(tmp_path, columns, rows=None):
    names = list(columns)
    rows = range(len(columns[names[0]])) if rows is None else rows
    return write(tmp_path, "same.jsonl", "".join(json.dumps({n: columns[n][i] for n in names}) + "\n" for i in rows))


def without_source(rows):
    return [{k: v for k, v in r.items() if k != "source"} for r in rows]


def test_a_dataset_folder_reads_the_same_rows_as_the_same_jsonl(tmp_path):
    folder = save_dataset(tmp_path / "ds")
    jsonl = as_jsonl(tmp_path, ROWS)
    mapping = {"text": "q", "category": "topic", "label": "gold"}
    read = read_source(Source(path=str(folder), **mapping), path=folder)
    assert read.bad == [] and [r["prompt"] for r in read.rows] == ROWS["q"]
    assert without_source(read.rows) == without_source(read_source(Source(path=str(jsonl), **mapping), path=jsonl).rows)
    kept, _, stats = run_sources(tmp_path, {"path": "ds", **mapping, "limit": 2})  # a folder: no format needed
    assert kept["prompt"].to_list() == ROWS["q"][:2] and kept["source"].to_list() == ["ds", "ds"]


def test_a_dataset_dict_split_reads_that_split(tmp_path):
    folder = save_dataset(tmp_path / "dd", splits={"train": [0, 2], "test": [1]})
    mapping = {"text": "q", "category": "topic", "label": "gold"}
    read = read_source(Source(path=str(folder), split="train", **mapping), path=folder)
    jsonl = as_jsonl(tmp_path, ROWS, rows=[0, 2])
    assert without_source(read.rows) == without_source(read_source(Source(path=str(jsonl), **mapping), path=jsonl).rows)
    one = save_dataset(tmp_path / "one", splits={"test": [1]})  # a single split needs no `split:`
    assert [r["prompt"] for r in read_source(Source(path=str(one), text="q"), path=one).rows] == ["Name a colour."]


def test_class_label_columns_give_their_names(tmp_path):
    import datasets

    features = datasets.Features({"q": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    folder = save_dataset(tmp_path / "ds", {"q": ["Good.", "Bad.", "Meh."], "label": [1, 0, -1]}, features=features)
    rows = read_source(Source(path=str(folder), text="q", label="label", category="label"), path=folder).rows
    assert [(r["label"], r["category"]) for r in rows] == [("pos", "pos"), ("neg", "neg"), (None, None)]


def validate(tmp_path, source):
    """A spec with one source checked as `syllabus validate` does (files must exist)."""
    return parse_spec({"name": "t", "teacher": {"model": "m"}, "sources": [source]},
                      path=tmp_path / "spec.yaml", check_files=True)


def test_a_dataset_dict_with_several_splits_needs_a_known_split(tmp_path):
    save_dataset(tmp_path / "dd", splits={"train": [0, 2], "test": [1]})
    for split, problem in [(None, "split: required, the DatasetDict has several splits (train, test)"),
                           ("dev", "split: no split 'dev' (splits: train, test)")]:
        source = {"path": "dd", "text": "q", "split": split}
        with pytest.raises(SpecError) as info:  # at validate time
            validate(tmp_path, source)
        assert str(info.value) == f"{tmp_path / 'spec.yaml'}: sources[0]: {problem}"
        with pytest.raises(StageError) as info:  # and at run time, should the folder change after validate
            run_sources(tmp_path, source)
        assert str(info.value) == f"{tmp_path / 'dd'}: {problem}"


def test_split_is_refused_where_there_are_no_splits(tmp_path):
    write(tmp_path, "s.jsonl", '{"q": "x"}\n')
    with pytest.raises(SpecError, match=r"sources\[0\]: split applies only to a datasets folder"):
        validate(tmp_path, {"path": "s.jsonl", "text": "q", "split": "train"})
    save_dataset(tmp_path / "ds")
    with pytest.raises(SpecError, match=r"sources\[0\]: split: 'train' names a split, but the folder holds one Dataset"):
        validate(tmp_path, {"path": "ds", "text": "q", "split": "train"})


def test_a_plain_folder_is_one_line_naming_it(tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data", "notes.txt", "hello\n")
    expected = "is a folder but not a datasets folder written by save_to_disk (no dataset_info.json or dataset_dict.json)"
    with pytest.raises(SpecError) as info:
        validate(tmp_path, {"path": "data"})
    assert str(info.value) == f"{tmp_path / 'spec.yaml'}: sources[0].path: data {expected}"
    with pytest.raises(StageError) as info:
        run_sources(tmp_path, {"path": "data"})
    assert str(info.value) == f"{tmp_path / 'data'} {expected}"
    for arrow in save_dataset(tmp_path / "broken").glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(StageError, match=rf"^{tmp_path / 'broken'}: not a readable datasets folder \(.*No such file"):
        run_sources(tmp_path, {"path": "broken", "text": "q"})


def test_dataset_bad_rows_are_named_by_row_and_counted(tmp_path):
    save_dataset(tmp_path / "ds", {"q": ["fine", None, "also fine", "x" * 30, "  "]})
    with pytest.raises(StageError) as info:
        run_sources(tmp_path, {"path": "ds", "text": "q", "max_chars": 20, "max_bad_rows": 2})
    assert str(info.value) == (f"{tmp_path / 'ds'}: 3 bad rows (max_bad_rows is 2): row 2: empty 'q' text; "
                               "row 4: 'q' text is 30 characters (max_chars is 20); row 5: empty 'q' text")
    kept, rejected, stats = run_sources(tmp_path, {"path": "ds", "text": "q", "max_chars": 20, "max_bad_rows": 3})
    assert kept["prompt"].to_list() == ["fine", "also fine"] and stats["bad_rows"] == 3
    assert rejected.select("reason", "prompt").rows()[0] == ("row 2: empty 'q' text", '{"q": null}')
    save_dataset(tmp_path / "ints", {"q": [1, 2]})
    assert [str(b) for b in read_source(Source(path=str(tmp_path / "ints"), text="q", max_bad_rows=2),
                                        path=tmp_path / "ints").bad] == ["row 1: 'q' is not text (got int)",
                                                                         "row 2: 'q' is not text (got int)"]


def test_dataset_missing_column_names_the_columns(tmp_path):
    save_dataset(tmp_path / "dd", splits={"train": [0, 1]})
    with pytest.raises(StageError) as info:
        run_sources(tmp_path, {"path": "dd", "text": "question"})
    assert str(info.value) == f"{tmp_path / 'dd'}: no text column 'question' (columns: q, topic, gold)"
    with pytest.raises(StageError, match=r"no label column 'answer' \(columns: q, topic, gold\)$"):
        run_sources(tmp_path, {"path": "dd", "label": "answer", "text": "q"})


def test_rewriting_a_dataset_folder_rekeys_the_sources_stage(tmp_path):
    import shutil

    from engine.curate.stage_cache import stage_key

    save_dataset(tmp_path / "ds")
    spec = parse_spec({"name": "t", "teacher": {"model": "m"}, "sources": [{"path": "ds", "text": "q"}]},
                      path=tmp_path / "spec.yaml")

    def key():
        return stage_key(Sources(), Sources().cache_slice(spec, None), "")

    before = key()
    assert key() == before
    shutil.rmtree(tmp_path / "ds")
    save_dataset(tmp_path / "ds", {**ROWS, "q": ["What is 3+3?", *ROWS["q"][1:]]})
    assert key() != before


def test_datasets_is_imported_only_to_read_a_datasets_folder():
    # importing `datasets` takes a second: a spec without such a source must not pay it
    code = "import sys, engine.stages.sources, engine.spec; print('datasets' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
