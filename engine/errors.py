"""The errors a user can fix: the CLI prints them as one line, without a traceback.

A leaf module: it imports nothing of ours, so every module can raise these without
pulling in the rest of the engine. The store's own errors (store.StoreError) are
caught beside these by the CLI; the store knows nothing of the engine.
"""


class UserError(Exception):
    """Something the user can act on; the message is one line naming the file, field or line."""


class SpecError(UserError):
    """A spec that cannot be used; the message is one line naming file and field."""


class StageError(UserError):
    """Input a stage cannot work with; one line naming the file, line or spec field."""


class ModelError(UserError):
    """A model that cannot be found or loaded; one line for the user."""


class TemplateProblem(UserError):
    """A template that cannot be compiled or rendered; one line naming file and line."""


class TrainError(UserError):
    """A training or evaluation request that cannot be served (e.g. nothing trained yet)."""


class Interrupted(Exception):
    """Ctrl-C during a long command, said plainly with what was kept."""
