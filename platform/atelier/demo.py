"""The README's main job on the embedded default, end to end.

synthetic shop -> concepts file -> tiny base model committed to S3 -> a DreamBooth Ray job trains
one model per concept (checkpoints in S3) and registers them -> a Ray job loads each registered
model back (hashes verified) and renders samples -> images fetched to the output folder.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from atelier.catalogue.build import build_concepts
from atelier.catalogue.synth import synth_shop
from atelier.models import resolve_model
from atelier.models.builtin import BUILTIN
from atelier.models.tokenizer import build_clip_tokenizer
from atelier.rayjobs import Jobs, parse_event
from atelier.sampling import SampleRequest
from atelier.settings import Settings
from atelier.storage import Storage

Say = Callable[[str], None]


class DemoResult(BaseModel):
    concepts_file: Path
    n_concepts: int
    model_uri: str
    job_id: str
    models: list[str]
    images: list[Path]


def publish_base_model(name: str, storage: Storage, say: Say) -> str:
    """Commit a built-in model to S3 once per config digest; return its s3:// prefix."""
    uri = storage.uri("base-models", name, BUILTIN[name].digest())
    if storage.has_manifest(uri):
        say(f"base model already in S3: {uri}")
        return uri
    local = resolve_model(name, settings=storage.settings)
    manifest = storage.commit(local, uri, {"kind": "base-model", "name": name})
    say(f"committed {name} to {uri} ({len(manifest.files)} files, "
        f"{manifest.total_bytes / 1e6:.1f} MB)")
    return uri


def run_demo(settings: Settings, out_dir: Path, *, seed: int = 0, n_concepts: int = 2,
             say: Say = print) -> DemoResult:
    from atelier import stack
    from atelier.training.config import TrainConfig
    from atelier.training.submit import submit

    say("starting the embedded stack (SeaweedFS + Ray)")
    stack.up(settings)
    storage = Storage(settings)
    storage.check()

    work = settings.home / "demo"
    manifest_path = synth_shop(work / "shop", seed=seed)
    say(f"synthetic shop drawn: {manifest_path}")
    concepts_path = work / "concepts.yaml"
    concepts, _report = build_concepts(manifest_path, concepts_path, build_clip_tokenizer())
    say(f"{len(concepts.concepts)} concepts written to {concepts_path}")

    model_uri = publish_base_model("tiny", storage, say)

    # The study's hyperparameters (lr 1e-6, 200 steps, no prior preservation), one model per
    # concept, on the tiny base model loaded from S3.
    chosen = concepts.concepts[:n_concepts]
    config = TrainConfig(base_model=model_uri, model_name="shop", checkpoint_every=100, seed=seed)
    jobs = Jobs(settings)
    job_id, spec = submit(settings, concepts_path, config, concepts=[c.name for c in chosen])
    say(f"training job {job_id}: run {spec.run_name}, {len(chosen)} concepts, "
        f"{config.max_train_steps} steps each, lr {config.learning_rate:g}")
    status = jobs.wait(job_id, on_line=_event_printer(say), timeout_s=1800)
    jobs.raise_for(job_id, status)

    # Samples of each fine-tuned model, rendered by a Ray job that loads it from the registry.
    images: list[Path] = []
    models: list[str] = []
    for concept in chosen:
        name = f"{config.model_name}-{concept.name}"
        models.append(name)
        samples_uri = storage.uri("samples", f"demo-{spec.run_name}", name)
        request = SampleRequest(model=name, prompts=[concept.instance_prompt], seed=seed,
                                out=samples_uri)
        sample_job = jobs.submit(
            f"python -m atelier_jobs.sample --request {shlex.quote(request.model_dump_json())}",
            metadata={"atelier": "demo"},
        )
        jobs.raise_for(sample_job, jobs.wait(sample_job, on_line=_event_printer(say), timeout_s=600))
        local = out_dir / spec.run_name / name
        storage.fetch(samples_uri, local)
        for image in sorted(local.glob("*.png")):
            images.append(image)
            say(f"image: {image}  <- {name}: {concept.instance_prompt!r}")
    return DemoResult(
        concepts_file=concepts_path, n_concepts=len(concepts.concepts), model_uri=model_uri,
        job_id=job_id, models=models, images=images,
    )


def _event_printer(say: Say) -> Callable[[str], None]:
    seen: set[str] = set()

    def on_line(line: str) -> None:
        event = parse_event(line)
        # Ray may forward a worker's line twice (driver and worker log streams).
        if event and (key := json.dumps(event, sort_keys=True)) not in seen:
            seen.add(key)
            say(f"  {_describe(event)}")

    return on_line


def _describe(event: dict) -> str:
    kind = event.get("event") or event.get("stage")
    if kind == "step":
        return (f"{event['model']}: step {event['step']}/{event['total']} loss {event['loss']:.4f} "
                f"({event['steps_per_s']:.1f} steps/s, eta {event['eta_s']:.0f} s)")
    if kind == "checkpoint":
        return f"{event['model']}: checkpoint at step {event['step']} (eval loss {event['eval_loss']:.4f})"
    if kind == "published":
        return f"registered {event['model']} at {event['uri']}"
    return json.dumps(event)
