"""Serving Stable Diffusion over HTTP: the config, the API bodies, the serveConfigV2 writer, the
client and the Serve seam. The Serve application itself lives in `atelier_serve` (serve/)."""

from atelier.serving.api import (
    SCHEDULERS,
    GenerationRequest,
    GenerationResponse,
    ModelInfo,
    ModelList,
    request_model,
)
from atelier.serving.config import Autoscaling, Limits, Pool, Replica, ServeConfig
from atelier.serving.rayservice import rayservice_yaml, serve_config_v2

__all__ = [
    "SCHEDULERS",
    "Autoscaling",
    "GenerationRequest",
    "GenerationResponse",
    "Limits",
    "ModelInfo",
    "ModelList",
    "Pool",
    "Replica",
    "ServeConfig",
    "rayservice_yaml",
    "request_model",
    "serve_config_v2",
]
