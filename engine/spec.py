"""The spec language: pydantic models of a domain spec, and load_spec(path).

Every error names the spec file and the field path, e.g.
``specs/x.yaml: mining.band: lower bound 0.9 must be below upper bound 0.8``.
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator,
                      ValidationError, ValidationInfo, field_validator, model_validator)

from engine.errors import SpecError
from engine.text import normalise_text


class Strict(BaseModel):
    # allow_inf_nan: YAML's .nan and .inf are floats, and no field of a spec means them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- names, files and templates ----------------------------------------------

# Students and datasets name folders in the store: one safe path component each, never `.` or `..`.
STUDENT_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
DATASET_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"  # no '.': it also names SQL views (demo_v1_examples)


def _name(pattern: str, allowed: str):
    def check(name: str) -> str:
        if not re.fullmatch(pattern, name):
            raise ValueError(f"{name[:80]!r} is not a safe folder name: {allowed}, at most 64 characters")
        return name
    return AfterValidator(check)


def _finite(value: Any) -> Any:
    """Untyped values (augment vars) hold any YAML: refuse NaN and inf inside, as allow_inf_nan does elsewhere."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("Input should be a finite number")
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        _finite(item)
    return value


def resolve(relative: str, spec_path: Path | None) -> Path:
    """A path from the spec: as given if it exists from here, else next to the spec file."""
    p = Path(relative).expanduser()
    try:
        if p.is_absolute() or p.exists() or spec_path is None:
            return p
        beside = spec_path.parent / p
        return beside if beside.exists() else p
    except OSError:  # e.g. a name too long for the OS: reading it says so
        return p


def _file_problem(value: str, info: ValidationInfo, what: str) -> None:
    """With check_files (load_spec), a named file must exist: fail at validate time, not an hour into a run."""
    context = info.context or {}
    if not context.get("check_files"):
        return
    try:
        found = resolve(value, context.get("spec_path")).is_file()
    except OSError as e:
        raise ValueError(f"cannot use {_short(value)} ({e.strerror})") from None
    if not found:
        raise ValueError(f"no such {what} {_short(value)}")


