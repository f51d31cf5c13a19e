"""syllabus store: immutable, versioned datasets as content-addressed Parquet plus a SQLite catalog.

    import store
    s = store.open(".syllabus")
    s.commit("demo", {"examples": table}, lineage, parent=None)
    s.read("demo@1", "examples"); s.sql("SELECT count(*) FROM tokens", at="demo@1")

`store` knows nothing of `engine`: it stores tables, versions and lineage.
"""

from pathlib import Path

from .api import Store
from .catalog import CommitResult, VersionInfo
from .errors import ParentMoved, StoreError

__all__ = ["Store", "CommitResult", "VersionInfo", "StoreError", "ParentMoved", "open"]


def open(root: str | Path) -> Store:  # noqa: A001 - `store.open(root)` reads naturally
    """Open the store at `root`, creating its folders and catalog if missing."""
    return Store(root)
