"""Ray job: DreamBooth training of the concepts in a dataset, one Ray Train run per model.

    python -m atelier_jobs.train --spec '<TrainJobSpec JSON>'

For each model: class images for the prior loss (generated once by Ray tasks, cached in S3),
a `TorchTrainer` run whose checkpoints go to S3 through Ray Train's storage (resubmitting the same
run name resumes it), then the final checkpoint is verified, exported and published to the
registry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import ray

from atelier.catalogue.schema import ConceptsFile
from atelier.errors import InvalidInput, first_line
from atelier.models.builtin import BUILT, BUILTIN
from atelier.models.load import native_resolution, resolve_model
from atelier.models.ref import Builtin, ModelRef, S3Prefix, parse_model_ref
from atelier.sampling import SampleRequest
from atelier.storage import Outages, Storage, verify_local
from atelier.training import events
from atelier.training.spec import ModelRun, TrainJobSpec

if TYPE_CHECKING:  # the registry is imported where it is used, inside the job
    from atelier.registry import ModelCard


def plan(spec: TrainJobSpec, concepts: ConceptsFile) -> list[ModelRun]:
    """The models this job trains: one per concept, or one for all of them."""
    cfg = spec.config
    chosen = [c for c in concepts.concepts if spec.concepts is None or c.name in spec.concepts]
    unknown = set(spec.concepts or []) - {c.name for c in concepts.concepts}
    if unknown:
        raise InvalidInput(f"unknown concepts: {', '.join(sorted(unknown))}", where="concepts")
    groups = [[c] for c in chosen] if cfg.concept_mode == "per_concept" else [chosen]
    base_name = cfg.model_name or "dreambooth"
    runs = []
    for group in groups:
        name = base_name if cfg.concept_mode == "joint" else f"{base_name}-{group[0].name}"
        runs.append(ModelRun(
            config=cfg, dataset_uri=spec.dataset_uri, concepts=[c.name for c in group],
            identifiers=[c.identifier for c in group], model_name=name,
            run_name=f"{spec.run_name}-{name}" if len(groups) > 1 else spec.run_name,
            validation_prompts=cfg.validation_prompts or [c.instance_prompt for c in group],
        ))
    return runs


def class_images(storage: Storage, run: ModelRun, concepts: ConceptsFile) -> dict[str, str]:
    """Class images per class prompt, generated once per (base model, prompt, count, seed)."""
    from atelier_jobs import sample

    cfg = run.config
    # The size the training loop runs at (it reads the same native size), so the prior images
    # match the instance images.
    resolution = cfg.resolution or native_resolution(cfg.base_model, storage=storage)
    base_key = _identity(storage, parse_model_ref(cfg.base_model))
    out = {}
    prompts = sorted({c.class_prompt for c in concepts.concepts if c.name in run.concepts})
    for prompt in prompts:
        key = hashlib.sha256(json.dumps(
            [base_key, prompt, cfg.num_class_images, cfg.seed, cfg.class_image_steps, resolution]
        ).encode()).hexdigest()[:20]
        uri = storage.uri("class-images", key)
        if storage.has_manifest(uri):
            events.emit(events.ClassImages(prompt=prompt, uri=uri, cached=True))
        else:
            request = SampleRequest(model=cfg.base_model, prompts=[prompt] * cfg.num_class_images,
                                    seed=cfg.seed, steps=cfg.class_image_steps, width=resolution,
                                    height=resolution, out=uri)
            sample.run(request, workers=max(1, cfg.num_workers))
            events.emit(events.ClassImages(prompt=prompt, uri=uri, cached=False))
        out[prompt] = uri
    return out


def _identity(storage: Storage, base: ModelRef) -> str:
    """What the base model's weights are, for the class-image cache key."""
    match base:
        case S3Prefix(uri):
            return storage.read_manifest(uri).digest
        case Builtin(name):
            return BUILTIN[name].digest()
    return str(base)


def failure_reporter(model: str):
    """A Ray Train callback, run in the run's controller, that reports each failure of the run's
    workers as a WorkersFailed event (`atelier train status` shows them)."""
    from ray.train import UserCallback

    class ReportFailures(UserCallback):
        def __init__(self) -> None:
            self.failures = 0

        def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
            self.failures += 1
            first = worker_exceptions[min(worker_exceptions)]
            # A failed health check (a worker that cannot be reached) carries Ray's own error.
            error = getattr(first, "health_check_failure", first)
            events.emit(events.WorkersFailed(model=model, failure=self.failures, ranks=sorted(worker_exceptions),
                                             error=first_line(error)))

    return ReportFailures()


def watch_nodes(interval_s: float = 5.0) -> threading.Thread:
    """Report each node that Ray declares dead while the job runs, as a NodeLost event. Ray
    Train's controller only sees its workers stop answering; the GCS decides, some seconds
    later, that their node is gone."""
    def watch() -> None:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        while True:
            time.sleep(interval_s)
            nodes = ray.nodes()
            for n in nodes:
                if n["NodeID"] in alive and not n["Alive"]:
                    why = n.get("DeathReasonMessage") or None
                    events.emit(events.NodeLost(node=n["NodeID"], address=n["NodeManagerAddress"],
                                                why=why.splitlines()[0][:300] if why else None))
            alive = {n["NodeID"] for n in nodes if n["Alive"]}

    thread = threading.Thread(target=watch, name="watch-nodes", daemon=True)
    thread.start()
    return thread


