"""The spec language: pydantic models of a domain spec, and load_spec(path).

Every error names the spec file and the field path, e.g.
``specs/x.yaml: mining.band: lower bound 0.9 must be below upper bound 0.8``.
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(Exception):
    """A spec that cannot be used; the message is one line naming file and field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- teacher -----------------------------------------------------------------


class Generation(Strict):
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0


class Logprobs(Strict):
    top_k: int = Field(20, ge=1, le=100)


class Reasoning(Strict):
    suffix: str = ""
    answer_marker: str = Field(min_length=1)


class Teacher(Strict):
    backend: Literal["transformers"] = "transformers"
    model: str = Field(min_length=1)
    prompt: str | None = None  # Jinja2 template file over the row: what the teacher is asked
    generation: Generation = Generation()
    logprobs: Logprobs = Logprobs()
    reasoning: Reasoning | None = None
    batch_size: int = Field(8, ge=1, le=256)


# --- sources -----------------------------------------------------------------


class Source(Strict):
    path: str = Field(min_length=1)
    format: Literal["jsonl", "csv"] | None = None  # default: from the file extension
    text: str = "prompt"  # column holding the prompt text
    category: str | None = None  # column holding the coverage category
    label: str | None = None  # column holding the gold answer

    @model_validator(mode="after")
    def _known_format(self) -> "Source":
        if self.format is None and self.source_format is None:
            raise ValueError(f"cannot tell the format of {self.path!r} from its extension; set format: jsonl or csv")
        return self

    @property
    def source_format(self) -> str | None:
        if self.format:
            return self.format
        suffix = Path(self.path).suffix.lower()
        return {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}.get(suffix)


# --- mining and splits -------------------------------------------------------

CONFIDENCE_MEASURES = ("mean_token_prob", "min_token_prob", "answer_prob", "margin", "entropy")


class Mining(Strict):
    confidence: Literal["mean_token_prob", "min_token_prob", "answer_prob", "margin", "entropy"] = "mean_token_prob"
    band: tuple[float, float] = (0.0, 1.0)
    outside_band_keep: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 0

    @field_validator("band")
    @classmethod
    def _ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        lo, hi = band
        if lo >= hi:
            raise ValueError(f"lower bound {lo} must be below upper bound {hi}")
        return band


class Splits(Strict):
    train: float = Field(0.8, ge=0.0, le=1.0)
    val: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.1, ge=0.0, le=1.0)
    group_by: Literal["prompt_id", "parent_id"] = "prompt_id"
    seed: int = 0

    @model_validator(mode="after")
    def _sum_to_one(self) -> "Splits":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


# --- students and training ---------------------------------------------------


class FromTeacher(Strict):
    layers: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: list[int]) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError("layers must be distinct")
        return layers


class StudentConfig(Strict):
    hidden_size: int = Field(ge=8)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    intermediate_size: int = Field(ge=8)

    @model_validator(mode="after")
    def _heads_divide(self) -> "StudentConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self


class Student(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    from_teacher: FromTeacher | None = None
    config: StudentConfig | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> "Student":
        kinds = [k for k in ("from_teacher", "config", "model") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"student {self.name!r} needs exactly one of from_teacher, config, model (got {kinds or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("from_teacher", "config", "model") if getattr(self, k) is not None)


class Loss(Strict):
    kd_weight: float = Field(0.7, ge=0.0)
    hard_weight: float = Field(0.3, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)
    tail: Literal["bucket"] = "bucket"

    @model_validator(mode="after")
    def _some_weight(self) -> "Loss":
        if self.kd_weight + self.hard_weight <= 0:
            raise ValueError("kd_weight + hard_weight must be positive")
        return self


class Optimizer(Strict):
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    layerwise_lr_decay: float = Field(1.0, gt=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)


class Training(Strict):
    student_prompt: str | None = None  # Jinja2 over the row: what the student sees
    loss: Loss = Loss()
    optimizer: Optimizer = Optimizer()
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop early: for smoke runs and tests
    seed: int = 0


class Eval(Strict):
    split: Literal["train", "val", "test"] = "test"
    max_new_tokens: int | None = Field(None, ge=1)  # default: the teacher's max_new_tokens
    speed_prompts: int = Field(3, ge=1)  # prompts timed for batch-1 decode speed
    speed_tokens: int = Field(32, ge=1)  # tokens decoded per timed prompt


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    teacher: Teacher
    sources: list[Source] = Field(min_length=1)
    mining: Mining = Mining()
    splits: Splits = Splits()
    students: list[Student] = []
    training: Training = Training()
    eval: Eval = Eval()

    # Set by load_spec, not by the user.
    path: Path | None = Field(None, exclude=True)
    text: str = Field("", exclude=True)

    @field_validator("students")
    @classmethod
    def _unique_names(cls, students: list[Student]) -> list[Student]:
        names = [s.name for s in students]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"student names must be unique, repeated: {', '.join(dupes)}")
        return students

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def resolve_path(self, relative: str) -> Path:
        """A path from the spec: as given if it exists from here, else next to the spec file."""
        p = Path(relative).expanduser()
        if p.is_absolute() or p.exists() or self.path is None:
            return p
        beside = self.path.parent / p
        return beside if beside.exists() else p


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        elif item in ("function-after", "function-before") or str(item).startswith("function-"):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _message(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return msg


def parse_spec(data: object, *, path: Path | None = None, text: str = "") -> Spec:
    where = str(path) if path else "<spec>"
    if not isinstance(data, dict):
        raise SpecError(f"{where}: the spec must be a mapping of keys to values")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise SpecError(f"{where}: {_field_path(err['loc'])}: {_message(err)}{more}") from None
    return spec.model_copy(update={"path": path, "text": text})


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}:{line} invalid YAML: {problem}") from None
    spec = parse_spec(data, path=path, text=text)
    _check_files(spec)
    return spec


def _check_files(spec: Spec) -> None:
    """Files the spec names must exist: fail at validate time, not an hour into a run."""
    where = spec.path
    if spec.teacher.prompt and not spec.resolve_path(spec.teacher.prompt).is_file():
        raise SpecError(f"{where}: teacher.prompt: no such template file {spec.teacher.prompt!r}")
    for i, src in enumerate(spec.sources):
        if not spec.resolve_path(src.path).is_file():
            raise SpecError(f"{where}: sources[{i}].path: no such file {src.path!r}")
