"""The README's main job on the embedded default, end to end.

synthetic shop -> concepts file -> tiny base model committed to S3 -> a DreamBooth Ray job trains
one model per concept (checkpoints in S3) and registers them -> the Serve application loads each
registered model from S3 (hashes verified) -> images generated over HTTP into the output folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from atelier.catalogue.build import build_concepts
from atelier.catalogue.synth import synth_shop
from atelier.models import resolve_model
from atelier.models.builtin import BUILTIN
from atelier.models.tokenizer import build_clip_tokenizer
from atelier.rayjobs import Jobs
from atelier.settings import Settings
from atelier.storage import Storage
from atelier.training import events

Say = Callable[[str], None]


class DemoResult(BaseModel):
    concepts_file: Path
    n_concepts: int
    model_uri: str
    job_id: str
    models: list[str]
    url: str
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
             steps: int | None = None, learning_rate: float | None = None,
             serve_port: int | None = None, say: Say = print) -> DemoResult:
    """`steps`, `learning_rate` and `serve_port` are for tests: the study's 200 steps at lr 1e-6
    and port 8000 otherwise."""
    from atelier import stack
    from atelier.endpoint.api import GenerationRequest
    from atelier.endpoint.client import Client, save_images
    from atelier.endpoint.config import ServeConfig
    from atelier.endpoint.deploy import ServeCluster, serve_up
    from atelier.endpoint.keys import find_api_key
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
    # The endpoint of an earlier run holds CPUs the training workers need on this one machine;
    # it is deployed again, with the new models, once they are trained.
    serving = ServeCluster(settings)
    if (serving.details().get("applications") or {}):
        say("stopping the endpoint of an earlier run while training (it shares this machine's CPUs)")
        serving.delete()
    config = TrainConfig.load(None, base_model=model_uri, model_name="shop", seed=seed,
                              max_train_steps=steps, checkpoint_every=100 if steps is None else steps,
                              learning_rate=learning_rate)
    jobs = Jobs(settings)
    job_id, spec = submit(settings, concepts_path, config, concepts=[c.name for c in chosen])
    say(f"training job {job_id}: run {spec.run_name}, {len(chosen)} concepts, "
        f"{config.max_train_steps} steps each, lr {config.learning_rate:g}")
    status = jobs.wait(job_id, on_line=_event_printer(say), timeout_s=1800)
    jobs.raise_for(job_id, status)

    # The fine-tuned models behind the HTTP API, and images of each generated over HTTP.
    models = [f"{config.model_name}-{concept.name}" for concept in chosen]
    serve_config = ServeConfig.load(None, http={"port": serve_port} if serve_port else None)
    say(f"serving {', '.join(models)} with Ray Serve (models loaded from S3)")
    serve_config, url = serve_up(settings, serve_config, models,
                                 on_status=lambda s: say(f"  application {s.lower()}"))
    client = Client(url, find_api_key(None, settings))
    images: list[Path] = []
    for name, concept in zip(models, chosen, strict=True):
        response = client.generate(GenerationRequest(
            prompt=concept.instance_prompt, model=name, n=2, seed=seed))
        for image in save_images(response, out_dir / spec.run_name):
            images.append(image)
            say(f"image: {image}  <- POST {url}/v1/images/generations "
                f"{{model: {response.model}, prompt: {concept.instance_prompt!r}}}")
    say(f"the endpoint keeps running at {url} (API docs: {url}/docs); try "
        f"`atelier generate \"{chosen[0].instance_prompt}\" --model {models[0]}`; "
        "stop it with `atelier serve down`")
    return DemoResult(
        concepts_file=concepts_path, n_concepts=len(concepts.concepts), model_uri=model_uri,
        job_id=job_id, models=models, url=url, images=images,
    )


def _event_printer(say: Say) -> Callable[[str], None]:
    seen: set[str] = set()

    def on_line(line: str) -> None:
        event = events.parse(line)
        # Ray may forward a worker's line twice (driver and worker log streams).
        if event and (key := event.model_dump_json()) not in seen:
            seen.add(key)
            say(f"  {_describe(event)}")

    return on_line


def _describe(event: events.Event) -> str:
    match event:
        case events.Step():
            return (f"{event.model}: step {event.step}/{event.total} loss {event.loss:.4f} "
                    f"({event.steps_per_s:.1f} steps/s, eta {event.eta_s:.0f} s)")
        case events.Start():
            return (f"{event.model}: training on {event.images} images, {event.total} steps, "
                    f"{event.workers} worker{'s' if event.workers != 1 else ''}")
        case events.Checkpoint():
            quality = "".join(f", {k} {v:.3g}" for k, v in (event.quality or {}).items() if v is not None)
            return f"{event.model}: checkpoint at step {event.step} (eval loss {event.eval_loss:.4f}{quality})"
        case events.Published():
            return f"registered {event.model} at {event.uri}"
    return event.model_dump_json()