def _short(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


TEMPLATE_SUFFIXES = (".j2", ".jinja", ".jinja2")
JINJA_MARKUP = ("{{", "{%", "{#")
TEMPLATE_RULE = ("a template is a file (a path ending in .j2, .jinja or .jinja2, or {file: PATH}) "
                 "or inline text ({inline: TEXT}, or a string holding {{ or {%)")


def template_ref(value: Any) -> tuple[str, str]:
    """The one rule of every template field: ("file", PATH) or ("inline", TEXT), never a guess.

    A bare string is a file when it ends in a template suffix, inline text when it holds Jinja
    markup (no path does); anything else is refused: it could be a mistyped path or plain text,
    and taking a path as text would train on the path's characters.
    """
    if isinstance(value, dict) and len(value) == 1 and set(value) <= {"file", "inline"}:
        [(kind, text)] = value.items()
    elif isinstance(value, str) and value.strip().lower().endswith(TEMPLATE_SUFFIXES):
        kind, text = "file", value
    elif isinstance(value, str) and any(mark in value for mark in JINJA_MARKUP):
        kind, text = "inline", value
    else:
        shown = _short(value) if isinstance(value, str) else repr(value)[:80]
        raise ValueError(f"{shown} is neither: {TEMPLATE_RULE}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{kind}: must be non-empty text")
    return kind, text


class TemplateText(str):
    """Template text of a spec field; `file` names the file it was read from (None: written inline)."""

    file: str | None = None


def _template_text(value: Any, info: ValidationInfo) -> TemplateText:
    kind, text = template_ref(value)
    if kind == "file":  # read now: the field's users take text, and a missing file fails validate
        path = resolve(text, (info.context or {}).get("spec_path"))
        try:
            content = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if (info.context or {}).get("check_files"):
                raise ValueError(f"no such template file {_short(text)}") from None
            content = ""  # parse_spec without check_files (a scaffold before it writes its files): no text yet
        except UnicodeDecodeError as e:
            raise ValueError(f"template file {_short(text)} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ValueError(f"cannot read template file {_short(text)} ({e.strerror})") from None
    result = TemplateText(content if kind == "file" else text)
    result.file = text if kind == "file" else None
    return result


# Every template field: its text, read from its file at load time (so a missing file fails validate).
TemplateSource = Annotated[str, PlainValidator(_template_text)]


# --- teacher -----------------------------------------------------------------


class Generation(Strict):
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0


class Logprobs(Strict):
    top_k: int = Field(20, ge=1, le=100)  # topk: the k likeliest ids; sampled: k draws (engine/train/sampled.py)
    # topk: the k likeliest ids and their T=1 log-probs. sampled: the distinct ids of top_k draws with
    # replacement from the T=1 distribution, each with log(count / top_k): an unbiased estimate of it.
    mode: Literal["topk", "sampled"] = "topk"


class Reasoning(Strict):
    suffix: str = ""
    answer_marker: str = Field(min_length=1)


class Timeouts(Strict):
    connect: float = Field(10.0, gt=0)  # seconds to open a connection
    read: float = Field(300.0, gt=0)  # seconds to wait for one whole answer (the server may queue it)


class Retries(Strict):
    attempts: int = Field(5, ge=1, le=50)  # tries per request, the first one included
    backoff: float = Field(0.5, ge=0)  # seconds before the first retry; doubles each retry (with jitter)
    max_wait: float = Field(60.0, gt=0)  # longest wait between tries, a server's Retry-After included


class Endpoint(Strict):
    """One server of a pool (teacher.base_url as a list): the same model behind every one."""
    url: str
    concurrency: int | None = Field(None, ge=1, le=256)  # requests in flight at once here; none: max_concurrency

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _server_url(value)


def _server_url(value: str) -> str:
    """An http(s) URL without credentials (it is recorded in lineage and error messages), no trailing slash."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(value)
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"{_short(value)} is not a URL ({e})") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{_short(value)} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    if url.username or url.password or url.query or url.fragment:
        # A secret must come from api_key_env.
        raise ValueError("must hold no user, password, query or fragment: give the key through api_key_env")
    return value.rstrip("/")


def _endpoint(i: int, value) -> Endpoint:
    """Entry i of a base_url list (a URL or {url, concurrency}); one error naming the entry, not the union's two."""
    try:
        return Endpoint.model_validate({"url": value} if isinstance(value, str) else value)
    except ValidationError as e:
        first = e.errors()[0]
        where = "".join(f".{x}" for x in first["loc"])
        raise ValueError(f"entry {i}{where}: {first['msg'].removeprefix('Value error, ')}") from None


# backend: openai only; `model` is then the name the server serves.
OPENAI_FIELDS = ("base_url", "api_key_env", "tokenizer", "max_concurrency", "timeout", "retries", "extra_body")
# What the openai backend sets in each request from the spec itself: extra_body may not override it.
OPENAI_REQUEST_FIELDS = ("model", "messages", "prompt", "max_tokens", "temperature", "top_p", "seed", "logprobs",
                         "top_logprobs", "n", "stream")


class Turn(Strict):
    """One chat turn placed before the row's own prompt (a few-shot example, an instruction)."""
    role: Literal["user", "assistant", "system"]
    content: TemplateSource  # Jinja2 over the row, like the prompt


PLAIN_TEXT = ("only with chat: true; with chat: false the prompt is sent as plain text, with no chat template "
              "and no turns: write the instructions and examples into the prompt template")


class Teacher(Strict):
    backend: Literal["transformers", "openai"] = "transformers"
    model: str = Field(min_length=1)
    prompt: TemplateSource | None = None  # Jinja2 over the row: what the teacher is asked
    # true: [system?] + messages + the prompt as the last user turn, through the tokenizer's chat template
    # (backend openai: /chat/completions); false: the prompt as plain text (openai: /completions).
    chat: bool = True
    system: TemplateSource | None = None  # Jinja2 over the row: the system message (none: the template's default)
    messages: list[Turn] = []  # turns before the prompt: few-shot examples as real user/assistant turns
    generation: Generation = Generation()
    logprobs: Logprobs = Logprobs()
    reasoning: Reasoning | None = None
    # Responses per prompt (sampled with generation.seed + i): sample 0 is the row's response, which is
    # distilled; every sample's answer is stored (sample_answers) for conf_self_consistency.
    samples: int = Field(1, ge=1, le=64)
    batch_size: int = Field(8, ge=1, le=256)
    # backend transformers: where the model runs; auto: cuda if torch sees one, else cpu. CUDA with bf16 loads
    # the weights in bf16 (log-probs still in float32). Not in the fingerprint: rows agree within float tolerance.
    device: str = "cpu"
    # backend: openai (an OpenAI-compatible chat-completions server: OpenAI, vLLM, llama.cpp)
    # e.g. http://127.0.0.1:8000/v1; a list (of URLs or {url, concurrency}): a pool of servers of the same model
    base_url: str | list[Endpoint] | None = None
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the variable's name, never the key
    tokenizer: str | None = None  # the model's tokenizer here: a bundled alias, a local HF folder or a .gguf file
    max_concurrency: int = Field(4, ge=1, le=256)
    timeout: Timeouts = Timeouts()
    retries: Retries = Retries()
    # Fields added to each request as they are: a server's own options (llama.cpp: {repeat_penalty: 1.0}).
    extra_body: Annotated[dict[str, Any], AfterValidator(_finite)] = Field(default_factory=dict)

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        return _device(value)  # training.device's rule (defined below): whether CUDA is there is checked at load

    @field_validator("samples")
    @classmethod
    def _samples_need_sampling(cls, samples: int, info: ValidationInfo) -> int:
        generation = info.data.get("generation")
        if samples > 1 and generation is not None and generation.temperature <= 0:
            raise ValueError(f"{samples} samples need teacher.generation.temperature > 0: greedy decoding gives "
                             "the same answer every time")
        return samples

    @field_validator("system", "messages")
    @classmethod
    def _chat_only(cls, value, info: ValidationInfo):
        if value and info.data.get("chat") is False:
            raise ValueError(PLAIN_TEXT)
        return value

    @field_validator("extra_body")
    @classmethod
    def _extra_body(cls, value: dict) -> dict:
        taken = [k for k in value if k in OPENAI_REQUEST_FIELDS]
        if taken:
            raise ValueError(f"{', '.join(taken)}: set by the backend from the spec (generation, logprobs, model)")
        return value

    @field_validator("base_url", mode="before")
    @classmethod
    def _base_url(cls, value):
        if value is None or isinstance(value, str):
            return None if value is None else _server_url(value)
        if not isinstance(value, list):
            return value  # pydantic names the type it wants
        if not value:
            raise ValueError("an empty list: give one URL or several")
        return [_endpoint(i, v) for i, v in enumerate(value)]

    @field_validator("base_url")
    @classmethod
    def _distinct_endpoints(cls, value):
        if isinstance(value, list):
            urls = [e.url for e in value]
            twice = sorted({u for u in urls if urls.count(u) > 1})
            if twice:
                raise ValueError(f"{', '.join(twice)} listed twice: give an endpoint once, with its concurrency")
        return value

    @model_validator(mode="after")
    def _backend_fields(self):
        if self.backend == "openai":
            missing = [f for f in ("base_url", "tokenizer") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"backend openai needs {' and '.join(missing)} (tokenizer: a bundled alias, "
                                 "a local HF folder or a .gguf file with the served model's vocabulary)")
            if "device" in self.model_fields_set:
                raise ValueError("device: only for backend: transformers (an openai teacher runs where its server does)")
        else:
            stray = [f for f in OPENAI_FIELDS if f in self.model_fields_set]
            if stray:
                raise ValueError(f"{', '.join(stray)}: only for backend: openai (backend is {self.backend})")
        return self

    @property
    def local_model(self) -> str:
        """The model whose tokenizer (and, with backend transformers, weights) this machine holds."""
        return self.tokenizer if self.backend == "openai" else self.model


# --- ensembles ---------------------------------------------------------------

# What a member is asked and how it answers: each of these it leaves unset is the teacher's
# (system and messages only where the member reads a chat, as with a student's).
MEMBER_INHERITS = ("prompt", "chat", "generation", "reasoning", "system", "messages")


class Member(Teacher):
    """One more teacher of an ensemble: a teacher block plus its weight in the averaged top-k."""
    weight: float = Field(1.0, gt=0.0)

    def resolved(self, teacher: Teacher) -> "Member":
        """This member with what it leaves unset taken from the (primary) teacher."""
        given = self.model_fields_set
        update = {f: getattr(teacher, f) for f in MEMBER_INHERITS[:4] if f not in given}
        chat = update.get("chat", self.chat)
        if "system" not in given:
            update["system"] = teacher.system if chat else None
        if "messages" not in given:
            update["messages"] = teacher.messages if chat else []
        return self.model_copy(update=update)


class Ensemble(Strict):
    """Several teachers (engine/stages/ensemble.py). `teacher:` stays the primary: its answer is the row's
    response. Every member answers too (their answers: teacher_agreement); a member with the teacher's
    tokenizer and its weights here also scores the teacher's response, and the stored top-k become the
    weighted average of the teachers' distributions."""
    weight: float = Field(1.0, gt=0.0)  # the primary teacher's weight in that average
    members: list[Member] = Field(min_length=1)

    def resolved(self, teacher: Teacher) -> list[Member]:
        return [member.resolved(teacher) for member in self.members]


# --- sources -----------------------------------------------------------------


SOURCE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
NOT_DATASETS = "is a folder but not a datasets folder written by save_to_disk (no dataset_info.json or dataset_dict.json)"


def datasets_layout(folder: Path) -> str | None:
    """"dict" (DatasetDict.save_to_disk), "dataset" (Dataset.save_to_disk), or None: not such a folder."""
    try:
        if (folder / "dataset_dict.json").is_file():
            return "dict"
        if (folder / "dataset_info.json").is_file() or (folder / "state.json").is_file():
            return "dataset"
    except OSError:  # a name too long for the OS, no permission: not a folder we can read
        pass
    return None


def datasets_split(folder: Path, split: str | None) -> str | None:
    """The split of a datasets folder to read (None: it holds one Dataset); ValueError when `split:` does not fit."""
    if datasets_layout(folder) != "dict":
        if split is not None:
            raise ValueError(f"split: {split!r} names a split, but the folder holds one Dataset, not a DatasetDict")
        return None
    try:
        splits = [str(s) for s in json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"split: cannot read the splits from dataset_dict.json ({type(e).__name__})") from None
    if split is None and len(splits) == 1:
        return splits[0]
    if split is None:
        raise ValueError(f"split: required, the DatasetDict has several splits ({', '.join(splits)})")
    if split not in splits:
        raise ValueError(f"split: no split {split!r} (splits: {', '.join(splits)})")
    return split


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for the OS: reading it says so
        return False


def _option_set(options: list[str]) -> list[str]:
    """A fixed answer set: at least 2 options, each a different answer as answers are compared."""
    if len(options) < 2:
        raise ValueError(f"give at least 2 options (got {len(options)}): the teacher's distribution is over them")
    seen: dict[str, str] = {}
    for option in options:
        key = normalise_text(option)
        if not key:
            raise ValueError(f"option {_short(option)} has no letter or digit: answers are compared without "
                             "punctuation, so it would match no answer")
        if key in seen:
            raise ValueError(f"options {_short(seen[key])} and {_short(option)} are the same answer (answers are "
                             "compared lower-cased, without punctuation)")
        seen[key] = option
    return options


# The answer set of a source's or a category's rows: the options stage scores each with the teacher.
OptionSet = Annotated[list[str], AfterValidator(_option_set)]


# `from: students:RUN_ID/STUDENT`: a trained student of the store answers the prompts of the version it
# was trained on (engine/stages/student_source.py); the names follow engine.models' `models:RUN_ID/STUDENT`.
STUDENT_SOURCE = "students:"
_STUDENT_SOURCE = re.compile(r"students:([A-Za-z0-9][A-Za-z0-9._-]*)/([A-Za-z0-9][A-Za-z0-9._-]*)")
STUDENT_ANSWER_FIELDS = ("max_new_tokens", "temperature", "seed")


class Source(Strict):
    """Where prompts come from: exactly one of a file, a datasets folder, an inline list, a store version,
    or a trained student's answers to the prompts of the version it was trained on."""

    model_config = ConfigDict(populate_by_name=True)  # merged with Strict's

    path: str | None = None  # a file, or a folder written by `datasets`' save_to_disk
    inline: list[str] | None = None
    from_: str | None = Field(None, alias="from")  # NAME@V of a store version (its examples), or students:RUN/STUDENT
    where: str | None = None  # SQL condition over that version's examples
    # from: students:RUN_ID/STUDENT: how the student answers (the teacher then scores its tokens)
    max_new_tokens: int | None = Field(None, ge=1, le=4096)  # default: teacher.generation.max_new_tokens
    temperature: float = Field(0.0, ge=0.0)  # 0: greedy
    seed: int = 0  # sampling's seed (temperature > 0)
    format: Literal["jsonl", "csv", "parquet", "text", "datasets"] | None = None  # default: from the extension
    split: str | None = None  # the split of a DatasetDict folder to read
    text: str = "prompt"  # column holding the prompt text
    category: str | None = None  # column holding the coverage category (for inline: the category itself)
    label: str | None = None  # column holding the gold answer
    max_bad_rows: int = Field(0, ge=0)  # malformed rows tolerated (they go to rejections) before the run stops
    max_chars: int = Field(8000, ge=1)  # longer prompts are malformed rows
    limit: int | None = Field(None, ge=1)  # read only the first N good rows (a sample)
    options: OptionSet | None = None  # its rows' fixed answer set (a category's options override it)

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str | None, info: ValidationInfo) -> str | None:
        context = info.context or {}
        if path is None or not context.get("check_files"):
            return path
        folder = resolve(path, context.get("spec_path"))
        if datasets_layout(folder):
            return path
        if _is_folder(folder) and Path(path).suffix.lower() not in SOURCE_FORMATS:
            raise ValueError(f"{path} {NOT_DATASETS}")
        _file_problem(path, info, "file" if Path(path).suffix.lower() in SOURCE_FORMATS else "file or folder")
        return path

    @field_validator("from_")
    @classmethod
    def _student_name(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(STUDENT_SOURCE) and not _STUDENT_SOURCE.fullmatch(value):
            raise ValueError(f"{_short(value)}: a trained student is named students:RUN_ID/STUDENT "
                             "(`syllabus models` lists them as models:RUN_ID/STUDENT)")
        return value

    @model_validator(mode="after")
    def _student_answer_fields(self) -> "Source":
        given = [f for f in STUDENT_ANSWER_FIELDS if f in self.model_fields_set]
        if given and self.student is None:
            raise ValueError(f"{', '.join(given)}: only for a `from: students:RUN_ID/STUDENT` source "
                             "(how the student answers)")
        return self

    @model_validator(mode="after")
    def _one_origin(self, info: ValidationInfo) -> "Source":
        origins = [k for k, v in (("path", self.path), ("inline", self.inline), ("from", self.from_)) if v is not None]
        if len(origins) != 1:
            raise ValueError(f"a source needs exactly one of path, inline, from (got {', '.join(origins) or 'none'})")
        if self.where is not None and self.from_ is None:
            raise ValueError("where applies only to a `from:` source (NAME@V or students:RUN_ID/STUDENT)")
        if self.label and (self.inline is not None or self.source_format == "text"):
            raise ValueError("label needs a column; inline and text sources have none")
        if self.split is not None and self.source_format != "datasets":
            raise ValueError("split applies only to a datasets folder (a DatasetDict written by save_to_disk)")
        context = info.context or {}
        if self.path is not None and self.source_format == "datasets":
            folder = resolve(self.path, context.get("spec_path"))
            if self.format is None and not _is_folder(folder):  # only a folder may go without a known extension
                raise ValueError(f"cannot tell the format of {self.path!r} from its extension; "
                                 "set format: jsonl, csv, parquet, text or datasets")
            if context.get("check_files"):
                datasets_split(folder, self.split)  # fail at validate time: a missing or unknown split
        return self

    @property
    def source_format(self) -> str | None:
        if self.format:
            return self.format
        if self.path is None:
            return None
        # A path without an extension we know names a folder written by `datasets`: _one_origin checks it is one.
        return SOURCE_FORMATS.get(Path(self.path).suffix.lower(), "datasets")

    @property
    def origin(self) -> str:
        """How rows of this source are named in the `source` column and in messages."""
        if self.path is not None:
            return self.path
        if self.student is not None:
            return self.from_
        return f"from:{self.from_}" if self.from_ else "inline"

    @property
    def student(self) -> tuple[str, str] | None:
        """(run_id, student) of a `from: students:RUN_ID/STUDENT` source; None for any other."""
        found = _STUDENT_SOURCE.fullmatch(self.from_ or "")
        return (found.group(1), found.group(2)) if found else None


# --- coverage, augmentation, embeddings, dedup, diversity --------------------


class Category(Strict):
    share: float | None = Field(None, gt=0.0, le=1.0)  # of coverage.total
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=1)
    describe: str = ""  # what belongs here: used by `assign: embedding`
    keywords: list[str] = []  # used by `assign: keywords`
    options: OptionSet | None = None  # its rows' fixed answer set, over their sources' options

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
    template: TemplateSource  # Jinja2: renders a new prompt (or, with teacher, the rewrite request)
    categories: list[str] | None = None  # default: every category
    vars: dict[str, list[Annotated[Any, AfterValidator(_finite)]]] = {}  # expanded as a grid ...
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
# Over the teacher's option distribution (rows with `options:`, engine/stages/options.py): the probability
# of the option its answer names, top-1 minus top-2 probability, and the entropy in nats.
OPTION_MEASURES = ("option_answer_prob", "option_margin", "option_entropy")


# Confidence measures read from the top-k, left null on sampled targets (engine/stages/confidence.py).
SAMPLED_WITHOUT = ("margin", "entropy")


class Mining(Strict):
    # self_consistency: the share of the teacher.samples answers agreeing with the most common one (samples > 1).
    confidence: Literal["mean_token_prob", "min_token_prob", "answer_prob", "margin", "entropy",
                        "self_consistency", "teacher_agreement",
                        "option_answer_prob", "option_margin", "option_entropy"] = "mean_token_prob"
    band: tuple[float, float] = (0.0, 1.0)
    outside_band_keep: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 0
    truncated: Literal["keep", "drop"] = "keep"  # answers cut off at max_new_tokens (finish_reason "length")

    @field_validator("band")
    @classmethod
    def _ordered(cls, band: tuple[float, float]) -> tuple[float, float]:
        lo, hi = band
        if lo >= hi:
            raise ValueError(f"lower bound {lo} must be below upper bound {hi}")
        return band


class Teach(Strict):
    """Which rows the teacher is asked (engine/stages/teach_order.py).

    all: every row that survives dedup. selection: train and val rows in the order selection would
    keep them (round robin over clusters within each category), asking no more for a category once
    answers mining is sure to keep (in band) fill its quota; the test split is always asked in full.
    """
    order: Literal["all", "selection"] = "all"


class Splits(Strict):
    """Drawn right after dedup, before the teacher answers: mining and quotas never shape the test split."""

    train: float = Field(0.8, ge=0.0, le=1.0)
    val: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.1, ge=0.0, le=1.0)
    # parent_id: a variation lands in its original's split, so no rewording of a test prompt is trained on.
    group_by: Literal["prompt_id", "parent_id"] = "parent_id"
    seed: int = 0

    @model_validator(mode="after")
    def _sum_to_one(self) -> "Splits":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


