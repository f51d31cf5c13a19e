"""Teacher-derived compression: drop layers and narrow widths by importance, as Minitron and ShortGPT do.

Importance is measured once, with forward passes of the teacher over a calibration sample
of the dataset's own train sequences (student context + teacher response token ids):

  depth    ShortGPT's block influence: BI_l = mean over tokens of 1 - cos(input_l, output_l).
           keep_layers: N keeps the N layers of highest BI, in the teacher's order. A layer
           that adds nothing to the residual stream has BI 0 and goes first.
  neurons  each MLP intermediate channel: mean over tokens of |a_i| * ||W_down[:, i]||, the norm
           of what the neuron writes into the residual stream. (Minitron scores the activation
           entering down_proj; the column norm makes a neuron whose output weights are zero
           score 0.) Kept per layer, intermediate_size in every layer.
  heads    each query head: mean over tokens of ||W_o[:, head] @ attn_out_head||, the head's
           output norm. GQA: num_heads must stay a multiple of num_kv_heads, so kv_heads < the
           teacher's drops whole kv groups (a group scores the sum of its heads; its k/v rows go
           with it) and heads keeps heads/kv_heads query heads in every kept group, the best of
           that group. Heads never move between groups. head_dim stays the teacher's, so the
           attention width is heads * head_dim whatever hidden_size is (Minitron keeps
           kv_channels the same way).
  hidden   each embedding channel: mean |output| of the RMSNorms that read the residual stream
           (both norms of every kept layer and the final norm), summed. The same channels are
           kept in the embeddings, every norm, every projection and the (tied) head.

The result is a plain model of the teacher's class (LlamaForCausalLM for Llama teachers) with a
consistent config: save_pretrained / from_pretrained round-trip it. With nothing pruned it is the
teacher, weight for weight.

  vocab    `vocab: {keep_frequent: N}` trims the vocabulary last (engine/train/vocab.py): the
           embedding (and untied head) rows of the kept ids, a tokenizer of its own, an id map.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import SpecError
from engine.models import ModelError

CALIBRATION_BATCH = 8  # sequences per teacher forward while measuring importance


# --- targets: what the spec asks of this teacher ----------------------------------------------


@dataclass(frozen=True)
class Targets:
    layers: list[int] | None  # listed layers, in order (None: chosen by importance, or all)
    keep_layers: int  # how many layers the student has
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int

    def config(self, teacher_config, layers: list[int]):
        """The student's config: the teacher's, with these shapes (head_dim kept explicit)."""
        t = teacher_config
        config = copy.deepcopy(t)
        config.num_hidden_layers = len(layers)
        if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds follow the layers
            config.layer_types = [config.layer_types[i] for i in layers]
        if (self.hidden_size, self.intermediate_size, self.heads, self.kv_heads) != _widths(t):
            config.head_dim = head_dim(t)
            config.hidden_size = self.hidden_size
            config.intermediate_size = self.intermediate_size
            config.num_attention_heads = self.heads
            config.num_key_value_heads = self.kv_heads
        return config


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _widths(config) -> tuple[int, int, int, int]:
    return (config.hidden_size, config.intermediate_size, config.num_attention_heads,
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def field_error(spec, student, field: str, message: str) -> SpecError:
    """One line naming students[i].from_teacher.<field> of the spec."""
    where = spec.path or "<spec>"
    i = next((k for k, s in enumerate(spec.students) if s.name == student.name), 0)
    return SpecError(f"{where}: students[{i}].from_teacher.{field}: student {student.name!r}: {message}")


def targets(spec, student, teacher_config) -> Targets:
    """The student's shape against this teacher; SpecError naming the field if it cannot be cut from it."""
    ft = student.from_teacher
    t = teacher_config
    n = t.num_hidden_layers
    t_hidden, t_inter, t_heads, t_kv = _widths(t)

    def bad(field: str, message: str) -> SpecError:
        return field_error(spec, student, field, message)

    if ft.layers is not None:
        out = [i for i in ft.layers if i >= n]
        if out:
            raise bad("layers", f"layer {out[0]} is out of range, the teacher has {n} layers (0-{n - 1})")
    if ft.keep_layers is not None and ft.keep_layers > n:
        raise bad("keep_layers", f"keep_layers {ft.keep_layers} is more than the teacher's {n} layers")
    for field, value, teacher_value in (("hidden_size", ft.hidden_size, t_hidden),
                                        ("intermediate_size", ft.intermediate_size, t_inter),
                                        ("heads", ft.heads, t_heads), ("kv_heads", ft.kv_heads, t_kv)):
        if value is not None and value > teacher_value:
            raise bad(field, f"{field} {value} is larger than the teacher's {teacher_value}; "
                             "pruning can only keep or remove units")
    per_group = t_heads // t_kv
    if ft.heads is None and ft.kv_heads is None:
        heads, kv = t_heads, t_kv
    elif ft.kv_heads is None:  # heads alone: prune query heads within the teacher's kv groups
        heads, kv = ft.heads, t_kv
        if heads % kv:
            raise bad("heads", f"heads {heads} is not divisible by the teacher's {kv} kv heads: heads are pruned "
                               f"evenly within kv groups (give kv_heads to drop whole groups)")
    elif ft.heads is None:  # kv_heads alone: drop whole groups, keeping each group's heads
        heads, kv = ft.kv_heads * per_group, ft.kv_heads
    else:
        heads, kv = ft.heads, ft.kv_heads
    if heads // kv > per_group:
        raise bad("heads", f"heads {heads} over kv_heads {kv} puts {heads // kv} query heads in each kv group; "
                           f"the teacher's groups have {per_group} (heads never move between groups)")
    return Targets(layers=list(ft.layers) if ft.layers is not None else None,
                   keep_layers=len(ft.layers) if ft.layers is not None else (ft.keep_layers or n),
                   hidden_size=ft.hidden_size or t_hidden, intermediate_size=ft.intermediate_size or t_inter,
                   heads=heads, kv_heads=kv)


