"""What hidden-state distillation and checkpoints cost, on the bundled teacher.

    .venv/bin/python bench/trainer_features.py [--steps 5] [--batch 8]

1. Step time, KD (+ hard CE) vs KD + hidden (training.loss.hidden, cosine, the default layer map), per
   student, through the trainer's own Trainee.step on one synthetic collated batch (student context of
   40 tokens + 16 teacher tokens, stored top-20). The hidden step adds the student's projections and
   term; the teacher's no-grad forward over the batch (with_teacher_hidden) is timed on its own, since
   the trainer runs it once per micro-batch for all students together.
2. A checkpoint of each student (weights, AdamW state after a step, records): its size, the time to
   write it (temp file, fsync, rename) and to load it back.

Students: the demo's `tiny` config (192 wide, 4 layers: a projection to the teacher's 576) and a
from_teacher copy of 6 of the teacher's 30 layers (576 wide: no projection). Medians of --steps steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.models import load_causal_lm, set_threads
from engine.spec import Spec
from engine.train.checkpoint import RunCheckpoints
from engine.train.data import collate
from engine.train.hidden import with_teacher_hidden
from engine.train.loop import Trainee
from kd_step import synthetic  # bench/ is on the path when a bench script runs: the same synthetic batch


STUDENTS = [{"name": "tiny", "config": {"hidden_size": 192, "num_layers": 4, "num_heads": 4, "intermediate_size": 512}},
            {"name": "drop6", "from_teacher": {"layers": [0, 6, 12, 18, 24, 29]}}]


def spec(student: dict, hidden: bool) -> Spec:
    loss = {"hidden": {"weight": 1.0}} if hidden else {}
    return Spec.model_validate({"name": "bench", "teacher": {"model": "smollm2-135m-instruct"},
                                "sources": [{"inline": ["x"]}], "students": [student], "training": {"loss": loss}})


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    threads = set_threads()
    teacher, tokenizer = load_causal_lm("smollm2-135m-instruct")
    teacher.requires_grad_(False)
    batch = collate(synthetic(args.batch, np.random.default_rng(0)), pad_id=0)
    print(f"{threads} thread(s); batch {args.batch}, {int(batch['mask'].sum())} response tokens of "
          f"{batch['input_ids'].numel()}; teacher 30 layers x 576")

    teacher_ms = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        with_hidden = with_teacher_hidden(teacher, batch, list(range(30)))
        teacher_ms.append(time.perf_counter() - start)
    print(f"teacher no-grad forward (with_teacher_hidden, once per micro-batch for all students): "
          f"{median_ms(teacher_ms[1:]):.0f} ms")

    for student in STUDENTS:
        times = {}
        for hidden in (False, True):
            s = spec(student, hidden)
            trainee = Trainee.create(s, s.students[0], teacher, tokenizer, total_steps=args.steps + 1)
            feed = [with_hidden] if hidden else [batch]
            runs = []
            for step in range(args.steps + 1):  # the first is a warm-up
                start = time.perf_counter()
                trainee.step(feed, s, step, args.steps + 1)
                runs.append(time.perf_counter() - start)
            times[hidden] = median_ms(runs[1:])
            if hidden:
                layer_map = trainee.hidden.layer_map
                proj = sum(p.numel() for p in trainee.hidden.parameters())
            else:
                with tempfile.TemporaryDirectory() as tmp, RunCheckpoints(Path(tmp) / "run", key="k") as ckpt:
                    state = {"step": 1, "trainees": [trainee.state_dict()]}
                    ckpt.save(state)
                    start = time.perf_counter()
                    ckpt.load()
                    load_s = time.perf_counter() - start
                    params = sum(p.numel() for p in trainee.model.parameters())
                    print(f"{student['name']}: {params / 1e6:.1f} M params; checkpoint {ckpt.bytes / 1e6:.1f} MB, "
                          f"write {ckpt.seconds * 1000:.0f} ms, load {load_s * 1000:.0f} ms")
        print(f"{student['name']}: KD step {times[False]:.0f} ms, KD + hidden step {times[True]:.0f} ms "
              f"({times[True] / times[False]:.2f}x; +{median_ms(teacher_ms[1:]):.0f} ms teacher forward per "
              f"micro-batch, shared); layer map {layer_map}, projections {proj / 1e6:.2f} M params")


if __name__ == "__main__":
    main()