# --- students and training ---------------------------------------------------


class Vocab(Strict):
    """A trimmed vocabulary (engine/train/vocab.py): the ids the dataset uses, the keep_frequent
    earliest-merged ids, every special token and byte, closed under BPE merges."""
    keep_frequent: int = Field(ge=0)


class FromTeacher(Strict):
    """The teacher, compressed: every part optional (none: a copy of the teacher).

    layers: those decoder layers in that order; keep_layers: the N most influential ones
    (block influence on the calibration sample). Widths keep the units with the largest
    activations there (engine/train/prune.py); teacher-dependent checks run at build time.
    """
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    keep_layers: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    kv_heads: int | None = Field(None, ge=1)
    calibration: int = Field(64, ge=1)  # train sequences that measure importance
    vocab: Vocab | None = None  # trim the vocabulary to what the dataset uses (own tokenizer + id map)

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and len(set(layers)) != len(layers):
            raise ValueError("layers must be distinct")
        return layers

    @field_validator("keep_layers")
    @classmethod
    def _one_depth(cls, keep: int | None, info: ValidationInfo) -> int | None:
        if keep is not None and info.data.get("layers") is not None:
            raise ValueError("give layers or keep_layers, not both")
        return keep

    @field_validator("kv_heads")
    @classmethod
    def _groups_divide(cls, kv: int | None, info: ValidationInfo) -> int | None:
        heads = info.data.get("heads")
        if kv is not None and heads is not None and heads % kv:
            raise ValueError(f"heads {heads} is not divisible by kv_heads {kv}")
        return kv

    @property
    def prunes_width(self) -> bool:
        return any(v is not None for v in (self.hidden_size, self.intermediate_size, self.heads, self.kv_heads))

    @property
    def needs_calibration(self) -> bool:
        return self.keep_layers is not None or self.prunes_width


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
    name: Annotated[str, _name(STUDENT_NAME, "a letter or digit, then letters, digits, '.', '_' or '-'")]
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


