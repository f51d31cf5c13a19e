"""The errors a user can fix: the CLI prints them as one line, without a traceback."""

from engine.models import ModelError
from engine.spec import SpecError
from engine.stages.base import StageError
from engine.templates import TemplateProblem
from store import StoreError


class TrainError(Exception):
    """A training or evaluation request that cannot be served (e.g. nothing trained yet)."""


class Interrupted(Exception):
    """Ctrl-C during a long command, said plainly with what was kept."""


USER_ERRORS = (SpecError, StageError, StoreError, ModelError, TemplateProblem, TrainError)