# --- importance ---------------------------------------------------------------------------------


@dataclass
class Importance:
    block_influence: list[float]  # per teacher layer
    neurons: list[torch.Tensor]  # per layer [intermediate]
    heads: list[torch.Tensor]  # per layer [num_heads]
    channels: list[torch.Tensor]  # per layer [hidden]: both norms' mean |output|
    final_channels: torch.Tensor  # [hidden]: the final norm's
    sequences: int
    tokens: int


def _layers(model):
    return model.model.layers


@torch.no_grad()
def measure_importance(model, sequences: list[list[int]], pad_id: int = 0, batch_size: int = CALIBRATION_BATCH) -> Importance:
    """One forward pass over `sequences` (token ids) with hooks gathering every score above."""
    if not sequences:
        raise ModelError("pruning needs at least one calibration sequence (the train split has none)")
    layers = _layers(model)
    n = len(layers)
    hd = head_dim(model.config)
    f64 = torch.float64
    state: dict = {"mask": None}
    bi = torch.zeros(n, dtype=f64)
    neurons = [None] * n
    heads = [None] * n
    channels = [None] * n
    final = [None]
    handles = []

    def flat(x: torch.Tensor) -> torch.Tensor:  # [B, S, ...] -> [real tokens, ...], float32 per token
        x = x.reshape(-1, *x.shape[2:])
        return (x if state["dense"] else x[state["mask"]]).float()

    def add(store: list, i: int, value: torch.Tensor) -> None:
        store[i] = value if store[i] is None else store[i] + value

    def on_layer(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(flat(x), flat(y), dim=-1)
            bi[i] += (1 - cos).sum(dtype=f64)
        return hook

    def on_down(i):
        def hook(module, args):
            add(neurons, i, flat(args[0]).abs().sum(0, dtype=f64))
        return hook

    def on_o(i, weight):
        # ||W_h x_h||^2 = x_h^T (W_h^T W_h) x_h: a head_dim x head_dim Gram matrix per head, not W_h itself.
        w = weight.detach().float().reshape(weight.shape[0], -1, hd)  # [hidden, heads, head_dim]
        gram = torch.einsum("ohd,ohe->hde", w, w)

        def hook(module, args):
            x = flat(args[0])
            x = x.reshape(x.shape[0], -1, hd)  # [tokens, heads, head_dim]
            squared = torch.einsum("thd,hde,the->th", x, gram, x).clamp_min(0)
            add(heads, i, squared.sqrt().sum(0, dtype=f64))
        return hook

    def on_norm(store, i):
        def hook(module, args, output):
            add(store, i, flat(output).abs().sum(0, dtype=f64))
        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i, layer.self_attn.o_proj.weight)))
            handles.append(layer.input_layernorm.register_forward_hook(on_norm(channels, i)))
            handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm(channels, i)))
        handles.append(model.model.norm.register_forward_hook(on_norm(final, 0)))
        tokens = 0
        was_training = model.training
        model.eval()
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            seq = max(len(s) for s in batch)
            ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), seq), dtype=torch.long)
            for j, s in enumerate(batch):
                ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
                attention[j, : len(s)] = 1
            state["mask"] = attention.reshape(-1).bool()
            state["dense"] = bool(state["mask"].all())  # no padding: skip the gather
            tokens += int(attention.sum())
            model.model(input_ids=ids, attention_mask=attention, use_cache=False)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    neuron_scores = [(neurons[i] / tokens) * layers[i].mlp.down_proj.weight.detach().to(f64).norm(dim=0)
                     for i in range(n)]
    return Importance(block_influence=(bi / tokens).tolist(), neurons=neuron_scores,
                      heads=[h / tokens for h in heads], channels=[c / tokens for c in channels],
                      final_channels=final[0] / tokens, sequences=len(sequences), tokens=tokens)


