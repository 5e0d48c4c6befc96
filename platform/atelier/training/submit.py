"""Submitting training: every input is checked before any compute is spent, the dataset is
committed to S3 (content-addressed), and the job goes to Ray's Jobs API."""

from __future__ import annotations

import hashlib
import re
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from atelier.catalogue.build import load_concepts
from atelier.catalogue.schema import ConceptsFile
from atelier.errors import InvalidInput, NotFound
from atelier.models.builtin import BUILTIN
from atelier.models.load import HUB_ID
from atelier.models.tokenizer import build_clip_tokenizer
from atelier.rayjobs import Jobs, parse_event
from atelier.settings import Settings
from atelier.storage import Storage, is_s3, sha256_file
from atelier.training.config import TrainConfig
from atelier.training.spec import TrainJobSpec

RUN_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,80}$")


def commit_dataset(storage: Storage, concepts_path: Path) -> tuple[str, str, ConceptsFile]:
    """Upload a concepts file and its images as one committed, content-addressed dataset.

    The dataset's name is the hash of its concepts (which pin every image by sha256), so the same
    data is uploaded once and a model's card can name exactly what it was trained on.
    """
    concepts = load_concepts(concepts_path, build_clip_tokenizer())
    if not concepts.concepts:
        raise InvalidInput("no concepts to train", where=str(concepts_path))
    root = Path(concepts_path).parent
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp, "images")
        images.mkdir()
        portable = concepts.model_copy(deep=True)
        for concept in portable.concepts:
            for image in concept.images:
                source = image.resolve(root)
                if not source.is_file():
                    raise NotFound("image listed in the concepts file is missing", where=str(source))
                if sha256_file(source) != image.sha256:
                    raise InvalidInput("image changed since the concepts file was built "
                                       "(sha256 differs); rebuild it", where=str(source))
                name = f"{image.sha256[:16]}{source.suffix.lower()}"
                (images / name).write_bytes(source.read_bytes())
                image.path = f"images/{name}"
        digest = hashlib.sha256(portable.model_dump_json().encode()).hexdigest()
        uri = storage.uri("datasets", digest[:20])
        if not storage.has_manifest(uri):
            portable.dump(Path(tmp, "concepts.yaml"))
            storage.commit(tmp, uri, {"kind": "dataset", "sha256": digest,
                                      "concepts": [c.name for c in portable.concepts]})
    return uri, digest, concepts


def check_base_model(storage: Storage, ref: str) -> str:
    """A base model reference every worker can reach: built-in names, s3:// and hub ids as they
    are; a local folder is committed to S3 first (workers may run on other machines)."""
    if ref in BUILTIN:
        return ref
    if is_s3(ref):
        storage.read_manifest(ref)  # NotFound unless committed
        return ref
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise InvalidInput("base model folder has no model_index.json", where=str(path))
        uri = storage.uri("base-models", "local", hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16])
        storage.commit(path, uri, {"kind": "base-model", "source": str(path.resolve())}, overwrite=True)
        return uri
    if HUB_ID.match(ref):
        return ref
    raise NotFound(f"unknown base model {ref!r}: expected one of {', '.join(BUILTIN)}, a folder, "
                   "an s3:// prefix or a hub id", where="base_model")


def prepare(settings: Settings, concepts_path: Path, config: TrainConfig, *,
            concepts: list[str] | None = None, run_name: str | None = None,
            before_upload: Callable[[], object] | None = None) -> TrainJobSpec:
    """Check every input, then commit the dataset: the job spec that any backend submits.

    `before_upload` checks the compute backend (Ray Jobs API, Kubernetes) before anything is
    uploaded, so a bad address fails fast too.
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
    base_model = check_base_model(storage, config.base_model)
    if before_upload:
        before_upload()
    config = config.model_copy(update={
        "base_model": base_model,
        "model_name": config.model_name or _slug(concepts_path.stem),
    })
    dataset_uri, digest, _ = commit_dataset(storage, concepts_path)
    return TrainJobSpec(
        config=config, dataset_uri=dataset_uri, dataset_sha256=digest, concepts=concepts,
        run_name=run_name or f"{config.model_name}-{time.strftime('%Y%m%d-%H%M%S')}",
    )


def entrypoint(spec: TrainJobSpec) -> str:
    """The job's command line, the same on the local head and in a KubeRay RayJob."""
    return f"python -m atelier_jobs.train --spec {shlex.quote(spec.model_dump_json())}"


def submit(settings: Settings, concepts_path: Path, config: TrainConfig, *,
           concepts: list[str] | None = None, run_name: str | None = None) -> tuple[str, TrainJobSpec]:
    """Validate, commit the dataset, submit to the Ray Jobs API; return the job id and spec."""
    jobs = Jobs(settings)

    def check_cluster() -> None:
        jobs.client  # reachable
        # The embedded head never grows: a job needing more CPUs than it has would wait forever.
        cpus = jobs.cpus() if settings.ray_address is None else None
        if cpus and cpus_needed(config) > cpus[1]:
            raise InvalidInput(
                f"the job needs {cpus_needed(config):g} CPUs ({config.num_workers} workers x "
                f"{config.cpus_per_worker:g}); the embedded Ray head has {cpus[1]:g}",
                where="num_workers", hint="lower num_workers or cpus_per_worker, or set "
                "ATELIER_STACK__NUM_CPUS and restart the stack")

    spec = prepare(settings, concepts_path, config, concepts=concepts, run_name=run_name,
                   before_upload=check_cluster)
    job_id = jobs.submit(
        entrypoint(spec),
        metadata={"atelier": "train", "run": spec.run_name, "model": spec.config.model_name or ""},
    )
    return job_id, spec


def cpus_needed(config: TrainConfig) -> float:
    """CPUs the job's workers reserve (the driver reserves none)."""
    return config.num_workers * config.cpus_per_worker


def waiting_for_cpus(jobs: Jobs, config: TrainConfig) -> str | None:
    """Why a job just submitted will not start yet, if the cluster lacks the CPUs now."""
    cpus = jobs.cpus()
    if cpus is None or cpus[1] - cpus[0] >= cpus_needed(config):
        return None
    used, total = cpus
    return (f"the job waits for {cpus_needed(config):g} free CPUs: {total - used:g} of {total:g} are "
            "free now (Serve replicas and other jobs hold the rest: `atelier serve status`, "
            "`atelier train list`)")


class Progress(BaseModel):
    """What a training job's log says so far."""

    status: str
    models: list[str] = []
    model: str | None = None
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    eta_s: float | None = None
    checkpoint_step: int | None = None
    resumed_from: int | None = None
    published: list[str] = []
    message: str | None = None


def progress(jobs: Jobs, job_id: str) -> Progress:
    info = jobs.info(job_id)
    p = Progress(status=str(info.status.value), message=info.message)
    for line in jobs.logs(job_id).splitlines():
        event = parse_event(line)
        if not event:
            continue
        kind = event.get("event")
        if kind == "plan":
            p.models = event["models"]
        elif kind in ("start", "step"):
            p.model, p.step, p.total = event["model"], event["step"], event["total"]
            p.loss = event.get("loss", p.loss)
            p.eta_s = event.get("eta_s", p.eta_s)
        elif kind == "checkpoint":
            p.checkpoint_step = event["step"]
        elif kind == "resumed":
            p.resumed_from = event["step"]
        elif kind == "published":
            p.published.append(event["model"])
    return p


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "model"
