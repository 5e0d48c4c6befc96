"""JSON Schemas of the user-facing models, generated into schemas/ and checked for drift."""

from __future__ import annotations

import json
from pathlib import Path


def models() -> dict:
    from atelier.bench.results import BenchResult
    from atelier.catalogue.schema import ConceptsFile
    from atelier.endpoint.api import GenerationRequest
    from atelier.endpoint.config import ServeConfig
    from atelier.pools import NodePool
    from atelier.quality.results import EvalSpec, Evaluation
    from atelier.registry import ModelCard
    from atelier.sampling import SampleRequest
    from atelier.settings import Settings
    from atelier.storage import Manifest
    from atelier.training.config import TrainConfig
    from atelier.training.events import JobEvent
    from atelier.training.pretrain import PretrainSpec
    from atelier.training.spec import TrainJobSpec
    from atelier.training.sweep import SweepConfig, SweepResults

    return {
        "bench-result": BenchResult,
        "concepts": ConceptsFile,
        "eval-spec": EvalSpec,
        "evaluation": Evaluation,
        "generation-request": GenerationRequest,
        "job-event": JobEvent,
        "manifest": Manifest,
        "model-card": ModelCard,
        "node-pool": NodePool,
        "pretrain-spec": PretrainSpec,
        "sample-request": SampleRequest,
        "serve-config": ServeConfig,
        "settings": Settings,
        "sweep": SweepConfig,
        "sweep-results": SweepResults,
        "train-config": TrainConfig,
        "train-job-spec": TrainJobSpec,
    }


def render() -> dict[str, str]:
    """File name -> JSON text, deterministic."""
    out = {}
    for name, model in models().items():
        schema = model.model_json_schema()
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        out[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        (folder / name).write_text(text)
        written.append(folder / name)
    return written
