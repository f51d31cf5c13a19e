"""Vocabulary trimming for from_teacher students: a smaller tokenizer, sliced embeddings, an id map.

`from_teacher: {vocab: {keep_frequent: N}}` keeps, of the teacher's byte-level BPE vocabulary:

  used      every id the dataset's train and val examples use as the trainer encodes them: the
            student's prompt ids (chat template included), the teacher's response token ids, and
            each position's top-1 stored id (the teacher's likeliest; the response token itself
            under greedy decoding). Keeping the top-1 keeps the losses' rule that top-k slot 0 is
            always present; the other top-k ids are kept only if something else keeps them.
  frequent  the N earliest BPE merges' tokens (lowest merge rank: the most frequent pairs of the
            tokenizer's training corpus; their ids are the lowest after the bytes).
  base      every added/special token (and the config's bos/eos/pad/unk ids) and every byte-level
            base token, so any text the teacher can tokenize still tokenizes;
            and the closure: for each kept token made by a merge "a b", a and b are kept too
            (transitively).

The trimmed tokenizer is the teacher's with the vocabulary cut to the kept tokens and every
merge whose result is not kept removed (rank order unchanged). Because the kept set is closed
under merges, BPE on a word whose teacher tokenization used kept tokens only applies the very
same merges in the same order, so such text tokenizes to the same tokens; any other text falls
back to shorter kept tokens (down to bytes) and still round-trips. Student ids are dense 0..K-1
in the teacher's order (student id i is teacher id kept[i]), so specials keep their relative order.

The trainer still encodes everything with the teacher's tokenizer; `VocabMap.remap` turns a
collated batch into student ids (inputs and targets must all be kept, which holds by
construction), and folds top-k ids the student lacks into the tail bucket: their slot becomes
absent (log-prob -inf, id of slot 0, as collate pads a ragged k), so the teacher's tail is
1 - sum of its kept top-k probabilities, and the student's tail sums over every id of its own
vocabulary outside the kept top-k.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field

import torch

from engine.errors import TrainError


class NotTrimmable(ValueError):
    """The teacher's tokenizer cannot be trimmed (the caller names the spec field)."""


_CONFIG_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")


# --- reading the teacher's tokenizer ----------------------------------------------------------------


def _byte_level(node) -> bool:
    """Whether a pre-tokenizer (possibly a Sequence of them) is byte-level."""
    if not isinstance(node, dict):
        return False
    if node.get("type") == "ByteLevel":
        return True
    return any(_byte_level(p) for p in node.get("pretokenizers") or [])


def _merge_pair(merge) -> tuple[str, str]:
    if isinstance(merge, str):  # the older "a b" form
        a, b = merge.split(" ", 1)
        return a, b
    return merge[0], merge[1]


