"""The errors a user can fix: the CLI prints them as one line, without a traceback.

A leaf module: it imports nothing of ours, so every module can raise these without
pulling in the rest of the engine. The store's own errors (store.StoreError) are
caught beside these by the CLI; the store knows nothing of the engine.
"""


class UserError(Exception):
    """Something the user can act on: one line naming the file, field or line per problem.

    Several problems found at once (validate lists them all) are one message of several
    lines, each complete on its own; `lines` gives them for printing one by one.
    """

    @property
    def lines(self) -> list[str]:
        return str(self).splitlines() or [type(self).__name__]


class SpecError(UserError):
    """A spec that cannot be used; the message is one line naming file and field."""


class StageError(UserError):
    """Input a stage cannot work with; one line naming the file, line or spec field."""


class ModelError(UserError):
    """A model that cannot be found or loaded; one line for the user."""


class TeacherError(UserError):
    """A teacher server that cannot be used (unreachable, misconfigured, no logprobs, no key); one line."""


class TemplateProblem(UserError):
    """A template that cannot be compiled or rendered; one line naming file and line."""


class RenderLimit(TemplateProblem):
    """One row's render ran past the time or size limit: a bad row (the stage may reject it and go on)."""


class TrainError(UserError):
    """A training or evaluation request that cannot be served (e.g. nothing trained yet)."""


class Interrupted(Exception):
    """Ctrl-C during a long command, said plainly with what was kept."""