def calibration_sample(sequences: list[list[int]], n: int, seed: int) -> list[list[int]]:
    """n of the sequences, drawn with the training seed (all of them when there are fewer)."""
    sequences = [list(s) for s in sequences if len(s)]
    if len(sequences) <= n:
        return sequences
    picked = np.random.default_rng(seed).choice(len(sequences), size=n, replace=False)
    return [sequences[i] for i in sorted(picked.tolist())]


# --- choosing and cutting ------------------------------------------------------------------------


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in ascending index order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def _choose_heads(scores: torch.Tensor, t_kv: int, heads: int, kv: int) -> tuple[list[int], list[int]]:
    """(kept query heads, kept kv heads) for one layer: best groups, then the best heads within each."""
    per = len(scores) // t_kv
    groups = scores.reshape(t_kv, per)
    kept_groups = _top(groups.sum(1), kv)
    per_new = heads // kv
    kept = [g * per + j for g in kept_groups for j in _top(groups[g], per_new)]
    return kept, kept_groups


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of these units in a projection whose units are `size` rows each."""
    return torch.tensor([u * size + k for u in units for k in range(size)], dtype=torch.long)


def prune(teacher, target: Targets, importance: Importance | None):
    """(student model, report) cut from `teacher` to `target` by `importance` (None: listed layers only)."""
    t = teacher.config
    n = t.num_hidden_layers
    t_hidden, t_inter, t_heads, t_kv = _widths(t)
    hd = head_dim(t)
    if target.layers is not None:
        layers, by = target.layers, "as listed"
    elif target.keep_layers < n:
        layers, by = _top(torch.tensor(importance.block_influence), target.keep_layers), "block influence"
    else:
        layers, by = list(range(n)), "all"
    narrow = (target.hidden_size, target.intermediate_size, target.heads, target.kv_heads) != (t_hidden, t_inter,
                                                                                                 t_heads, t_kv)
    if narrow and importance is None:
        raise ModelError("width pruning needs importance scores from a calibration sample")
    full = torch.arange
    if target.hidden_size < t_hidden:
        score = importance.final_channels + sum(importance.channels[i] for i in layers)
        hidden = torch.tensor(_top(score, target.hidden_size))
    else:
        hidden = full(t_hidden)
    neurons, q_rows, kv_rows, kept_heads = {}, {}, {}, {}
    for i in layers:
        neurons[i] = (torch.tensor(_top(importance.neurons[i], target.intermediate_size))
                      if target.intermediate_size < t_inter else full(t_inter))
        if (target.heads, target.kv_heads) != (t_heads, t_kv):
            q, kv = _choose_heads(importance.heads[i], t_kv, target.heads, target.kv_heads)
        else:
            q, kv = list(range(t_heads)), list(range(t_kv))
        kept_heads[i] = q
        q_rows[i], kv_rows[i] = _rows(q, hd), _rows(kv, hd)

    config = target.config(t, layers)
    model = type(teacher)(config)  # a fresh model numbers its layers 0..n-1 for the KV cache
    renumber = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)$", key)
        if m is None:
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                value = value[:, hidden]
            elif key == "model.norm.weight":
                value = value[hidden]
            elif narrow and value.dim() > 0 and t_hidden in value.shape:
                raise ModelError(f"cannot narrow {type(teacher).__name__}: unknown parameter {key}")
            state[key] = value
            continue
        old, rest = int(m.group(1)), m.group(2)
        if old not in renumber:
            continue
        if narrow:
            value = _cut(rest, value, hidden, q_rows[old], kv_rows[old], neurons[old], key, teacher)
        state[f"model.layers.{renumber[old]}.{rest}"] = value
    model.load_state_dict(state, strict=True)
    model.generation_config = copy.deepcopy(teacher.generation_config)

    params = count_params(model)
    t_params = count_params(teacher)
    report = {
        "layers": layers,
        "layers_by": by,
        "hidden_size": [t_hidden, config.hidden_size],
        "intermediate_size": [t_inter, config.intermediate_size],
        "heads": [t_heads, config.num_attention_heads],
        "kv_heads": [t_kv, getattr(config, "num_key_value_heads", None) or config.num_attention_heads],
        "params": params,
        "teacher_params": t_params,
        "ratio": round(params / t_params, 4),
    }
    if (target.heads, target.kv_heads) != (t_heads, t_kv):
        report["kept_heads"] = {str(i): kept_heads[i] for i in layers}  # teacher layer -> its kept query heads
    if importance is not None:
        report["block_influence"] = [round(x, 6) for x in importance.block_influence]
        report["dropped_layers"] = sorted(([i, round(importance.block_influence[i], 6)] for i in range(n)
                                           if i not in renumber), key=lambda p: p[1])
        report["calibration"] = {"sequences": importance.sequences, "tokens": importance.tokens}
    return model, report


def _cut(rest: str, value: torch.Tensor, hidden, q_rows, kv_rows, neurons, key: str, teacher) -> torch.Tensor:
    """One decoder-layer tensor narrowed to the kept channels, heads and neurons."""
    name = rest.rsplit(".", 1)
    kind = name[-1]  # weight | bias
    module = name[0]
    if module in ("input_layernorm", "post_attention_layernorm"):
        return value[hidden]
    outputs = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
               "self_attn.o_proj": hidden, "mlp.gate_proj": neurons, "mlp.up_proj": neurons, "mlp.down_proj": hidden}
    inputs = {"self_attn.q_proj": hidden, "self_attn.k_proj": hidden, "self_attn.v_proj": hidden,
              "self_attn.o_proj": q_rows, "mlp.gate_proj": hidden, "mlp.up_proj": hidden, "mlp.down_proj": neurons}
    if module not in outputs:
        raise ModelError(f"cannot narrow {type(teacher).__name__}: unknown parameter {key}")
    value = value[outputs[module]]
    return value[:, inputs[module]] if kind == "weight" else value


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def summary(name: str, report: dict) -> str:
    """One line: what was kept and why."""
    n = len(report.get("block_influence") or []) or None
    parts = []
    layers, by = report["layers"], report["layers_by"]
    if by == "block influence":
        lowest = ", ".join(f"{i} {bi:.3g}" for i, bi in report["dropped_layers"][:3])
        parts.append(f"kept layers {layers} of {n} by block influence (lowest dropped: {lowest})")
    elif by == "as listed":
        parts.append(f"kept layers {layers} as listed")
    for field, label, how in (("hidden_size", "hidden", "activation"), ("intermediate_size", "intermediate", "activation"),
                              ("heads", "heads", "output norm"), ("kv_heads", "kv heads", "group output norm")):
        before, after = report[field]
        if after != before:
            parts.append(f"{label} {before} -> {after} by {how}")
    if report.get("vocab"):
        parts.append(report["vocab"]["summary"])
    parts.append(f"{report['teacher_params'] / 1e6:.2f}M -> {report['params'] / 1e6:.2f}M params ({report['ratio']:.2f}x)")
    if "calibration" in report:
        c = report["calibration"]
        parts.append(f"measured on {c['sequences']} train sequences ({c['tokens']} tokens)")
    return f"{name}: " + "; ".join(parts)


def from_teacher(spec, student, teacher, calibration: list[list[int]] | None = None, pad_id: int | None = None,
                 tokenizer=None, dataset_ids: set[int] | None = None):
    """(model, report) for a from_teacher student; `calibration`: train sequences as token ids.

    With `vocab:`, the vocabulary is trimmed after depth/width pruning (engine/train/vocab.py) to
    `dataset_ids` (default: the ids of `calibration`) plus what vocab.keep_frequent adds, using the
    teacher's `tokenizer`; the model then carries `model.vocab_map` (its own tokenizer and the id map).
    """
    target = targets(spec, student, teacher.config)
    trim = None
    if student.from_teacher.vocab is not None:  # planned first: a tokenizer that cannot be trimmed fails fast
        from engine.train import vocab

        used = dataset_ids if dataset_ids is not None else {i for s in calibration or [] for i in s}
        try:
            trim = vocab.trim(tokenizer, used, student.from_teacher.vocab.keep_frequent,
                              (teacher.config, getattr(teacher, "generation_config", None)))
        except vocab.NotTrimmable as e:
            raise field_error(spec, student, "vocab", str(e)) from None
    importance = None
    if student.from_teacher.needs_calibration:  # keep_layers or a width: importance decides
        if not calibration:
            raise ModelError(f"student {student.name!r}: keep_layers and width pruning measure importance on the "
                             "train split's sequences, and none were given")
        sample = calibration_sample(calibration, student.from_teacher.calibration, spec.training.seed)
        pad = pad_id if pad_id is not None else (teacher.config.pad_token_id or 0)
        importance = measure_importance(teacher, sample, pad)
    model, report = prune(teacher, target, importance)
    if trim is not None:
        from engine.train.vocab import slice_model

        model = slice_model(model, trim.plan.kept)
        model.vocab_map = trim.vocab_map
        report["vocab"] = trim.report(student.from_teacher.vocab.keep_frequent)
        report["params"] = count_params(model)
        report["ratio"] = round(report["params"] / report["teacher_params"], 4)
    report["summary"] = summary(student.name, report)
    return model, report
