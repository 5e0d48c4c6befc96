"""Base models: build the built-in ones from configs, and load any model from one place."""

from atelier.models.builtin import BUILTIN, build_model
from atelier.models.load import load_pipeline, resolve_model

__all__ = ["BUILTIN", "build_model", "load_pipeline", "resolve_model"]
