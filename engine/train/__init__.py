"""The trainer: students built from the teacher, the top-k + tail distillation loss,
one training pass feeding every student, and teacher-vs-students evaluation."""

from engine.train.evaluate import evaluate, format_table
from engine.train.loop import train_students

__all__ = ["train_students", "evaluate", "format_table"]
