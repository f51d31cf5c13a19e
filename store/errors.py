"""Errors the store raises: one-line messages meant for the user, not tracebacks."""


class StoreError(Exception):
    """Anything the user can act on: a bad reference, a missing dataset, a refused query."""


class ParentMoved(StoreError):
    """Another commit landed first: the caller's expected parent is no longer the latest version."""


class CorruptData(StoreError):
    """A data file of a version is missing or its bytes no longer match its sha256."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path