def backend_json(tokenizer) -> dict:
    """The teacher's tokenizer.json as a dict; NotTrimmable unless it is a fast byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotTrimmable(f"the teacher's tokenizer ({type(tokenizer).__name__}) is not a fast (tokenizers) "
                           "tokenizer; only a byte-level BPE vocabulary can be trimmed")
    tj = json.loads(backend.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise NotTrimmable(f"the teacher's tokenizer is a {model.get('type')} model; only a byte-level BPE "
                           "vocabulary can be trimmed")
    if not _byte_level(tj.get("pre_tokenizer")):
        raise NotTrimmable("the teacher's BPE tokenizer is not byte-level (no ByteLevel pre-tokenizer), so "
                           "trimming it could leave text it cannot tokenize")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise NotTrimmable("the teacher's BPE tokenizer uses subword prefixes, suffixes or dropout; only a "
                           "plain byte-level BPE vocabulary can be trimmed")
    return tj


def _byte_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return list(ByteLevel.alphabet())


# --- choosing what to keep --------------------------------------------------------------------------


@dataclass
class Plan:
    kept: list[int]  # teacher ids, ascending: student id i is teacher id kept[i]
    teacher_size: int  # the teacher's vocabulary (tokenizer) size
    used: int  # ids the dataset uses
    frequent: int  # earliest-merged ids kept on top of those
    base: int  # specials, bytes and the merge closure on top of both

    @property
    def size(self) -> int:
        return len(self.kept)

    def summary(self) -> str:
        return (f"vocab {self.teacher_size} -> {self.size} ({self.used} used by the dataset + {self.frequent} "
                f"frequent + {self.base} specials/bytes/closure)")


def _ids_in(config, names=_CONFIG_TOKEN_IDS) -> set[int]:
    out: set[int] = set()
    for name in names:
        value = getattr(config, name, None) if config is not None else None
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v >= 0:
                out.add(v)
    return out


def plan(tokenizer, tj: dict, used_ids, keep_frequent: int, configs=()) -> Plan:
    """The kept ids: used + keep_frequent earliest merges + specials/bytes, closed under merges."""
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    by_id = {i: s for s, i in vocab.items()}
    added = {t["id"] for t in tj.get("added_tokens") or []}
    size = max([len(tokenizer), *(i + 1 for i in by_id), *(i + 1 for i in added)])
    known = set(by_id) | added

    used = {int(i) for i in used_ids}
    strangers = sorted(used - known)
    if strangers:
        raise TrainError(f"the dataset holds token id {strangers[0]}, which the teacher's tokenizer does not "
                         f"have ({len(strangers)} such ids): a trimmed vocabulary cannot represent it")
    base = set(added) | {i for i in tokenizer.all_special_ids if i in known}
    for config in configs:
        base |= _ids_in(config) & known
    base |= {vocab[c] for c in _byte_alphabet() if c in vocab}  # the teacher's own bytes (it may lack a few)

    merges = [_merge_pair(m) for m in model.get("merges") or []]
    frequent: list[int] = []
    seen = set()
    for a, b in merges:
        if len(frequent) >= keep_frequent:
            break
        i = vocab.get(a + b)
        if i is not None and i not in seen:
            seen.add(i)
            frequent.append(i)

    kept = used | set(frequent) | base
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        producers.setdefault(a + b, []).append((a, b))
    stack = [by_id[i] for i in kept if i in by_id]
    while stack:  # closure: every constituent of a kept merge result is kept
        for pair in producers.get(stack.pop(), ()):
            for part in pair:
                i = vocab.get(part)
                if i is not None and i not in kept:
                    kept.add(i)
                    stack.append(part)
    n_frequent = len(set(frequent) - used)
    return Plan(sorted(kept), size, len(used), n_frequent, len(kept) - len(used) - n_frequent)


def size_floor(keep_frequent: int, vocab_size: int, tokenizer=None) -> int:
    """A lower bound on K before the dataset is known: specials + bytes + keep_frequent merges + their
    closure when the teacher's tokenizer is at hand, else keep_frequent alone (capped at the vocabulary).
    The dataset's own ids come on top."""
    if tokenizer is None:
        return min(vocab_size, keep_frequent)
    return plan(tokenizer, backend_json(tokenizer), (), keep_frequent).size


# --- the trimmed tokenizer -----------------------------------------------------------------------


