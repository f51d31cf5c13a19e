"""syllabus store: immutable, versioned datasets as content-addressed Parquet plus a SQLite catalog.

    import store
    s = store.open(".syllabus")
    s.commit("demo", {"examples": table}, lineage, parent=None)
    s.read("demo@1", "examples"); s.sql("SELECT count(*) FROM tokens", at="demo@1")
    v = s.version("demo@3"); v.to_polars("examples"); v.sql("SELECT ...")

`store` knows nothing of `engine`: it stores tables, versions and lineage.
"""

from pathlib import Path

from .api import GcReport, Store, Version, VerifyReport
from .catalog import CommitResult, VersionInfo
from .errors import CorruptData, ParentMoved, StoreError

__all__ = ["Store", "Version", "CommitResult", "VersionInfo", "GcReport", "VerifyReport",
           "StoreError", "ParentMoved", "CorruptData", "open"]


def open(root: str | Path) -> Store:  # noqa: A001 - `store.open(root)` reads naturally
    """Open the store at `root`, creating its folders and catalog if missing."""
    return Store(root)
