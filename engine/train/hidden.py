"""Hidden-state distillation: mapped student layers pulled towards the teacher's (training.loss.hidden).

The teacher reads exactly the student's input ids (the student's context plus the teacher's response),
so its hidden states line up with the student's token for token; both are compared at the positions the
batch's `mask` marks, those that predict the response tokens. (The teacher's own prompt may differ from
the student's context; its states over that prompt would not line up, so they are not used.) A student
with a trimmed vocabulary reads remapped ids of the same tokens: the positions, hence the pairing, hold.

Layer i means the output of decoder layer i (0-based): the residual stream, before the final norm,
captured by a forward hook during the forward pass that computes the logits (no second student pass).
The teacher runs once per micro-batch, without grad, for every student together (with_teacher_hidden).

    hidden term = mean over mapped (s, t) of  mean over response tokens of  D(P_s h_student[s], h_teacher[t])

with D cosine (1 - cos) or mse (engine/train/losses.py: hidden_state_loss) and P_s a learned linear map
(student width -> teacher width, no bias) where the widths differ, the identity where they match. The
projections train with the student's optimizer (at the top layer's lr) and are not saved with it: they
exist for the loss only. Averaging over the mapped layers keeps `weight` meaning the same whatever the
number of layers mapped.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from engine.errors import SpecError
from engine.train.device import autocast
from engine.train.losses import hidden_state_loss

LAYER_MAP_FIELD = "training.loss.hidden.layer_map"


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM, in order (Llama `layers`, GPT-2 `h`, others `blocks`)."""
    base = model.base_model
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
    raise SpecError(f"training.loss.hidden: cannot find the decoder layers of {type(model).__name__}")


def default_layer_map(n_student: int, n_teacher: int) -> dict[int, int]:
    """Every student layer, evenly spaced over the teacher's: student layer i -> teacher layer
    floor((i + 1) * n_teacher / n_student) - 1, so the last maps onto the last (6 of 30: 4, 9, ..., 29)."""
    return {i: max(0, (i + 1) * n_teacher // n_student - 1) for i in range(n_student)}


def check_teacher_layers(layer_map: dict[int, int] | None, n_teacher: int, where: str) -> None:
    """Teacher layers of an explicit layer_map must exist (checked as soon as the teacher is loaded)."""
    bad = sorted({t for t in (layer_map or {}).values() if t >= n_teacher})
    if bad:
        raise SpecError(f"{where}: {LAYER_MAP_FIELD}: teacher layer {', '.join(map(str, bad))} is out of range: "
                        f"the teacher has {n_teacher} layers (0 to {n_teacher - 1})")


def resolve_layer_map(layer_map: dict[int, int] | None, student_name: str, n_student: int, n_teacher: int,
                      where: str) -> dict[int, int]:
    """The spec's layer_map checked against both models, or the default one; sorted by student layer."""
    if layer_map is None:
        return default_layer_map(n_student, n_teacher)
    check_teacher_layers(layer_map, n_teacher, where)
    bad = sorted(s for s in layer_map if s >= n_student)
    if bad:
        raise SpecError(f"{where}: {LAYER_MAP_FIELD}: student layer {', '.join(map(str, bad))} is out of range "
                        f"for student {student_name!r}: it has {n_student} layers (0 to {n_student - 1})")
    return dict(sorted(layer_map.items()))


@contextlib.contextmanager
def capture(model, layers: Iterable[int], mask: torch.Tensor) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, a forward of `model` fills {layer: [N, width] output at the mask's positions}
    (row-major, the order of the flat targets); gradients flow through them."""
    states: dict[int, torch.Tensor] = {}
    blocks = decoder_layers(model)

    def hook(index: int):
        def keep(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            states[index] = h[mask]
        return keep

    handles = [blocks[i].register_forward_hook(hook(i)) for i in sorted(set(layers))]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


def with_teacher_hidden(teacher, batch: dict, layers: list[int]) -> dict:
    """The batch plus "teacher_hidden": {teacher layer: [N, teacher width] float32}, from one no-grad
    teacher forward over the batch's own input ids (its head is skipped)."""
    device = batch["input_ids"].device
    with torch.no_grad(), autocast(device), capture(teacher, layers, batch["mask"]) as states:
        teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return {**batch, "teacher_hidden": {i: h.float() for i, h in states.items()}}


class HiddenDistill(torch.nn.Module):
    """One student's hidden-state term: its layer map, its projections, and the distance."""

    def __init__(self, layer_map: dict[int, int], student_width: int, teacher_width: int, distance: str):
        super().__init__()
        self.layer_map = dict(layer_map)
        self.distance = distance
        # Keyed by the student layer; none at all when the widths match (the identity).
        self.projections = torch.nn.ModuleDict(
            {str(s): torch.nn.Linear(student_width, teacher_width, bias=False) for s in self.layer_map}
        ) if student_width != teacher_width else None

    @classmethod
    def for_student(cls, spec, student, model, teacher) -> "HiddenDistill":
        where = spec.path or "<spec>"
        hidden = spec.training.loss.hidden
        layer_map = resolve_layer_map(hidden.layer_map, student.name, len(decoder_layers(model)),
                                      len(decoder_layers(teacher)), where)
        return cls(layer_map, model.config.hidden_size, teacher.config.hidden_size, hidden.distance)

    def capture(self, model, mask: torch.Tensor):
        return capture(model, self.layer_map, mask)

    def forward(self, states: dict[int, torch.Tensor], teacher_hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """The term: the distance averaged over the mapped layers, each a mean over response tokens."""
        terms = []
        for s, t in self.layer_map.items():
            h = states[s].float()  # bf16 under CUDA autocast: the projection and distance run in float32
            if self.projections is not None:
                h = self.projections[str(s)](h)
            terms.append(hidden_state_loss(h, teacher_hidden[t], self.distance))
        return torch.stack(terms).mean()
