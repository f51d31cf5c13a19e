"""The curation stages, one module each.

Every module here is imported by `all_stages`, and each Stage subclass it defines joins
the pipeline in the position its `order` gives: adding a stage is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from engine.stages.base import Stage


def all_stages() -> list[type[Stage]]:
    """Every stage class, in pipeline order."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return sorted(Stage._registry.values(), key=lambda cls: cls.order)


def stages_for(spec) -> list[Stage]:
    """The stages this spec asks for, in the order it runs them."""
    return [cls() for cls in sorted((c for c in all_stages() if c.wanted(spec)), key=lambda c: c.position(spec))]
