"""Every error is one line, all at once: what used to be a traceback, through the CLI."""

import sys
import traceback

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

import store
from engine.cli import app
from engine.errors import UserError
from store import StoreError

LONG = "a" * 300  # one path component longer than any file system allows (ENAMETOOLONG)


def syllabus(*args) -> list[str]:
    """Run a verb in-process and return the `error:` lines a user sees; fail on a traceback.

    main() prints a UserError or StoreError as `error: <message>` and exits 1; verbs that
    list several problems print their own `error:` lines and exit 1.
    """
    result = CliRunner().invoke(app, [str(a) for a in args])
    error = result.exception
    assert result.exit_code == 1, result.output
    if isinstance(error, (UserError, StoreError)):
        assert "\n" not in str(error), str(error)
        return [f"error: {error}"]
    assert isinstance(error, SystemExit), "".join(traceback.format_exception(error))  # anything else is a crash
    assert "Traceback" not in result.output
    return result.stderr.splitlines()


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "teacher.j2").write_text("Say: {{ prompt }}\n")
    return tmp_path


def spec(project, text: str = "", **fields) -> str:
    data = {"name": "t", "teacher": {"model": "m"}, "sources": [{"path": "data.jsonl"}], **fields}
    (project / "spec.yaml").write_text(yaml.safe_dump(data) + text)
    return "spec.yaml"


# --- files the OS refuses ----------------------------------------------------------


def test_spec_path_is_a_directory(project):
    (project / "specs").mkdir()
    assert syllabus("validate", "specs") == ["error: specs: cannot read the spec (Is a directory)"]


def test_spec_file_name_too_long(project):
    assert syllabus("validate", LONG + ".yaml") == [f"error: {LONG}.yaml: cannot read the spec (File name too long)"]


def test_source_path_too_long(project):
    [line] = syllabus("validate", spec(project, sources=[{"path": LONG + ".jsonl"}]))
    assert line.startswith(f"error: spec.yaml: sources[0].path: cannot use '{'a' * 80}'... (306 characters)")
    assert line.endswith("(File name too long)")


# --- YAML that PyYAML or pydantic turned into tracebacks ----------------------------


def test_top_level_integer_key(project):
    assert syllabus("validate", spec(project, "1: 2\n")) == ["error: spec.yaml: key 1 is not a string"]


def test_yaml_nested_20000_deep(project):
    (project / "spec.yaml").write_text("name: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert syllabus("validate", "spec.yaml") == ["error: spec.yaml: invalid YAML: nested too deeply"]


def test_integer_over_pythons_digit_limit_in_yaml(project):
    assert syllabus("validate", spec(project, f"seed: {'9' * 5000}\n")) == [
        f"error: spec.yaml: line 6: invalid YAML: integer over {sys.get_int_max_str_digits()} digits"]


# --- version references ------------------------------------------------------------


@pytest.fixture
def st(tmp_path):
    s = store.open(tmp_path / "st")
    s.commit("demo", {"examples": pl.DataFrame({"prompt_id": ["p0"], "prompt": ["hi"]})},
             {"spec_text": "name: demo\n"}, parent=None)
    return s


@pytest.mark.parametrize("verb", [["sql", "SELECT 1", "--at"], ["show"]])
def test_version_number_beyond_sqlite_integers(st, verb):
    assert syllabus(*verb, "demo@99999999999999999999999", "--store", st.root) == [
        "error: dataset 'demo' has no version 99999999999999999999999 (latest is 1)"]


@pytest.mark.parametrize("verb", [["sql", "SELECT 1", "--at"], ["show"]])
def test_unicode_digit_is_not_a_version_number(st, verb):
    # '²'.isdigit() is true, but int('²') fails: it is a tag name that does not exist.
    assert syllabus(*verb, "demo@²", "--store", st.root) == ["error: dataset 'demo' has no version or tag '²' (tags: none)"]


# --- source rows json cannot read --------------------------------------------------


def test_unreadable_json_lines_are_bad_rows_with_file_and_line(project, tiny_llm_dir):
    (project / "data.jsonl").write_text('{"prompt": "fine"}\n{"prompt": ' + "9" * 5000 + "}\n"
                                        + "[" * 100_000 + "]" * 100_000 + "\n")
    [line] = syllabus("run", spec(project, teacher={"model": str(tiny_llm_dir)}, sources=[{"path": "data.jsonl", "max_bad_rows": 1}]),
                      "--store", project / "st", "-q")
    assert line == ("error: data.jsonl: 2 bad rows (max_bad_rows is 1): "
                    f"line 2: invalid JSON (an integer over {sys.get_int_max_str_digits()} digits); "
                    "line 3: invalid JSON (nested too deeply)")


# --- validate: every problem, one line each ----------------------------------------


def test_validate_lists_every_problem_one_line_each(project):
    path = spec(project, teacher={"model": "m", "prompt": "nope.j2"}, sources=[{"path": "gone.jsonl"}],
                mining={"band": [0.9, 0.8]}, students=[{"name": "..", "model": "x"}], minning={})
    assert syllabus("validate", path) == [  # in the order of the spec's fields
        "error: spec.yaml: teacher.prompt: no such template file 'nope.j2'",
        "error: spec.yaml: sources[0].path: no such file 'gone.jsonl'",
        "error: spec.yaml: mining.band: lower bound 0.9 must be below upper bound 0.8",
        "error: spec.yaml: students[0].name: '..' is not a safe folder name: a letter or digit, then letters, "
        "digits, '.', '_' or '-', at most 64 characters",
        "error: spec.yaml: minning: unknown key",
    ]


def test_validate_lists_every_template_problem(project):
    (project / "teacher.j2").write_text("{{ promt }}\n{% include 'other.j2' %}\n")
    (project / "aug.j2").write_text("{{ 3 ** 300000000 }}")
    path = spec(project, teacher={"model": "m", "prompt": "teacher.j2"}, augment=[{"template": "aug.j2"}])
    lines = syllabus("validate", path)
    assert [line.split(": line ")[0] for line in lines] == ["error: teacher.j2", "error: teacher.j2", "error: aug.j2"]
    assert "'promt' is undefined" in lines[0] and "{% include %} is not supported" in lines[1]
    assert lines[2] == ("error: aug.j2: line 1: refused by the sandbox: '**' would make an integer of about "
                        "600000000 bits (the limit is 100000)")


def test_validate_says_how_it_read_each_template_field(project):
    path = spec(project, teacher={"model": "m", "prompt": "teacher.j2"},
                training={"student_prompt": {"inline": "Q: {{ prompt }}"}})
    result = CliRunner().invoke(app, ["validate", path])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:2] == ["spec.yaml: teacher.prompt: template file teacher.j2",
                                              "spec.yaml: training.student_prompt: inline template"]