class HiddenLoss(Strict):
    """Hidden-state distillation (engine/train/hidden.py): on the response tokens, each mapped student
    layer's output is pulled towards the teacher layer's, through a learned linear projection where the
    widths differ. Needs the teacher's weights here (backend: transformers)."""
    weight: float = Field(gt=0.0)  # added to the loss: weight * mean over mapped layers of the distance
    # {student_layer: teacher_layer}, 0-based decoder layers; null: every student layer, evenly spaced,
    # the student's last onto the teacher's last.
    layer_map: dict[int, int] | None = Field(None, min_length=1)
    distance: Literal["cosine", "mse"] = "cosine"

    @field_validator("layer_map")
    @classmethod
    def _non_negative(cls, layer_map: dict[int, int] | None) -> dict[int, int] | None:
        bad = [f"{s}: {t}" for s, t in (layer_map or {}).items() if s < 0 or t < 0]
        if bad:
            raise ValueError(f"layers are 0-based, never negative (got {', '.join(bad)})")
        return layer_map


class Loss(Strict):
    # D(teacher top-k + tail || student), see engine/train/losses.py; jsd takes `beta` (TRL's GKD convention).
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0)
    tail: Literal["bucket", "renormalise"] = "bucket"
    # options: a row with option_probs is distilled through its options (the teacher's option distribution
    # against the student's, engine/train/options.py) instead of its tokens' top-k; other rows keep tokens.
    kd_target: Literal["tokens", "options"] = "tokens"
    kd_weight: float = Field(0.7, ge=0.0)
    hard_weight: float = Field(0.3, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)
    # Schedules over optimizer steps: T goes linearly from temperature to temperature_end by the
    # last step; the hard weight ramps linearly from 0 to hard_weight over hard_warmup_steps.
    temperature_end: float | None = Field(None, gt=0.0)
    hard_warmup_steps: int = Field(0, ge=0)
    hidden: HiddenLoss | None = None  # hidden-state term beside KD and hard CE (local teacher only)
    # Per response token, on both KD and hard CE: tokens before the end of teacher.reasoning's answer marker
    # weigh reasoning_weight, the answer tokens (eos included) answer_weight; without a marker all are answer.
    reasoning_weight: float = Field(1.0, ge=0.0)
    answer_weight: float = Field(1.0, ge=0.0)

    @field_validator("answer_weight")
    @classmethod
    def _some_token_weight(cls, answer_weight: float, info: ValidationInfo) -> float:
        if answer_weight == 0 and info.data.get("reasoning_weight") == 0:
            raise ValueError("reasoning_weight and answer_weight are both 0: no response token would be learned")
        return answer_weight

    @model_validator(mode="after")
    def _some_weight(self) -> "Loss":
        if self.kd_weight + self.hard_weight <= 0:
            raise ValueError("kd_weight + hard_weight must be positive")
        if "beta" in self.model_fields_set and self.divergence != "jsd":
            raise ValueError(f"beta applies to divergence: jsd only (divergence is {self.divergence})")
        return self


