"""Build students from the teacher: pruned copies (engine/train/prune.py), fresh configs, or local models.

Every student shares the teacher's tokenizer, so the stored top-k ids index its
vocabulary directly; that is checked where it is not true by construction. The exception is a
from_teacher student with `vocab:` (engine/train/vocab.py): it carries its own trimmed tokenizer
and an id map (`model.vocab_map`) through which the trainer remaps each batch.
"""

from __future__ import annotations

import copy
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from engine.models import ModelError
from engine.spec import Spec, Student
from engine.train import prune


def build_student(spec: Spec, student: Student, teacher, tokenizer, calibration: list[list[int]] | None = None,
                  dataset_ids: set[int] | None = None):
    """A float32 causal LM for `student`; `teacher` is the loaded teacher model.

    calibration: the train split's sequences as token ids (student context + teacher response),
    on which a from_teacher student's importance is measured (keep_layers, widths). A
    from_teacher student carries what was kept and why as `model.pruning_report` (a dict for
    metrics.json; its "summary" is one line to print). dataset_ids: the teacher ids the train and
    val examples use (engine.train.vocab.dataset_ids), which a trimmed vocabulary keeps; a student
    with `vocab:` also carries `model.vocab_map` (its own tokenizer and the teacher -> student id map).
    """
    torch.manual_seed(spec.training.seed)  # seeded init: same spec, same student
    if student.kind == "from_teacher":
        pad = getattr(tokenizer, "pad_token_id", None)
        model, report = prune.from_teacher(spec, student, teacher, calibration, pad, tokenizer, dataset_ids)
        model.pruning_report = report
    elif student.kind == "config":
        model = _from_config(student, teacher)
    else:
        model = _from_folder(spec, student, tokenizer)
    return model.float()


def student_shape(spec: Spec, student: Student, teacher_config=None, tokenizer=None) -> tuple[int, float]:
    """(parameters, parameters / the teacher's) of `student`, from configs alone: no weights are read.

    teacher_config: the teacher's HF config (default: read from spec.teacher.model, with its tokenizer).
    A from_teacher shape the teacher cannot give raises SpecError naming the field, as building it would.
    A trimmed vocabulary's size depends on the dataset, so it is counted at its floor (a lower bound:
    engine.train.vocab.size_floor, specials + bytes + keep_frequent merges with their closure given the
    teacher's tokenizer, else keep_frequent alone); the dataset's own ids come on top.
    """
    from transformers import AutoConfig

    from engine.models import load_tokenizer, resolve_causal_lm

    if teacher_config is None:
        teacher_config = AutoConfig.from_pretrained(resolve_causal_lm(spec.teacher.model))
        if student.kind == "from_teacher" and student.from_teacher.vocab is not None and tokenizer is None:
            tokenizer = load_tokenizer(spec.teacher.model)
    if student.kind == "from_teacher":
        target = prune.targets(spec, student, teacher_config)
        layers = target.layers or list(range(target.keep_layers))  # which layers does not change the count
        config = target.config(teacher_config, layers)
        if student.from_teacher.vocab is not None:
            from engine.train import vocab

            try:
                config.vocab_size = vocab.size_floor(student.from_teacher.vocab.keep_frequent,
                                                     teacher_config.vocab_size, tokenizer)
            except vocab.NotTrimmable as e:
                raise prune.field_error(spec, student, "vocab", str(e)) from None
            config.pad_token_id = None  # its id is remapped; it does not change the count
    elif student.kind == "config":
        config = _config(student, teacher_config)
    else:
        path = spec.resolve_path(student.model)
        if not (path / "config.json").is_file():
            raise ModelError(f"student {student.name!r}: {path} is not a local HF model folder (no config.json)")
        config = AutoConfig.from_pretrained(path)
    params = _meta_params(config)
    return params, params / _meta_params(teacher_config)


def _meta_params(config) -> int:
    """Parameters of a model of this config, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return prune.count_params(model)


def _from_config(student: Student, teacher):
    """A fresh Llama of the requested shape, speaking the teacher's vocabulary and positions."""
    config = _config(student, teacher.config)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    return model


def _config(student: Student, t) -> LlamaConfig:
    c = student.config
    return LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads or c.num_heads,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters=copy.deepcopy(getattr(t, "rope_parameters", None)),
        rms_norm_eps=getattr(t, "rms_norm_eps", 1e-6),
        hidden_act=getattr(t, "hidden_act", "silu"),
        tie_word_embeddings=getattr(t, "tie_word_embeddings", True),
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id,
    )


def _from_folder(spec: Spec, student: Student, tokenizer):
    """A local HF causal LM; it must speak the teacher's vocabulary."""
    path = spec.resolve_path(student.model)
    if not (path / "config.json").is_file():
        raise ModelError(f"student {student.name!r}: {path} is not a local HF model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ModelError(f"student {student.name!r}: its vocabulary has {rows} ids but the teacher's tokenizer "
                         f"has {len(tokenizer)}; students must share the teacher's tokenizer")
    if any(path.glob("tokenizer*")):
        own = AutoTokenizer.from_pretrained(path)
        if own.get_vocab() != tokenizer.get_vocab():
            raise ModelError(f"student {student.name!r}: its tokenizer differs from the teacher's; "
                             "students must share the teacher's tokenizer")
    return model


def lr_depths(model, kind: str) -> list[tuple[int, list[torch.nn.Parameter]]]:
    """(depth, params) groups for layer-wise lr decay: a group's lr is lr * decay**depth.

    For pretrained students (from_teacher, model) layer i of L has depth L-1-i, the
    embeddings depth L (lowest lr: the most general features), the final norm and head
    depth 0 (full lr). Tied embeddings count as embeddings. Fresh (config) students
    have nothing to preserve: every parameter has depth 0.
    """
    n_layers = model.config.num_hidden_layers
    groups: dict[int, list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        m = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", name)
        if kind == "config":
            depth = 0
        elif m:
            depth = n_layers - 1 - int(m.group(1))
        elif "embed" in name or re.search(r"\bw[tp]e\b", name):
            depth = n_layers
        else:
            depth = 0
        groups.setdefault(depth, []).append(param)
    return sorted(groups.items())