def _remap_special_tokens(node, old2new: dict[int, int]):
    """Post-processor ids (TemplateProcessing special_tokens, Bert/Roberta cls/sep) in student ids."""
    if isinstance(node, list):
        return [_remap_special_tokens(x, old2new) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "special_tokens" and isinstance(value, dict):
            value = {name: {**entry, "ids": [old2new[i] for i in entry.get("ids", [])]} for name, entry in value.items()}
        elif key in ("cls", "sep") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
            value = [value[0], old2new[value[1]]]
        else:
            value = _remap_special_tokens(value, old2new)
        out[key] = value
    return out


def build_tokenizer(tokenizer, tj: dict, kept: list[int]):
    """A PreTrainedTokenizerFast over the kept ids (dense, in the teacher's order): same pre-tokenizer,
    decoder, added tokens, special tokens and chat template as the teacher's."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    old2new = {old: new for new, old in enumerate(kept)}
    tj = copy.deepcopy(tj)
    model = tj["model"]
    model["vocab"] = {s: old2new[i] for s, i in model["vocab"].items() if i in old2new}
    vocab = model["vocab"]
    merges = []
    for m in model.get("merges") or []:
        a, b = _merge_pair(m)
        if a + b in vocab and a in vocab and b in vocab:  # closure: a result kept has its parts kept
            merges.append(m)
    model["merges"] = merges
    tj["added_tokens"] = [{**t, "id": old2new[t["id"]]} for t in tj.get("added_tokens") or []]
    tj["post_processor"] = _remap_special_tokens(tj.get("post_processor"), old2new)
    if isinstance(tj.get("padding"), dict) and tj["padding"].get("pad_id") in old2new:
        tj["padding"]["pad_id"] = old2new[tj["padding"]["pad_id"]]
    backend = Tokenizer.from_str(json.dumps(tj))
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    extra = list(getattr(tokenizer, "extra_special_tokens", None) or [])
    kwargs = {"extra_special_tokens": extra} if extra else {}
    trimmed = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=tokenizer.chat_template,
                                      model_max_length=tokenizer.model_max_length,
                                      padding_side=tokenizer.padding_side, **specials, **kwargs)
    if len(trimmed) != len(kept):
        raise NotTrimmable(f"the trimmed tokenizer has {len(trimmed)} ids where {len(kept)} were kept")
    return trimmed


# --- the id map ----------------------------------------------------------------------------------


@dataclass
class VocabMap:
    """Teacher ids -> a trimmed student's ids; carried by the student model as `model.vocab_map`."""
    kept: torch.Tensor  # [K] long: student id -> teacher id
    to_student: torch.Tensor  # [V] long: teacher id -> student id, or -1 when the student lacks it
    tokenizer: object = None  # the student's own tokenizer (saved beside its weights)
    plan: Plan | None = field(default=None, repr=False)

    @classmethod
    def from_kept(cls, kept: list[int], teacher_size: int, tokenizer=None, plan: Plan | None = None) -> "VocabMap":
        kept_t = torch.tensor(kept, dtype=torch.long)
        to_student = torch.full((max(teacher_size, int(kept_t.max()) + 1),), -1, dtype=torch.long)
        to_student[kept_t] = torch.arange(len(kept), dtype=torch.long)
        return cls(kept_t, to_student, tokenizer, plan)

    @property
    def size(self) -> int:
        return len(self.kept)

    def _table(self, device: torch.device) -> torch.Tensor:
        """to_student on `device` (the batch's: on CUDA the trainer moves batches, not this map)."""
        if self.to_student.device != device:
            self.to_student, self.kept = self.to_student.to(device), self.kept.to(device)
        return self.to_student

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Student ids of teacher ids, -1 for those it lacks (or outside the teacher's vocabulary)."""
        table = self._table(ids.device)
        inside = (ids >= 0) & (ids < len(table))
        return torch.where(inside, table[ids.clamp(0, len(table) - 1)], -1)

    def ids(self, ids: torch.Tensor, what: str) -> torch.Tensor:
        """Student ids of teacher ids that must all be kept (TrainError naming one that is not)."""
        mapped = self._lookup(ids)
        if (mapped < 0).any():
            bad = int(ids[mapped < 0].flatten()[0])
            raise TrainError(f"{what}: teacher token {bad} is not in the student's trimmed vocabulary "
                             f"({int((mapped < 0).sum())} such tokens)")
        return mapped

    def remap(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated batch (engine.train.data.collate) in student ids; top-k ids it lacks fold into the tail."""
        self._table(batch["input_ids"].device)
        attention = batch["attention_mask"].bool()
        inputs = torch.where(attention, batch["input_ids"], self.kept[0])  # padding: any kept id (it is masked)
        out = dict(batch)
        out["input_ids"] = self.ids(inputs, "training input")
        out["targets"] = self.ids(batch["targets"], "a teacher response token")
        mapped = self._lookup(batch["topk_ids"])
        lps = batch["topk_logprobs"].masked_fill(mapped < 0, float("-inf"))
        # Present slots first (stable), so slot 0 is present whenever any is: the losses point absent
        # slots at slot 0's id, which must be one the tail does not count.
        order = (~torch.isfinite(lps)).to(torch.int8).argsort(dim=-1, stable=True)
        mapped, lps = mapped.gather(-1, order), lps.gather(-1, order)
        if lps.shape[0] and not torch.isfinite(lps[:, 0]).all():
            raise TrainError("a response position keeps none of the teacher's top-k ids in the student's trimmed "
                             "vocabulary (the top-1 id is kept by construction)")
        out["topk_ids"] = torch.where(torch.isfinite(lps), mapped, mapped[:, :1])
        out["topk_logprobs"] = lps
        return out


def remap_for(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch in `model`'s ids: unchanged unless it carries a trimmed vocabulary (`model.vocab_map`)."""
    vocab_map = getattr(model, "vocab_map", None)
    return batch if vocab_map is None else vocab_map.remap(batch)


def dataset_ids(encoded) -> set[int]:
    """Ids the encoded examples (engine.train.data.Encoded) use: prompt, response and each top-1 id."""
    ids: set[int] = set()
    for e in encoded:
        ids.update(e.prompt_ids)
        ids.update(e.token_ids)
        ids.update(row[0] for row in e.topk_ids if row)
    return ids


# --- the model -----------------------------------------------------------------------------------


def _map_token_ids(config, old2new: dict[int, int]) -> None:
    for name in _CONFIG_TOKEN_IDS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            setattr(config, name, old2new.get(value))
        elif isinstance(value, (list, tuple)):
            setattr(config, name, [old2new[v] for v in value if v in old2new])


def slice_model(model, kept: list[int]):
    """A model of the same class whose embedding (and untied head) rows are the kept ids, with
    vocab_size and the bos/eos/pad ids of its config and generation config in student ids."""
    old2new = {old: new for new, old in enumerate(kept)}
    config = copy.deepcopy(model.config)
    config.vocab_size = len(kept)
    _map_token_ids(config, old2new)
    rows = torch.tensor(kept, dtype=torch.long)
    state = {}
    for key, value in model.state_dict().items():
        if key in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            value = value[rows]
        state[key] = value
    with torch.device("meta"):  # no init: every tensor comes from the state dict
        sliced = type(model)(config)
    sliced.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        sliced.tie_weights()
    originals = dict(model.named_buffers())
    for name, buffer in list(sliced.named_buffers()):  # non-persistent buffers (rotary inv_freq): the teacher's
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            setattr(sliced.get_submodule(owner), leaf, originals[name].clone())
    generation = copy.deepcopy(model.generation_config)
    if generation is not None:
        _map_token_ids(generation, old2new)
    sliced.generation_config = generation
    return sliced


@dataclass
class Trim:
    plan: Plan
    vocab_map: VocabMap
    seconds: float

    def report(self, keep_frequent: int) -> dict:
        p = self.plan
        return {"teacher": p.teacher_size, "kept": p.size, "used": p.used, "frequent": p.frequent, "base": p.base,
                "keep_frequent": keep_frequent, "seconds": round(self.seconds, 3), "summary": p.summary()}


def trim(tokenizer, used_ids, keep_frequent: int, configs=()) -> Trim:
    """Plan and build the trimmed tokenizer and id map (NotTrimmable when the tokenizer cannot be)."""
    start = time.perf_counter()
    tj = backend_json(tokenizer)
    p = plan(tokenizer, tj, used_ids, keep_frequent, configs)
    trimmed = build_tokenizer(tokenizer, tj, p.kept)
    return Trim(p, VocabMap.from_kept(p.kept, p.teacher_size, trimmed, p), time.perf_counter() - start)
