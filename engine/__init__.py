"""syllabus engine: spec language, pipeline, stages, teacher backends, trainer, CLI."""

__version__ = "0.2.0"
