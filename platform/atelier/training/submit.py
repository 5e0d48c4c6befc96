"""Submitting a training job: every input is checked before any compute is spent, then the
dataset is committed (`atelier.training.dataset`) and the job goes to Ray's Jobs API."""

from __future__ import annotations

import hashlib
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from atelier.catalogue.build import load_concepts
from atelier.errors import InvalidInput, NotFound
from atelier.models.ref import Builtin, Folder, HubId, Registered, S3Prefix, parse_model_ref
from atelier.models.tokenizer import build_clip_tokenizer
from atelier.names import slug
from atelier.rayjobs import Jobs
from atelier.settings import Settings
from atelier.storage import Progress, Storage
from atelier.training.capacity import check_fits
from atelier.training.config import TrainConfig
from atelier.training.dataset import commit_dataset
from atelier.training.spec import TrainJobSpec

RUN_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,80}$")


def check_base_model(storage: Storage, ref: str, *, progress: Progress | None = None) -> str:
    """A base model reference every worker can reach: built-in names, s3:// prefixes and hub ids
    as they are; a full registry model as its s3:// prefix; a local folder is committed to S3
    first (workers may run on other machines)."""
    match parse_model_ref(ref, where="base_model"):
        case Builtin() | HubId():
            return ref
        case S3Prefix(uri):
            storage.read_manifest(uri)  # NotFound unless committed
            return uri
        case Folder(path):
            uri = storage.uri("base-models", "local", hashlib.sha256(str(path).encode()).hexdigest()[:16])
            storage.commit(path, uri, {"kind": "base-model", "source": str(path)}, overwrite=True,
                           progress=progress)
            return uri
        case Registered() as registered:
            from atelier.registry import Registry

            uri, card = Registry(storage).get(str(registered))
            if card.method != "full":
                raise InvalidInput(f"{card.ref} is a {card.method} adapter: train from its base "
                                   f"({card.base_model}) or from a full model", where="base_model")
            return uri  # the exact version, even if a newer one is published meanwhile
    raise AssertionError(ref)


def prepare(settings: Settings, concepts_path: Path, config: TrainConfig, *,
            concepts: list[str] | None = None, run_name: str | None = None,
            before_upload: Callable[[], object] | None = None,
            progress: Progress | None = None) -> TrainJobSpec:
    """Check every input, then commit the dataset: the job spec that any backend submits.

    `before_upload` checks the compute backend (Ray Jobs API, Kubernetes) before anything is
    uploaded, so a bad address fails fast too. `progress` sees the uploads (a local base model
    folder, the dataset).
    """
    concepts_path = Path(concepts_path)
    if not concepts_path.is_file():
        raise NotFound("concepts file not found", where=str(concepts_path))
    if run_name is not None and not RUN_NAME.match(run_name):
        raise InvalidInput("run name must be lower-case letters, digits, '.', '_' or '-'",
                           where="run_name")
    concepts_file = load_concepts(concepts_path, build_clip_tokenizer())
    if not concepts_file.concepts:
        raise InvalidInput("no concepts to train", where=str(concepts_path))
    unknown = set(concepts or []) - {c.name for c in concepts_file.concepts}
    if unknown:
        raise InvalidInput(f"no such concept: {', '.join(sorted(unknown))}", where=str(concepts_path))
    storage = Storage(settings)
    storage.check()  # unreachable storage or refused credentials: fail before any compute
    base_model = check_base_model(storage, config.base_model, progress=progress)
    if before_upload:
        before_upload()
    config = config.model_copy(update={
        "base_model": base_model,
        "model_name": config.model_name or slug(concepts_path.stem, fallback="model"),
    })
    dataset_uri, digest, _ = commit_dataset(storage, concepts_path, progress=progress)
    return TrainJobSpec(
        config=config, dataset_uri=dataset_uri, dataset_sha256=digest, concepts=concepts,
        run_name=run_name or f"{config.model_name}-{time.strftime('%Y%m%d-%H%M%S')}",
    )


def entrypoint(spec: TrainJobSpec) -> str:
    """The job's command line, the same on the local head and in a KubeRay RayJob."""
    return f"python -m atelier_jobs.train --spec {shlex.quote(spec.model_dump_json())}"


def submit(settings: Settings, concepts_path: Path, config: TrainConfig, *,
           concepts: list[str] | None = None, run_name: str | None = None,
           progress: Progress | None = None) -> tuple[str, TrainJobSpec]:
    """Validate, commit the dataset, submit to the Ray Jobs API; return the job id and spec."""
    jobs = Jobs(settings)

    def check_cluster() -> None:
        _ = jobs.client  # connecting proves the Jobs API answers
        check_fits(jobs, settings, config)

    spec = prepare(settings, concepts_path, config, concepts=concepts, run_name=run_name,
                   before_upload=check_cluster, progress=progress)
    job_id = jobs.submit(
        entrypoint(spec),
        metadata={"atelier": "train", "run": spec.run_name, "model": spec.config.model_name or ""},
    )
    return job_id, spec
