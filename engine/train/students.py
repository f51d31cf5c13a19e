"""Build students from the teacher: layer subsets, fresh configs, or local models.

Every student shares the teacher's tokenizer, so the stored top-k ids index its
vocabulary directly; that is checked where it is not true by construction.
"""

from __future__ import annotations

import copy
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from engine.models import ModelError
from engine.spec import Spec, SpecError, Student


def build_student(spec: Spec, student: Student, teacher, tokenizer):
    """A float32 causal LM for `student`; `teacher` is the loaded teacher model."""
    torch.manual_seed(spec.training.seed)  # seeded init: same spec, same student
    if student.kind == "from_teacher":
        model = _from_teacher(spec, student, teacher)
    elif student.kind == "config":
        model = _from_config(student, teacher)
    else:
        model = _from_folder(spec, student, tokenizer)
    return model.float()


def _from_teacher(spec: Spec, student: Student, teacher):
    """The teacher with only the chosen decoder layers (in the given order), as DistilBERT did."""
    layers = student.from_teacher.layers
    n = teacher.config.num_hidden_layers
    bad = [i for i in layers if i >= n]
    if bad:
        where = spec.path or "<spec>"
        i = spec.students.index(student)
        raise SpecError(f"{where}: students[{i}].from_teacher.layers: student {student.name!r}: layer "
                        f"{bad[0]} is out of range, the teacher has {n} layers (0-{n - 1})")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds follow the layers
        config.layer_types = [config.layer_types[i] for i in layers]
    # A fresh model (rather than slicing a copy) numbers its layers 0..n-1 for the KV cache.
    model = type(teacher)(config)
    renumber = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.", key)
        if m is None:
            state[key] = value
        elif m.group(0) in renumber:
            state[renumber[m.group(0)] + key[m.end():]] = value
    model.load_state_dict(state, strict=True)
    model.generation_config = copy.deepcopy(teacher.generation_config)
    return model


def _from_config(student: Student, teacher):
    """A fresh Llama of the requested shape, speaking the teacher's vocabulary and positions."""
    t, c = teacher.config, student.config
    config = LlamaConfig(
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
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    return model


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
