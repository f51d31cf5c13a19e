"""Spec validation: every error is one line naming the file and the field path."""

from pathlib import Path

import pytest
import yaml

from engine.spec import SpecError, load_spec

BASE = {
    "name": "t",
    "teacher": {"model": "smollm2-135m-instruct"},
    "sources": [{"path": "data.jsonl", "text": "q"}],
}


def write_spec(tmp_path: Path, data: dict | str) -> Path:
    (tmp_path / "data.jsonl").write_text('{"q": "hello"}\n')
    path = tmp_path / "spec.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, data))
    message = str(info.value)
    assert "\n" not in message
    return message


def with_(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data.update(changes)
    return data


def test_minimal_spec_loads_with_defaults(tmp_path):
    spec = load_spec(write_spec(tmp_path, BASE))
    assert spec.name == "t"
    assert spec.teacher.logprobs.top_k == 20
    assert spec.mining.band == (0.0, 1.0)
    assert spec.resolve_path("data.jsonl") == tmp_path / "data.jsonl"
    assert len(spec.spec_hash) == 64


def test_band_order_error_names_file_and_field(tmp_path):
    message = error_of(tmp_path, with_(mining={"band": [0.9, 0.8]}))
    assert message == f"{tmp_path / 'spec.yaml'}: mining.band: lower bound 0.9 must be below upper bound 0.8"


def test_unknown_key_is_an_error(tmp_path):
    data = with_()
    data["teacher"]["temprature"] = 0.5
    assert error_of(tmp_path, data).endswith("teacher.temprature: unknown key")


def test_unknown_top_level_key(tmp_path):
    assert "minning: unknown key" in error_of(tmp_path, with_(minning={}))


def test_field_path_through_lists(tmp_path):
    data = with_(students=[{"name": "a", "config": {"hidden_size": 10, "num_layers": 1, "num_heads": 3, "intermediate_size": 16}}])
    assert "students[0].config: hidden_size 10 is not divisible by num_heads 3" in error_of(tmp_path, data)


def test_student_needs_exactly_one_kind(tmp_path):
    data = with_(students=[{"name": "a", "from_teacher": {"layers": [0]}, "model": "x"}])
    assert "students[0]: student 'a' needs exactly one of from_teacher, config, model" in error_of(tmp_path, data)


def test_splits_must_sum_to_one(tmp_path):
    assert "splits: train + val + test must sum to 1, got 1.1" in error_of(tmp_path, with_(splits={"train": 0.9, "val": 0.1, "test": 0.1}))


def test_missing_source_file_named(tmp_path):
    assert "sources[0].path: no such file 'nope.jsonl'" in error_of(tmp_path, with_(sources=[{"path": "nope.jsonl"}]))


def test_invalid_yaml_names_line(tmp_path):
    message = error_of(tmp_path, "name: t\nteacher: [unclosed\n")
    assert "spec.yaml: line" in message and "invalid YAML" in message


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "absent.yaml")


def test_demo_spec_is_valid():
    spec = load_spec(Path(__file__).parent.parent / "specs" / "demo.yaml")
    assert [s.kind for s in spec.students] == ["from_teacher", "config"]


# --- every problem at once -----------------------------------------------------------


def test_every_problem_is_listed_one_line_each(tmp_path):
    data = with_(mining={"band": [0.9, 0.8]}, splits={"train": 0.9, "val": 0.1, "test": 0.1}, minning={})
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, data))
    where = tmp_path / "spec.yaml"
    assert info.value.lines == [f"{where}: mining.band: lower bound 0.9 must be below upper bound 0.8",
                                f"{where}: splits: train + val + test must sum to 1, got 1.1",
                                f"{where}: minning: unknown key"]


# --- values that must be refused -------------------------------------------------------


@pytest.mark.parametrize("yaml_text, field", [
    ("mining: {band: [.nan, 0.9]}", "mining.band[0]"),
    ("mining: {band: [0.1, .inf]}", "mining.band[1]"),
    ("training: {optimizer: {lr: .nan}}", "training.optimizer.lr"),
    ("coverage: {total: 10, categories: {a: {share: .NaN}}}", "coverage.categories.a.share"),
    ("augment: [{template: a.j2, vars: {x: [1, {deep: [-.inf]}]}}]", "augment[0].vars.x[1]"),
])
def test_nan_and_infinity_are_refused_anywhere(tmp_path, yaml_text, field):
    (tmp_path / "a.j2").write_text("{{ x }}")
    message = error_of(tmp_path, yaml.safe_dump(BASE) + yaml_text + "\n")
    assert message.endswith(f"spec.yaml: {field}: Input should be a finite number")


