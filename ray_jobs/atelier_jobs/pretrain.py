"""Ray job: pretrain the shop base on the shop world, from a seed.

    python -m atelier_jobs.pretrain --spec '<PretrainSpec JSON>'

One Ray Train worker runs four phases, each ending in a checkpoint in S3 (a resubmitted run
resumes after the last phase it finished):
1. the VAE, on world images drawn on the fly (MSE weighted toward the item's pixels, plus a loss
   on each item's mean colour, so that the metals' hues survive the round trip);
2. the world's latents, encoded once (encoding was nearly half of the UNet's time otherwise);
3. the UNet and the text encoder, jointly, on those latents, with caption dropout for guidance
   and an EMA of the UNet's weights;
4. the shop CLIP, contrastively, on world images (half of them seen through the VAE, as
   generated images are) and their captions.
The driver then packs the final checkpoint (`atelier.models.shop.pack`) and commits it to S3.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
import torch.nn.functional as F

from atelier.catalogue import world
from atelier.models import shop
from atelier.models.builtin import BUILTIN
from atelier.models.tokenizer import build_clip_tokenizer
from atelier.quality import probes
from atelier.storage import Storage
from atelier.training import events
from atelier.training.pretrain import PretrainConfig, PretrainSpec

PHASES = ("vae", "unet", "clip")
STATE = "state.pt"
# World indices: training draws from [0, EVAL_FROM); measurements use the images after it.
EVAL_FROM = 10_000_000


def train_loop_per_worker(config: dict) -> None:
    cfg = PretrainConfig.model_validate(config)
    torch.set_num_threads(max(1, int(cfg.cpus)))
    components = shop.build_components(cfg.seed)
    done, measured = restore(ray.train.get_checkpoint(), components)
    tokenizer = build_clip_tokenizer()
    evaluation = range(EVAL_FROM, EVAL_FROM + cfg.eval_images)

    if "vae" not in done:
        measured["vae"] = train_vae(cfg, components["vae"], evaluation)
        checkpoint(components, done := done + ["vae"], measured)
    vae = components["vae"].eval().requires_grad_(False)

    latents, indices, scaling = encode_world(cfg, vae)
    measured["latents"] = {"images": len(indices), "scaling_factor": scaling}
    if "unet" not in done:
        measured["unet"] = train_unet(cfg, components, tokenizer, latents, indices)
        checkpoint(components, done := done + ["unet"], measured)

    if "clip" not in done:
        measured["clip"] = train_clip(cfg, components["clip"], vae, tokenizer, latents, indices,
                                      scaling, evaluation)
        checkpoint(components, done + ["clip"], measured)


# --- the phases --------------------------------------------------------------------------------

def train_vae(cfg: PretrainConfig, vae, evaluation: range) -> dict:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    rng = random.Random(f"{cfg.seed}:vae")
    progress = Progress("shop-base:vae", cfg.vae_steps, cfg.log_every)
    for step in range(cfg.vae_steps):
        pixels = torch.from_numpy(world.batch(rng.sample(range(EVAL_FROM), cfg.vae_batch), cfg.seed)[0])
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mask = foreground(pixels)
        area = mask.sum((2, 3)).clamp(min=1)
        loss = (((1 + cfg.foreground_weight * mask) * (reconstruction - pixels) ** 2).mean()
                + cfg.colour_weight * F.mse_loss((reconstruction * mask).sum((2, 3)) / area,
                                                 (pixels * mask).sum((2, 3)) / area)
                + 1e-6 * posterior.kl().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step(step + 1, loss.item())
    vae.eval()
    drawn, _, items = world.batch(evaluation, cfg.seed)
    pixels = torch.from_numpy(drawn)
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss(reconstruction, pixels)
    metals = [it.metal for it in items]
    return progress.summary() | {
        # PSNR over the [-1, 1] range (peak-to-peak 2).
        "eval_psnr_db": round(10 * math.log10(4 / max(mse.item(), 1e-12)), 2),
        # The colour probe's metal, read from the drawings and from their round trips: what the
        # VAE keeps of the metals' hues bounds what any generated image can show.
        "eval_metal_accuracy_drawn": probes.metal_accuracy((pixels + 1) / 2, metals).value,
        "eval_metal_accuracy": probes.metal_accuracy((reconstruction + 1) / 2, metals).value}


def foreground(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) mask of the item's pixels: those far from the backdrop, which is the median
    of the border (as the colour probe reads it)."""
    border = torch.cat([pixels[:, :, 0], pixels[:, :, -1], pixels[:, :, :, 0], pixels[:, :, :, -1]], -1)
    backdrop = border.median(-1).values[:, :, None, None]
    return ((pixels - backdrop).abs().sum(1, keepdim=True) > 0.3).float()


