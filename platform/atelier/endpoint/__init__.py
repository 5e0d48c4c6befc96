"""The endpoint, seen from the control plane: its config, the API bodies, the serveConfigV2 writer,
the client and the Serve seam. The application that runs on the replicas is `atelier_serve`
(serve/); the names differ so that nobody confuses the two."""

from atelier.endpoint.api import (
    SCHEDULERS,
    GenerationRequest,
    GenerationResponse,
    ModelInfo,
    ModelList,
    request_model,
)
from atelier.endpoint.config import Autoscaling, Limits, Pool, Replica, ServeConfig
from atelier.endpoint.rayservice import rayservice_yaml, serve_config_v2

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
