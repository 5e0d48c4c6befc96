"""Pretraining the shop base (`atelier models pretrain`): its settings, and the job's submission.

The job (`atelier_jobs.pretrain`) trains, from the seed, on the shop world: the VAE, then the UNet
and the text encoder on the VAE's cached latents, then the shop CLIP, as one Ray Train run whose
checkpoints (one per phase) go to S3, so a resubmitted run resumes at the phase it lost.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from atelier.models.shop import INFO, WEIGHTS
from atelier.names import slug
from atelier.rayjobs import Jobs
from atelier.settings import Settings
from atelier.storage import Storage


class PretrainConfig(BaseModel):
    """How the shop base is pretrained: about 80 minutes on 2 CPU cores at the defaults.
    `smoke()` is the same job, seconds long, for tests."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="Seed of the weights, the world and every draw.")
    vae_steps: int = Field(1200, ge=1, description="VAE steps on world images drawn on the fly.")
    vae_batch: int = Field(32, ge=1, description="VAE batch.")
    vae_lr: float = Field(1e-3, gt=0, description="VAE AdamW learning rate.")
    foreground_weight: float = Field(
        8.0, ge=0, description="Extra weight of the item's pixels in the VAE's loss: thin metal lines "
                               "are a few percent of an image and blur into the backdrop otherwise.")
    colour_weight: float = Field(
        4.0, ge=0, description="Weight of the VAE's loss on each item's mean colour (keeps metals' hues).")
    latents: int = Field(16384, ge=2, description="World images encoded once for the UNet phase.")
    unet_steps: int = Field(3000, ge=1, description="UNet + text encoder steps on cached latents.")
    unet_batch: int = Field(128, ge=1, description="UNet batch.")
    unet_lr: float = Field(5e-4, gt=0, description="Peak AdamW learning rate (cosine decay to 1/10).")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the UNet's weights (0: none).")
    caption_keep: float = Field(
        0.7, ge=0, le=1, description="Chance each caption part (style, metal, backdrop) is kept.")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="Empty captions (for guidance).")
    clip_steps: int = Field(1200, ge=1, description="Shop CLIP contrastive steps.")
    clip_batch: int = Field(128, ge=2, description="Shop CLIP batch.")
    clip_lr: float = Field(5e-4, gt=0, description="Shop CLIP peak AdamW learning rate.")
    clip_warmup: int = Field(50, ge=0, description="Shop CLIP steps of linear learning-rate warm-up.")
    clip_reconstructed: float = Field(
        0.5, ge=0, le=1,
        description="Share of each CLIP batch shown through the VAE, as generated images look.")
    eval_images: int = Field(256, ge=8, description="Held-out world images the phases are measured on.")
    log_every: int = Field(25, ge=1, description="Steps between progress events.")
    cpus: float = Field(2, gt=0, description="CPUs of the one Ray Train worker.")

    @classmethod
    def smoke(cls, **overrides) -> PretrainConfig:
        values = dict(vae_steps=2, vae_batch=4, latents=16, unet_steps=2, unet_batch=8,
                      clip_steps=2, clip_batch=8, clip_warmup=1, eval_images=8, log_every=1, cpus=1)
        return cls(**(values | overrides))


class PretrainSpec(BaseModel):
    """The job's arguments."""

    model_config = ConfigDict(extra="forbid")

    config: PretrainConfig = Field(description="The pretraining settings.")
    run_name: str = Field(description="Ray Train run (resubmitting it resumes it).")
    out_uri: str = Field(description="Where the job commits the pack (s3://).")


def submit_pretrain(settings: Settings, config: PretrainConfig, *, run_name: str | None = None
                    ) -> tuple[str, PretrainSpec]:
    storage = Storage(settings)
    storage.check()
    run_name = run_name or slug(f"shop-base-{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    spec = PretrainSpec(config=config, run_name=run_name,
                        out_uri=storage.uri("base-models", "shop", run_name))
    entrypoint = f"python -m atelier_jobs.pretrain --spec {shlex.quote(spec.model_dump_json())}"
    job_id = Jobs(settings).submit(entrypoint, metadata={"kind": "pretrain", "run": run_name})
    return job_id, spec


def fetch_pack(settings: Settings, spec: PretrainSpec, out: Path,
               on_file: Callable[[str], None] | None = None) -> Path:
    """Copy the committed pack (verified by the storage's manifest) to `out`."""
    import shutil

    local = Storage(settings).fetch_cached(spec.out_uri)
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, INFO):  # not the storage's manifest.json, which describes the commit
        shutil.copy2(local / name, out / name)
        if on_file:
            on_file(name)
    return out