def encode_world(cfg: PretrainConfig, vae) -> tuple[torch.Tensor, list[int], float]:
    """The first `latents` world images as latents (the posterior's mean), scaled to unit
    variance as SD's are: the factor is measured here and stored in the VAE's config, since the
    noise schedule assumes latents of unit variance and this VAE's are not SD's."""
    started, chunks = time.monotonic(), []
    indices = list(range(cfg.latents))
    with torch.no_grad():
        for start in range(0, cfg.latents, 256):
            pixels = torch.from_numpy(world.batch(indices[start:start + 256], cfg.seed)[0])
            chunks.append(vae.encode(pixels).latent_dist.mean)
    latents = torch.cat(chunks)
    scaling = round(1.0 / float(latents.std()), 5)
    vae.register_to_config(scaling_factor=scaling)
    print(json.dumps({"event": "latents", "images": cfg.latents, "scaling_factor": scaling,
                      "seconds": round(time.monotonic() - started, 1)}), flush=True)
    return latents * scaling, indices, scaling


def train_unet(cfg: PretrainConfig, components: dict, tokenizer, latents: torch.Tensor,
               indices: list[int]) -> dict:
    from diffusers import DDPMScheduler

    unet, text_encoder = components["unet"].train(), components["text_encoder"].train()
    spec = BUILTIN[shop.SD_ARCHITECTURE]
    noise_scheduler: Any = DDPMScheduler(**{k: v for k, v in spec.scheduler.items()
                                       if k not in ("set_alpha_to_one", "steps_offset")})
    params = [p for p in [*unet.parameters(), *text_encoder.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(cfg.unet_steps))
    ema = [p.detach().clone() for p in unet.parameters()]
    items = [world.item(i, cfg.seed) for i in indices]
    rng = random.Random(f"{cfg.seed}:unet")
    generator = torch.Generator().manual_seed(cfg.seed)
    progress = Progress("shop-base:unet", cfg.unet_steps, cfg.log_every)
    for step in range(cfg.unet_steps):
        batch = [rng.randrange(len(indices)) for _ in range(cfg.unet_batch)]
        captions = ["" if rng.random() < cfg.caption_dropout else items[i].caption(rng, cfg.caption_keep)
                    for i in batch]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        clean = latents[batch]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        prediction = unet(noise_scheduler.add_noise(clean, noise, t), t,
                          text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # warm-up, as diffusers' EMA
            for shadow, p in zip(ema, unet.parameters(), strict=True):
                shadow.lerp_(p.detach(), 1 - decay)
        progress.step(step + 1, loss.item())
    if cfg.ema_decay:
        with torch.no_grad():
            for shadow, p in zip(ema, unet.parameters(), strict=True):
                p.copy_(shadow)
    unet.eval()
    text_encoder.eval()
    return progress.summary()


def train_clip(cfg: PretrainConfig, clip, vae, tokenizer, latents: torch.Tensor, indices: list[int],
               scaling: float, evaluation: range) -> dict:
    clip.train()
    params = [p for p in clip.parameters() if p.requires_grad]
    # No weight decay, and a warm-up: at 1e-3 without them the logit scale and the towers
    # collapsed to near-chance (loss 4.16 of ln 128 = 4.85, class accuracy 0.27).
    optimizer = torch.optim.AdamW(params, lr=cfg.clip_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(cfg.clip_steps, cfg.clip_warmup))
    rng = random.Random(f"{cfg.seed}:clip")
    progress = Progress("shop-base:clip", cfg.clip_steps, cfg.log_every)
    for step in range(cfg.clip_steps):
        batch = rng.sample(range(len(indices)), cfg.clip_batch)
        drawn, captions, _ = world.batch([indices[i] for i in batch], cfg.seed,
                                         caption_rng=rng, keep=cfg.caption_keep)
        pixels = torch.from_numpy(drawn)
        seen = int(cfg.clip_reconstructed * len(batch))
        if seen:
            with torch.no_grad():
                pixels[:seen] = vae.decode(latents[batch[:seen]] / scaling).sample.clamp(-1, 1)
        ids = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        # Pixels in [-1, 1] are what the preprocessor's mean/std of 0.5 make of [0, 1] images.
        out = clip(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
        loss = contrastive_loss(out.logits_per_image, out.logits_per_text, captions)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        progress.step(step + 1, loss.item())
    clip.eval()
    return progress.summary() | {"eval_class_accuracy": class_accuracy(cfg, clip, tokenizer, evaluation)}


def contrastive_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
                     captions: list[str]) -> torch.Tensor:
    """CLIP's symmetric loss, with every image whose caption is the same as a positive. Shorn
    captions ("photo of a pair of hoops") recur within a batch; CLIP's one-positive targets would
    push apart the images they equally describe. With one-positive targets and whole captions the
    loss fell (1.6 at 300 steps) but class prompts, never seen, were recognised at 0.43; with
    these targets and shorn captions, 0.61 at 250 steps and rising (scratch runs, 2026-11-30)."""
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=logits_per_image.dtype)
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def class_accuracy(cfg: PretrainConfig, clip, tokenizer, evaluation: range) -> float:
    """Zero-shot class accuracy of the shop CLIP on held-out world images (chance: 1/4)."""
    from atelier.catalogue.schema import CLASSES, class_prompt

    classes = sorted({world.item(i, cfg.seed).class_name for i in evaluation} | set(world.HELD_OUT))
    pixels, _, items = world.batch(evaluation, cfg.seed)
    ids = tokenizer([class_prompt(c, CLASSES[c]) for c in classes], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                   pixel_values=torch.from_numpy(pixels))
    predicted = out.logits_per_image.argmax(-1).tolist()
    return round(sum(classes[p] == it.class_name for p, it in zip(predicted, items, strict=True))
                 / len(items), 4)


# --- plumbing ----------------------------------------------------------------------------------

def cosine(total: int, warmup: int = 0):
    """Linear warm-up over `warmup` steps, then cosine decay to a tenth of the peak."""
    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return ramp * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return factor


class Progress:
    """A phase's Step events (as the DreamBooth job emits them) and its summary."""

    def __init__(self, model: str, total: int, every: int):
        self.clock, self.total, self.every = events.StepClock(model, total), total, every
        self.started, self.losses = time.monotonic(), list[float]()

    def step(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if step % self.every == 0 or step == self.total:
            self.clock.emit(step, loss)

    def summary(self) -> dict:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {"steps": self.total, "seconds": round(time.monotonic() - self.started, 1),
                "final_loss": round(sum(tail) / len(tail), 5)}


def checkpoint(components: dict, done: list[str], measured: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"done": done, "measured": measured,
                    "state": {name: m.state_dict() for name, m in components.items()}},
                   Path(tmp) / STATE)
        ray.train.report({"phase": done[-1], "measured": json.dumps(measured)},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(saved, components: dict) -> tuple[list[str], dict]:
    if saved is None:
        return [], {}
    with saved.as_directory() as folder:
        state = torch.load(Path(folder) / STATE, weights_only=True)
    for name, module in components.items():
        module.load_state_dict(state["state"][name])
    events.emit(events.Resumed(model="shop-base", step=len(state["done"])))
    return list(state["done"]), dict(state["measured"])


def fit(storage: Storage, spec: PretrainSpec):
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    _, runs_path = storage.resolve(storage.uri("runs"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.config.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                     resources_per_worker={"CPU": spec.config.cpus}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(
            name=spec.run_name, storage_path=runs_path,
            storage_filesystem=pafs.S3FileSystem(**storage.s3_options()),
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    return trainer.fit()


def publish(storage: Storage, spec: PretrainSpec, result) -> str:
    """Pack the final checkpoint and commit it to S3."""
    components = shop.build_components(spec.config.seed)
    done, measured = restore(result.checkpoint, components)
    if done != list(PHASES):
        raise RuntimeError(f"the final checkpoint finished phases {done}, expected {list(PHASES)}")
    components["vae"].register_to_config(scaling_factor=measured["latents"]["scaling_factor"])
    with tempfile.TemporaryDirectory() as tmp:
        shop.pack(components, Path(tmp), seed=spec.config.seed,
                  info={"pretrain": spec.config.model_dump(mode="json"), "run": spec.run_name,
                        "measured": measured})
        storage.commit(tmp, spec.out_uri, {"kind": "shop-base-pack", "run": spec.run_name},
                       overwrite=True)
    return spec.out_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="PretrainSpec as JSON")
    spec = PretrainSpec.model_validate_json(parser.parse_args(argv).spec)
    ray.init(log_to_driver=True)
    storage = Storage()
    result = fit(storage, spec)
    if result.error:
        raise result.error
    uri = publish(storage, spec, result)
    events.emit(events.Published(model="shop-base", uri=uri, loss=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