class Optimizer(Strict):
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    layerwise_lr_decay: float = Field(1.0, gt=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    # After the linear warm-up: linear decay towards 0, constant, or cosine decay towards 0.
    schedule: Literal["linear", "constant", "cosine"] = "linear"
    clip_grad_norm: float | None = Field(1.0, gt=0.0)  # null: no clipping


class EarlyStopping(Strict):
    patience: int = Field(ge=1)  # epochs without a lower val loss before a student stops


def _device(value: str) -> str:
    """training.device: auto, cpu, cuda or cuda:N (whether CUDA is there is checked when training starts)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", value):
        raise ValueError(f"{_short(value)} is not a device: use auto, cpu, cuda or cuda:N")
    return value


class OnPolicy(Strict):
    """training.on_policy: a share of optimizer steps learn from each student's own samples, scored by the
    local teacher (GKD; engine/train/on_policy.py)."""
    share: float = Field(gt=0.0, le=1.0)  # of optimizer steps, drawn per step from training.seed
    max_new_tokens: int | None = Field(None, ge=1, le=4096)  # per sampled response; default: the teacher's
    temperature: float = Field(1.0, gt=0.0)  # the students' sampling temperature
    # D(teacher || student) on the sampled tokens, tempered at training.loss.temperature, times T^2.
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "reverse_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _beta_for_jsd(self) -> "OnPolicy":
        if "beta" in self.model_fields_set and self.divergence != "jsd":
            raise ValueError(f"beta applies to divergence: jsd only (divergence is {self.divergence})")
        return self


class Training(Strict):
    student_prompt: TemplateSource | None = None  # Jinja2 over the row: what the student sees
    # How the student reads it, as teacher.chat/system/messages do; unset: the teacher's (system and
    # messages only where the student reads a chat); `student_system: null`, `student_messages: []`: none.
    student_chat: bool | None = None
    student_system: TemplateSource | None = None
    student_messages: list[Turn] | None = None
    loss: Loss = Loss()
    optimizer: Optimizer = Optimizer()
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop early: for smoke runs and tests
    grad_accum: int = Field(1, ge=1)  # micro-batches of batch_size per optimizer step
    early_stopping: EarlyStopping | None = None  # on the val loss, checked after every epoch
    keep: Literal["last", "best"] | None = None  # saved weights; default best with early_stopping, else last
    seed: int = 0
    # Train each student once per seed (each replaces `seed`); eval reports mean and min–max over them.
    seeds: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    # Optimizer steps between checkpoints (model, optimizer, schedules, RNG, batch order) that an interrupted
    # `syllabus train` resumes from; null: none. Neither this nor `device` is part of the run id (runs.training_hash).
    checkpoint_every: int | None = Field(50, ge=1)
    # auto: cuda if available, else cpu. On CUDA with bf16, forwards run under bf16 autocast (losses in float32).
    device: Annotated[str, AfterValidator(_device)] = "cpu"
    # stored: the dataset's top-k (or sampled) log-probs. online: the loop runs the (local) teacher over its
    # own prompt and the response, and distils its full-vocabulary distribution (engine/train/online.py).
    teacher_signal: Literal["stored", "online"] = "stored"
    on_policy: OnPolicy | None = None  # null: every step learns from the dataset (or the online teacher)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds


class Eval(Strict):
    split: Literal["train", "val", "test"] = "test"
    # Labelled sets reported beside the split, as written: never deduplicated, mined or selected.
    sources: list[Source] = []
    max_new_tokens: int | None = Field(None, ge=1)  # default: the teacher's max_new_tokens
    speed_prompts: int = Field(3, ge=1)  # prompts timed for batch-1 decode speed
    speed_tokens: int = Field(32, ge=1)  # tokens decoded per timed prompt

    @field_validator("sources")
    @classmethod
    def _labelled(cls, sources: list[Source]) -> list[Source]:
        bare = [str(i) for i, src in enumerate(sources) if not src.label]
        if bare:
            raise ValueError(f"{'item' if len(bare) == 1 else 'items'} {', '.join(bare)} without `label:`; "
                             "an eval source needs the column of gold answers it is scored against")
        return sources


class Executor(Strict):
    """Where the per-row stages run (engine/curate/executors.py); rows are the same either way."""
    kind: Literal["local", "ray"] = "local"
    address: str = "auto"  # a running Ray cluster: auto (the one this machine started) or HOST:PORT
    actors: int = Field(2, ge=1)  # Ray actors per stage, each loading the teacher or embedder once
    batch_size: int = Field(16, ge=1)  # rows per Ray batch (teach: rounded up to whole teacher batches)
    num_cpus: float = Field(1.0, gt=0)  # CPUs each actor reserves
    retries: int = Field(3, ge=0)  # restarts of a dead actor, and retries of its batch

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value != "auto" and not re.fullmatch(r"[A-Za-z0-9.\-]+:\d{1,5}", value):
            raise ValueError(f"{value[:80]!r}: auto or HOST:PORT")
        return value


class Spec(Strict):
    name: Annotated[str, _name(DATASET_NAME, "a letter or digit, then letters, digits, '_' or '-'")]
    teacher: Teacher
    ensemble: Ensemble | None = None  # more teachers beside `teacher:` (engine/stages/ensemble.py)
    sources: list[Source] = Field(min_length=1)
    coverage: Coverage | None = None
    augment: list[Augment] = []
    embed: Embed = Embed()
    dedup: Dedup = Dedup()
    diversity: Diversity | None = None
    mining: Mining = Mining()
    splits: Splits = Splits()
    teach: Teach = Teach()
    students: list[Student] = []
    training: Training = Training()
    eval: Eval = Eval()
    executor: Executor = Executor()

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

    @model_validator(mode="after")
    def _student_chat_only(self) -> "Spec":
        training = self.training
        chat = self.teacher.chat if training.student_chat is None else training.student_chat
        if not chat:
            given = [f for f in ("student_system", "student_messages") if getattr(training, f)]
            if given:
                said = "training.student_chat is false" if training.student_chat is False else \
                    "the student reads plain text (teacher.chat: false, training.student_chat unset)"
                raise ValueError(f"training.{given[0]}: {said}: {PLAIN_TEXT}")
        return self

    @model_validator(mode="after")
    def _selection_order_needs_quotas(self) -> "Spec":
        if self.teach.order == "selection" and self.coverage is None:
            raise ValueError("teach.order: selection asks the teacher in the order selection keeps rows, "
                             "until each category's quota is filled: it needs coverage (categories and quotas)")
        return self

    @model_validator(mode="after")
    def _hidden_needs_local_teacher(self) -> "Spec":
        if self.training.loss.hidden is not None and self.teacher.backend != "transformers":
            raise ValueError(f"training.loss.hidden: hidden-state distillation needs the teacher's weights "
                             f"(teacher.backend: transformers); the {self.teacher.backend} backend gives only "
                             "tokens and log-probs")
        return self

    @model_validator(mode="after")
    def _online_and_sampled_need_local_teacher(self) -> "Spec":
        backend = self.teacher.backend
        if self.training.teacher_signal == "online" and backend != "transformers":
            raise ValueError(f"training.teacher_signal: online runs the teacher over every training batch for its "
                             f"full-vocabulary distribution: it needs teacher.backend: transformers; the {backend} "
                             "backend (a server) gives no prompt log-probs")
        if self.training.on_policy is not None and backend != "transformers":
            raise ValueError(f"training.on_policy has the teacher score the students' own samples over its full "
                             f"vocabulary: it needs teacher.backend: transformers; the {backend} backend (a server) "
                             "gives no prompt log-probs")
        if self.teacher.logprobs.mode == "sampled":
            if backend != "transformers":
                raise ValueError(f"teacher.logprobs.mode: sampled draws ids from the teacher's full distribution: "
                                 f"it needs teacher.backend: transformers; the {backend} backend returns top-k, "
                                 "not draws")
            if self.ensemble is not None:
                raise ValueError("teacher.logprobs.mode: sampled cannot go with ensemble: the members' top-k "
                                 "would be mixed into the teacher's draws, which are no longer unbiased")
            if self.mining.confidence in SAMPLED_WITHOUT:
                raise ValueError(f"mining.confidence: {self.mining.confidence} needs the teacher's top-k "
                                 "(teacher.logprobs.mode: topk); sampled targets leave it empty (engine/stages/"
                                 "confidence.py); mean_token_prob, min_token_prob and answer_prob are exact with both")
        return self

    @model_validator(mode="after")
    def _student_sources_need_local_teacher(self) -> "Spec":
        for i, src in enumerate(self.sources):
            if src.student is None:
                continue
            if self.teacher.backend != "transformers":
                raise ValueError(f"sources[{i}].from: the teacher scores the student's own tokens teacher-forced: "
                                 f"it needs teacher.backend: transformers; the {self.teacher.backend} backend "
                                 "(a server) scores no response it did not write")
            if self.teacher.logprobs.mode != "topk":
                raise ValueError(f"sources[{i}].from: the teacher scores the student's tokens by its top-k: "
                                 "teacher.logprobs.mode: sampled cannot go with a students: source")
        return self

    @model_validator(mode="after")
    def _ensemble(self) -> "Spec":
        if self.mining.confidence == "teacher_agreement":
            if self.ensemble is None:
                raise ValueError("mining.confidence: teacher_agreement is the share of several teachers giving the "
                                 "teacher's answer: it needs ensemble.members")
            if self.teach.order == "selection":
                raise ValueError("mining.confidence: teacher_agreement is known only once every ensemble member has "
                                 "answered, but teach.order: selection decides while the teacher answers: use "
                                 "teach.order: all, or another measure")
        for i, member in enumerate(self.ensemble.resolved(self.teacher) if self.ensemble else ()):
            if getattr(member, "samples", 1) > 1:
                raise ValueError(f"ensemble.members[{i}].samples: a member gives one answer per prompt (its "
                                 "agreement with the teacher's); samples are teacher.samples")
            given = [f for f in ("system", "messages") if f in self.ensemble.members[i].model_fields_set
                     and getattr(member, f)]
            if given and not member.chat:  # chat: false taken from the teacher
                raise ValueError(f"ensemble.members[{i}].{given[0]}: the member reads plain text (teacher.chat: "
                                 f"false, its own chat unset): {PLAIN_TEXT}")
        return self

    @model_validator(mode="after")
    def _samples_for_self_consistency(self) -> "Spec":
        if self.mining.confidence != "self_consistency":
            return self
        if self.teacher.samples < 2:
            raise ValueError("mining.confidence: self_consistency compares several answers per prompt: set "
                             "teacher.samples to 2 or more (with teacher.generation.temperature > 0)")
        if self.teach.order == "selection":
            raise ValueError("mining.confidence: self_consistency cannot go with teach.order: selection, which "
                             "decides from each row's first answer alone: use teach.order: all")
        return self

    @model_validator(mode="after")
    def _reasoning_weight_needs_marker(self) -> "Spec":
        if self.training.loss.reasoning_weight != 1.0 and self.teacher.reasoning is None:
            raise ValueError("training.loss.reasoning_weight: without teacher.reasoning (an answer marker) every "
                             "response token is an answer token: set teacher.reasoning or drop reasoning_weight")
        return self

    @model_validator(mode="after")
    def _options_used(self) -> "Spec":
        categories = self.coverage.categories.values() if self.coverage else ()
        some = any(s.options for s in self.sources) or any(c.options for c in categories)
        measure = self.mining.confidence
        if measure in OPTION_MEASURES and not some:
            raise ValueError(f"mining.confidence: {measure} is a measure over the teacher's distribution on a fixed "
                             "answer set: it needs options on a source or a coverage category")
        if measure in OPTION_MEASURES and self.teach.order == "selection":
            raise ValueError(f"mining.confidence: {measure} is scored after the teacher has answered, but "
                             "teach.order: selection decides while it answers: use teach.order: all, or another measure")
        if self.training.loss.kd_target == "options" and not some:
            raise ValueError("training.loss.kd_target: options distils the teacher's distribution on a fixed answer "
                             "set: it needs options on a source or a coverage category")
        named: dict[str, int] = {}  # a row knows its source by name (Source.origin): one name, one answer set
        for i, src in enumerate(self.sources):
            j = named.setdefault(src.origin, i)
            if self.sources[j].options != src.options:
                raise ValueError(f"sources[{i}].options: sources[{j}] and sources[{i}] both name their rows "
                                 f"{src.origin!r} but their options differ: give them the same options, or set "
                                 "options on their coverage categories")
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
        return resolve(relative, self.path)


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] = f"{parts[-1]}[{item}]"
        elif not str(item).startswith("function-"):
            parts.append(str(item))
    return ".".join(parts)


def _problem(where: str, err: dict) -> str:
    """One pydantic error as one line: file, field path, message."""
    loc, msg = err["loc"], err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "invalid_key" or loc[-1:] == ("[key]",):  # a mapping key, e.g. `1: 2` in YAML
        loc = loc[:-2] if loc[-1:] == ("[key]",) else loc[:-1]
        # A key of the wrong type: only string-keyed mappings mean "not a string" (layer_map's keys are ints).
        msg = (f"key {err['input']!r} is not a string" if err["type"] in ("invalid_key", "string_type")
               else f"key {err['input']!r}: {msg}")
    field = _field_path(loc)
    return " ".join(f"{where}: {field + ': ' if field else ''}{msg}".split())  # one line, whatever the input held


def parse_spec(data: object, *, path: Path | None = None, text: str = "", check_files: bool = False) -> Spec:
    """A Spec from parsed YAML; every problem at once, one line each (SpecError.lines).

    check_files: files the spec names must exist (load_spec; a scaffold checks before writing them).
    """
    where = str(path) if path else "<spec>"
    if not isinstance(data, dict):
        raise SpecError(f"{where}: the spec must be a mapping of keys to values")
    try:
        spec = Spec.model_validate(data, context={"spec_path": path, "check_files": check_files})
    except ValidationError as e:
        raise SpecError("\n".join(dict.fromkeys(_problem(where, err) for err in e.errors()))) from None
    return spec.model_copy(update={"path": path, "text": text})


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing what it lets through silently or with a traceback."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden: that is what it is for
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in first_line:  # the last one would silently win
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first_line[key]})", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
            except TypeError:
                pass  # an unhashable key: SafeLoader says so
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # over Python's int-string limit, raised without a line
            raise yaml.constructor.ConstructorError(
                None, None, f"integer over {sys.get_int_max_str_digits()} digits", node.start_mark) from None


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _SpecLoader.construct_yaml_int)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # a folder, a name too long for the OS, no permission
        raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{path}:{line} invalid YAML: {problem}") from None
    except RecursionError:
        raise SpecError(f"{path}: invalid YAML: nested too deeply") from None
    return parse_spec(data, path=path, text=text, check_files=True)
