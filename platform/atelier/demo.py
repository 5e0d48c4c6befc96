"""The README's main job on the embedded default, end to end.

synthetic shop -> concepts file -> the shop base model (pretrained on the shop world, committed
with the code) in S3 -> a DreamBooth Ray job trains one model per held-out style (checkpoints in
S3) and registers them -> an evaluation Ray job measures each against its photos, beside the base
(metrics printed, comparison grids and a gallery written) -> the Serve application loads each
registered model from S3 (hashes verified) -> images generated over HTTP into the output folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from atelier.catalogue import world
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

BASE = "shop"
# The shop base is a 4 M-parameter model: the study's lr 1e-6 for 200 steps (right for SD 1.5's
# 860 M-parameter UNet, and TrainConfig's default) would leave it where it started.
DEMO_LEARNING_RATE = 1e-4
DEMO_STEPS = 100


class DemoResult(BaseModel):
    concepts_file: Path
    n_concepts: int
    model_uri: str
    job_id: str
    models: list[str]
    url: str
    images: list[Path]
    evaluations: dict[str, Any]
    gallery: Path | None


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
             eval_images: int = 8, serve_port: int | None = None, say: Say = print) -> DemoResult:
    """`steps`, `learning_rate`, `eval_images` and `serve_port` are for tests."""
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

    model_uri = publish_base_model(BASE, storage, say)

    # The styles the shop base never saw (the world holds them out), so what fine-tuning teaches
    # shows: one model per concept, the study's recipe (no prior preservation) at the shop
    # base's learning rate.
    held_out = [c for c in concepts.concepts if world.is_held_out(c.class_name, c.style)]
    chosen = held_out[:n_concepts]
    # The endpoint of an earlier run holds CPUs the training workers need on this one machine;
    # it is deployed again, with the new models, once they are trained.
    serving = ServeCluster(settings)
    if (serving.details().get("applications") or {}):
        say("stopping the endpoint of an earlier run while training (it shares this machine's CPUs)")
        serving.delete()
    steps = steps or DEMO_STEPS
    # Each checkpoint measured by the shop CLIP: the card's quality curve says how many steps
    # the product needed.
    config = TrainConfig.load(None, base_model=model_uri, model_name="shop", seed=seed,
                              max_train_steps=steps, checkpoint_every=min(50, steps),
                              learning_rate=learning_rate or DEMO_LEARNING_RATE,
                              eval_encoder="shop-clip")
    jobs = Jobs(settings)
    job_id, spec = submit(settings, concepts_path, config, concepts=[c.name for c in chosen])
    say(f"training job {job_id}: run {spec.run_name}, {len(chosen)} concepts, "
        f"{config.max_train_steps} steps each, lr {config.learning_rate:g}")
    status = jobs.wait(job_id, on_line=_event_printer(say), timeout_s=1800)
    jobs.raise_for(job_id, status)

    models = [f"{config.model_name}-{concept.name}" for concept in chosen]

    # How close each model came to its product, beside the base it started from (before the
    # endpoint takes the CPUs the evaluation job needs).
    from atelier.quality.jobs import run_eval, write_html
    from atelier.quality.results import EvalConfig, EvalSpec

    evaluations = {}
    for name in models:
        say(f"evaluating {name} against its photos, beside the base ({eval_images} images per prompt)")
        evaluation = run_eval(settings, EvalSpec(model=name, config=EvalConfig(images=eval_images, seed=seed)))
        evaluations[evaluation.model] = evaluation
        for line in before_after(evaluation):
            say(f"  {line}")
    gallery = write_html(settings, list(evaluations), out_dir / spec.run_name / "quality",
                         title="Atelier demo: real photos, the shop base, fine-tuned")
    say(f"comparison grids (real | base | fine-tuned) and metrics: {gallery}")

    # The fine-tuned models behind the HTTP API, and images of each generated over HTTP.
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
        job_id=job_id, models=models, url=url, images=images, evaluations=evaluations,
        gallery=gallery,
    )


# Metrics printed by the demo, with the direction that is better.
SHOWN = {"clip_i": "↑", "clip_t": "↑", "fid": "↓", "kid": "↓", "prior_clip_i": "↑",
         "class_accuracy": "↑", "colour_distance": "↓"}


def before_after(evaluation) -> list[str]:
    """'beaded-hoops  clip_i ↑ 0.612 -> 0.781' lines: each shown metric, base then fine-tuned."""
    lines = []
    for concept in evaluation.concepts:
        base = {m.metric: m.value for m in concept.base_metrics}
        parts = []
        for m in concept.metrics:
            if m.metric in SHOWN and m.value is not None:
                before = base.get(m.metric)
                parts.append(f"{m.metric} {SHOWN[m.metric]} "
                             + (f"{before:.3g} -> " if before is not None else "") + f"{m.value:.3g}")
        missing = sorted(m.metric for m in concept.metrics if m.value is None)
        lines.append(f"{evaluation.model} {concept.concept}: " + ", ".join(parts)
                     + (f" (unavailable: {', '.join(missing)})" if missing else ""))
    return lines


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
