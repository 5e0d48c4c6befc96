"""The README's main job on the embedded default, end to end.

synthetic shop -> concepts file -> tiny base model -> committed to S3 -> a Ray job loads it back
from S3 (verified) and renders one image per concept -> images fetched to the output folder.
"""

from __future__ import annotations

import json
import shlex
import time
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
    samples_uri: str
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


def run_demo(settings: Settings, out_dir: Path, *, seed: int = 0, n_samples: int = 2,
             say: Say = print) -> DemoResult:
    from atelier import stack

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

    chosen = concepts.concepts[:n_samples]
    samples_uri = storage.uri("samples", f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    request = SampleRequest(
        model=model_uri, prompts=[c.instance_prompt for c in chosen], seed=seed, out=samples_uri
    )
    jobs = Jobs(settings)
    job_id = jobs.submit(
        f"python -m atelier_jobs.sample --request {shlex.quote(request.model_dump_json())}",
        metadata={"atelier": "demo"},
    )
    say(f"submitted Ray job {job_id} to {settings.ray_dashboard}")

    def on_line(line: str) -> None:
        event = parse_event(line)
        if event:
            say(f"  job: {json.dumps(event)}")

    status = jobs.wait(job_id, on_line=on_line, timeout_s=600)
    jobs.raise_for(job_id, status)

    local = out_dir / samples_uri.rsplit("/", 1)[-1]
    storage.fetch(samples_uri, local)
    images = sorted(local.glob("*.png"))
    for concept, image in zip(chosen, images):
        say(f"image: {image}  <- {concept.instance_prompt!r}")
    return DemoResult(
        concepts_file=concepts_path, n_concepts=len(concepts.concepts), model_uri=model_uri,
        job_id=job_id, samples_uri=samples_uri, images=images,
    )
