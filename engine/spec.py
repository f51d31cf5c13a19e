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

from engine.errors import SpecError



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


SOURCE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class Source(Strict):
    """Where prompts come from: exactly one of a file, an inline list, or a store version."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    path: str | None = None
    inline: list[str] | None = None
    from_: str | None = Field(None, alias="from")  # NAME@V of a store version (its examples)
    where: str | None = None  # SQL condition over that version's examples
    format: Literal["jsonl", "csv", "parquet", "text"] | None = None  # default: from the file extension
    text: str = "prompt"  # column holding the prompt text
    category: str | None = None  # column holding the coverage category (for inline: the category itself)
    label: str | None = None  # column holding the gold answer
    max_bad_rows: int = Field(0, ge=0)  # malformed rows tolerated (they go to rejections) before the run stops
    max_chars: int = Field(8000, ge=1)  # longer prompts are malformed rows
    limit: int | None = Field(None, ge=1)  # read only the first N good rows (a sample)

    @model_validator(mode="after")
    def _one_origin(self) -> "Source":
        origins = [k for k, v in (("path", self.path), ("inline", self.inline), ("from", self.from_)) if v is not None]
        if len(origins) != 1:
            raise ValueError(f"a source needs exactly one of path, inline, from (got {', '.join(origins) or 'none'})")
        if self.where is not None and self.from_ is None:
            raise ValueError("where applies only to a `from: NAME@V` source")
        if self.label and (self.inline is not None or self.source_format == "text"):
            raise ValueError("label needs a column; inline and text sources have none")
        if self.path is not None and self.source_format is None:
            raise ValueError(f"cannot tell the format of {self.path!r} from its extension; set format: jsonl, csv, parquet or text")
        return self

    @property
    def source_format(self) -> str | None:
        if self.format:
            return self.format
        if self.path is None:
            return None
        return SOURCE_FORMATS.get(Path(self.path).suffix.lower())

    @property
    def origin(self) -> str:
        """How rows of this source are named in the `source` column and in messages."""
        if self.path is not None:
            return self.path
        return f"from:{self.from_}" if self.from_ else "inline"


# --- coverage, augmentation, embeddings, dedup, diversity --------------------


class Category(Strict):
    share: float | None = Field(None, gt=0.0, le=1.0)  # of coverage.total
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=1)
    describe: str = ""  # what belongs here: used by `assign: embedding`
    keywords: list[str] = []  # used by `assign: keywords`

    @model_validator(mode="after")
    def _bounds(self) -> "Category":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} must not exceed max {self.max}")
        return self


class Coverage(Strict):
    total: int | None = Field(None, ge=1)  # size of the final dataset that shares refer to
    assign: Literal["column", "keywords", "embedding"] = "column"
    similarity_floor: float = Field(0.2, ge=-1.0, le=1.0)  # embedding assignment: below this, `uncategorised`
    categories: dict[str, Category] = Field(min_length=1)
    augment_until_quota: bool = False
    augment_rounds: int = Field(3, ge=1)  # at most this many top-up rounds per run
    augment_cap: int = Field(4, ge=1)  # at most this many variations per original prompt, all rounds together

    @model_validator(mode="after")
    def _consistent(self) -> "Coverage":
        shares = {n: c.share for n, c in self.categories.items() if c.share is not None}
        if shares and self.total is None:
            raise ValueError(f"categories with a share ({', '.join(shares)}) need coverage.total")
        if sum(shares.values()) > 1.0 + 1e-6:
            raise ValueError(f"category shares sum to {sum(shares.values()):g}, more than 1")
        if self.assign == "embedding":
            vague = [n for n, c in self.categories.items() if not c.describe.strip()]
            if vague:
                raise ValueError(f"assign: embedding needs a describe text for every category (missing: {', '.join(vague)})")
        if self.assign == "keywords":
            bare = [n for n, c in self.categories.items() if not c.keywords]
            if len(bare) == len(self.categories):
                raise ValueError("assign: keywords needs keywords on at least one category")
        return self


class Augment(Strict):
    template: str = Field(min_length=1)  # Jinja2 file: renders a new prompt (or, with teacher, the rewrite request)
    categories: list[str] | None = None  # default: every category
    vars: dict[str, list] = {}  # expanded as a grid ...
    sample: int | None = Field(None, ge=1)  # ... or this many combinations per prompt, seeded
    seed: int = 0
    teacher: bool = False  # ask the teacher to write the variation from the rendered template
    max_new_tokens: int | None = Field(None, ge=1)  # teacher rewrites: reply length (default: teacher.generation's)


class Embed(Strict):
    model: str = "all-minilm-l6-v2"  # bundled alias or a local sentence-transformers folder
    batch_size: int = Field(64, ge=1)


class SemanticDedup(Strict):
    threshold: float = Field(0.92, gt=0.0, le=1.0)  # cosine similarity at or above which rows are duplicates
    exact_search_below: int = Field(10000, ge=1)  # rows; above it an IVF index (measured in bench/curation.py)


class Dedup(Strict):
    exact: bool = True
    semantic: SemanticDedup | None = None
    against: str | None = None  # NAME@V: drop rows already in that version


class Diversity(Strict):
    clusters: int = Field(16, ge=1)
    seed: int = 0


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
    coverage: Coverage | None = None
    augment: list[Augment] = []
    embed: Embed = Embed()
    dedup: Dedup = Dedup()
    diversity: Diversity | None = None
    mining: Mining = Mining()
    splits: Splits = Splits()
    students: list[Student] = []
    training: Training = Training()
    eval: Eval = Eval()

    # Set by load_spec, not by the user.
    path: Path | None = Field(None, exclude=True)
    text: str = Field("", exclude=True)

    @model_validator(mode="after")
    def _known_categories(self) -> "Spec":
        known = set(self.coverage.categories) if self.coverage else None
        for i, aug in enumerate(self.augment):
            if aug.categories and known is not None:
                unknown = [c for c in aug.categories if c not in known]
                if unknown:
                    raise ValueError(f"augment[{i}].categories: unknown categories {', '.join(unknown)} "
                                     f"(coverage has {', '.join(sorted(known))})")
        return self

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
        field = f"{_field_path(err['loc'])}: " if err["loc"] else ""
        raise SpecError(f"{where}: {field}{_message(err)}{more}") from None
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
        if src.path is not None and not spec.resolve_path(src.path).is_file():
            raise SpecError(f"{where}: sources[{i}].path: no such file {src.path!r}")
    for i, aug in enumerate(spec.augment):
        if not spec.resolve_path(aug.template).is_file():
            raise SpecError(f"{where}: augment[{i}].template: no such template file {aug.template!r}")