def fit(storage: Storage, run: ModelRun, *, callbacks: list | None = None):
    """Ray Train's run of the model (`callbacks`: Ray Train's, such as a sweep's Tune reporter)."""
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from atelier_jobs.dreambooth import train_loop_per_worker

    cfg = run.config
    _, runs_path = storage.resolve(storage.uri("runs"))
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=run.model_dump(mode="json"),
        # accelerator_type pins the workers to the pool's GPU on a cluster with several kinds
        # (T4 and A100 nodes): without it a "t4" run could land on an A100 and be timed there.
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources,
                                     accelerator_type=accelerator_type(cfg)),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run.run_name,
            # Ray Train wants `bucket/prefix` (no s3://) with an explicit filesystem.
            storage_path=runs_path,
            storage_filesystem=pafs.S3FileSystem(**storage.s3_options()),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=[failure_reporter(run.model_name), *(callbacks or [])],
        ),
    )
    return trainer.fit()


# Ray Train restarts a run's workers when they fail, but not its controller, which fails when it
# cannot write its checkpoint snapshot to S3. The job then waits for S3 (at most this long) and
# starts the run again under its name, which resumes it from its last checkpoint in S3. Its
# model's publication waits out an outage the same way, under the version number it claimed.
OUTAGE_WAIT_S = 600.0
OUTAGE_RESTARTS = 3


def outages(storage: Storage, run: ModelRun, during: Literal["training", "publish"]) -> Outages:
    """How the job waits out S3's outages while it trains or publishes `run`'s model, each
    reported as a StorageOutage event."""
    def report(error: str, waited_s: float, n: int) -> None:
        events.emit(events.StorageOutage(model=run.model_name, during=during, waited_s=waited_s,
                                         outage=n, error=error))

    return Outages(storage, wait_s=OUTAGE_WAIT_S, limit=OUTAGE_RESTARTS, on_wait=report)


def fit_through_outages(storage: Storage, run: ModelRun, *, callbacks: list | None = None):
    """`fit`, started again (up to OUTAGE_RESTARTS times) after a failure that S3's outage
    caused, once S3 answers again; any other failure is raised as it is (Ray Train raises a
    run's failure as TrainingFailedError, with its causes)."""
    return outages(storage, run, "training").call(partial(fit, storage, run, callbacks=callbacks))


def publish(storage: Storage, run: ModelRun, spec: TrainJobSpec, concepts: ConceptsFile,
            result, *, lineage: dict | None = None) -> tuple[str, ModelCard]:
    """Verify the final checkpoint, turn it into a loadable model and register it (`lineage`:
    the sweep and trial it won, for a sweep's best model)."""
    from atelier.registry import Registry, code_version

    cfg = run.config
    guard = outages(storage, run, "publish")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        guard.call(partial(result.checkpoint.to_directory, str(folder)))
        verify_local(folder)
        training = json.loads((folder / "training.json").read_text())
        if training["step"] != cfg.max_train_steps:
            raise RuntimeError(f"final checkpoint is at step {training['step']}, "
                               f"expected {cfg.max_train_steps}")
        model = Path(tmp) / "model"
        if cfg.method == "full":
            # A complete diffusers folder: the base with the trained components swapped in.
            shutil.copytree(resolve_model(cfg.base_model), model)
            for component in ("unet", "text_encoder"):
                if (folder / "model" / component).exists():
                    shutil.rmtree(model / component)
                    shutil.copytree(folder / "model" / component, model / component)
            (model / BUILT).unlink(missing_ok=True)
        else:
            shutil.copytree(folder / "model", model)
        by_name = {c.name: c for c in concepts.concepts}
        uri, card = Registry(storage).publish(
            model,
            name=run.model_name,
            method=cfg.method,
            base_model=cfg.base_model,
            concepts=[by_name[n] for n in run.concepts],
            hyperparameters=cfg.model_dump(mode="json"),
            dataset_sha256=spec.dataset_sha256,
            final_loss=training["loss"],
            code_version=code_version(),
            run=storage.uri("runs", run.run_name),
            quality_curve=training.get("quality_curve") or None,
            lineage=lineage,
            outages=guard,
        )
    return uri, card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="TrainJobSpec as JSON")
    args = parser.parse_args(argv)
    spec = TrainJobSpec.model_validate_json(args.spec)
    ray.init(log_to_driver=True)
    storage = Storage()
    concepts = ConceptsFile.load(storage.fetch_cached(spec.dataset_uri) / "concepts.yaml")
    runs = plan(spec, concepts)
    events.emit(events.Plan(models=[r.model_name for r in runs]))
    watch_nodes()
    for run in runs:
        if run.config.with_prior_preservation:
            run.class_images = class_images(storage, run, concepts)
        result = fit_through_outages(storage, run)
        uri, card = publish(storage, run, spec, concepts, result)
        events.emit(events.Published(model=f"{card.name}:{card.version}", uri=uri,
                                     loss=card.final_loss))
    return 0


def accelerator_type(cfg) -> str | None:
    """Ray's name of the GPU the workers must have: the pool's, for a GPU run on a named pool."""
    from atelier.pools import POOLS

    if not cfg.use_gpu or not cfg.gpu_type:
        return None
    return POOLS[cfg.gpu_type].ray_accelerator_type


if __name__ == "__main__":
    sys.exit(main())