@pytest.mark.parametrize("key, name", [
    ("students", ".."), ("students", "."), ("students", "a/b"), ("students", "-x"), ("students", "x" * 65),
    ("name", ".."), ("name", "a.b"), ("name", "_x"), ("name", "a b"),
])
def test_names_must_be_safe_folder_names(tmp_path, key, name):
    data = with_(students=[{"name": name, "model": "m"}]) if key == "students" else with_(name=name)
    field = "students[0].name" if key == "students" else "name"
    assert f"{field}: {name[:80]!r} is not a safe folder name" in error_of(tmp_path, data)


def test_safe_names_are_kept(tmp_path):
    spec = load_spec(write_spec(tmp_path, with_(name="demo-2_b", students=[{"name": "drop6.v2", "model": "m"}])))
    assert spec.name == "demo-2_b" and spec.students[0].name == "drop6.v2"


def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path):
    message = error_of(tmp_path, "name: t\nteacher:\n  model: a\n  model: b\nsources: [{path: data.jsonl}]\n")
    assert message == f"{tmp_path / 'spec.yaml'}: line 4: invalid YAML: duplicate key 'model' (first on line 3)"
    assert "duplicate key 'name' (first on line 1)" in error_of(tmp_path, "name: t\nname: u\n")
    assert "duplicate key 'a'" in error_of(tmp_path, "name: t\nx: {a: 1, a: 2}\n")


def test_merge_keys_may_still_be_overridden(tmp_path):
    text = ("name: t\nteacher: {model: m}\nsources: [{path: data.jsonl}]\ncoverage:\n  total: 10\n  categories:\n"
            "    a: &base {share: 0.5, describe: x}\n    b: {<<: *base, share: 0.25}\n")
    assert load_spec(write_spec(tmp_path, text)).coverage.categories["b"].share == 0.25


# --- template fields: one rule ----------------------------------------------------------


@pytest.mark.parametrize("value, text, file", [
    ("{{ prompt }} {{ answer }}", "{{ prompt }} {{ answer }}", None),  # Jinja markup: inline
    ({"inline": "Answer briefly."}, "Answer briefly.", None),
    ("student.j2", "S: {{ prompt }}", "student.j2"),  # a template suffix: a file, read now
    ({"file": "student.txt"}, "T: {{ prompt }}", "student.txt"),
])
def test_student_prompt_is_inline_or_a_file_by_one_rule(tmp_path, value, text, file):
    (tmp_path / "student.j2").write_text("S: {{ prompt }}")
    (tmp_path / "student.txt").write_text("T: {{ prompt }}")
    spec = load_spec(write_spec(tmp_path, with_(training={"student_prompt": value})))
    assert spec.training.student_prompt == text and spec.training.student_prompt.file == file


@pytest.mark.parametrize("field, value, expected", [
    ("training.student_prompt", "templates/student.txt", "'templates/student.txt' is neither: a template is a file"),
    ("training.student_prompt", "Answer briefly.", "'Answer briefly.' is neither"),
    ("training.student_prompt", "gone.j2", "no such template file 'gone.j2'"),
    ("training.student_prompt", {"inline": ""}, "inline: must be non-empty text"),
    ("teacher.prompt", "templates/teacher.txt", "'templates/teacher.txt' is neither"),
    ("teacher.prompt", "gone.jinja", "no such template file 'gone.jinja'"),
    ("augment[0].template", "rephrase", "'rephrase' is neither"),
])
def test_a_template_field_is_never_guessed(tmp_path, field, value, expected):
    section, key = field.replace("[0]", "").split(".")
    data = with_()
    if section == "augment":
        data["augment"] = [{key: value}]
    else:
        data.setdefault(section, {})[key] = value
    assert f"{field}: {expected}" in error_of(tmp_path, data)


def test_file_template_fields_take_file_mappings(tmp_path):
    (tmp_path / "teacher.txt").write_text("{{ prompt }}")
    spec = load_spec(write_spec(tmp_path, with_(teacher={"model": "m", "prompt": {"file": "teacher.txt"}})))
    assert spec.teacher.prompt == "{{ prompt }}" and spec.teacher.prompt.file == "teacher.txt"


def test_every_template_field_takes_inline_text(tmp_path):
    spec = load_spec(write_spec(tmp_path, with_(
        teacher={"model": "m", "prompt": {"inline": "Review: {{ prompt }}"}},
        augment=[{"template": "In short: {{ prompt }}"}])))
    assert spec.teacher.prompt == "Review: {{ prompt }}" and spec.teacher.prompt.file is None
    assert spec.augment[0].template == "In short: {{ prompt }}" and spec.augment[0].template.file is None
