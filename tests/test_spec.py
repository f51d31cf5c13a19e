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
