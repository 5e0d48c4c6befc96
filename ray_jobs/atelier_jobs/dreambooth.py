"""DreamBooth training loop, run by every Ray Train worker: data, models, loop, checkpoint.

It follows the study and diffusers' `train_dreambooth.py`: encode instance images to latents with
the frozen VAE, add noise at a random timestep, condition the UNet on the instance prompt's
embedding, and regress the noise (MSE); optionally add the prior-preservation loss on class images.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from PIL import Image

from atelier.catalogue.pixels import open_rgb
from atelier.catalogue.schema import ConceptsFile
from atelier.errors import InvalidInput
from atelier.models.libraries import quiet_libraries
from atelier.models.load import native_resolution, resolve_model
from atelier.storage import Storage, verify_local, write_local_manifest
from atelier.training import events
from atelier.training.spec import ModelRun

STATE = "state.pt"
STATE_KEYS = {"step", "losses", "eval_start", "unet", "text_encoder", "optimizer", "scaler", "curve"}
LOG_EVERY = 10


@dataclass
class Worker:
    """What Ray Train hands one worker: its place in the group, its device, the checkpoint to
    resume from, and where checkpoints go. `train` sees Ray only through this."""

    rank: int
    world: int
    device: torch.device
    checkpoint: ray.train.Checkpoint | None
    report: Callable[..., None]  # (metrics, checkpoint=...) as ray.train.report
    prepare_model: Callable  # wraps a module for data-parallel training (DDP)
    storage: Storage


def train_loop_per_worker(run_json: dict) -> None:
    """Ray Train's entrypoint on every worker."""
    ctx = ray.train.get_context()
    train(ModelRun.model_validate(run_json), Worker(
        rank=ctx.get_world_rank(), world=ctx.get_world_size(),
        device=ray.train.torch.get_device(), checkpoint=ray.train.get_checkpoint(),
        report=ray.train.report,
        prepare_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False),
        storage=Storage(),
    ))


def train(run: ModelRun, worker: Worker) -> None:
    cfg = run.config
    rank, device = worker.rank, worker.device
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    quiet_libraries()
    text_trains = cfg.train_text_encoder or cfg.method == "textual_inversion"

    # ---- data ---------------------------------------------------------------------------------
    dataset = worker.storage.fetch_cached(run.dataset_uri)
    concepts = [c for c in ConceptsFile.load(dataset / "concepts.yaml").concepts
                if c.name in run.concepts]
    base_dir = resolve_model(cfg.base_model, settings=worker.storage.settings, storage=worker.storage)
    resolution = cfg.resolution or native_resolution(base_dir)
    examples = load_examples(run, worker.storage, dataset, concepts, resolution)

    # ---- models -------------------------------------------------------------------------------
    models = load_models(base_dir, device, _weight_dtype(cfg, on_gpu))
    keep_frozen_rows = unfreeze(cfg, models, concepts)
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable()
    if on_gpu and _use_xformers(cfg):
        models.unet.enable_xformers_memory_efficient_attention()
    to_training_dtypes(cfg, models)
    if cfg.cache_latents:
        examples.encode_once(models, prompts=not text_trains)

    # ---- optimizer, distributed wrappers ------------------------------------------------------
    trained = [p for m in (models.unet, models.text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, on_gpu, trained)
    if cfg.method != "textual_inversion":
        models.unet = worker.prepare_model(models.unet)
    if text_trains:
        models.text_encoder = worker.prepare_model(models.text_encoder)
    # fp16's range is narrow: small gradients underflow to zero unless the loss is scaled up
    # first. bf16 has float32's range and needs no scaler.
    scaler = torch.amp.GradScaler(device.type, enabled=models.weight_dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=models.weight_dtype,
                              enabled=models.weight_dtype != torch.float32)

    # ---- resume -------------------------------------------------------------------------------
    start_step = 0
    losses: list[float] = []
    curve: list[dict] = []  # each checkpoint's quality metrics, when an eval encoder is set
    eval_start = evaluate(models, examples, autocast)
    if worker.checkpoint:
        start_step, losses, eval_start, curve = load_checkpoint(worker.checkpoint, models, optimizer,
                                                                scaler)
        if rank == 0:
            events.emit(events.Resumed(model=run.model_name, step=start_step))

    encoder = None
    if cfg.eval_encoder and rank == 0:
        from atelier.quality.encoders import ClipEncoder

        encoder = ClipEncoder.load(cfg.eval_encoder, settings=worker.storage.settings)

    # ---- loop ---------------------------------------------------------------------------------
    models.unet.train()
    models.text_encoder.train(text_trains)
    clock = events.StepClock(run.model_name, cfg.max_train_steps, start=start_step)
    loop_start = time.monotonic()
    precision: dict | None = None  # what the first step really ran with
    if rank == 0:
        events.emit(events.Start(model=run.model_name, step=start_step, total=cfg.max_train_steps,
                                 images=examples.n_instance, prior=examples.n_prior,
                                 workers=worker.world))
    prior_loss_weight = cfg.prior_loss_weight if examples.n_prior else None
    for step in range(start_step, cfg.max_train_steps):
        step_loss = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            idx, gen = draw(cfg, step, micro, rank, examples)
            with autocast:
                latents, noise, timesteps = noised_latents(models, examples.latent_params(models, idx), gen)
                hidden = examples.embeddings(models, idx)
                loss, pred = compute_loss(models, latents, noise, timesteps, hidden,
                                          prior_loss_weight=prior_loss_weight)
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
            step_loss += loss.item() / cfg.gradient_accumulation_steps

        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm, foreach=True)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        keep_frozen_rows()
        losses.append(step_loss)
        if precision is None:
            precision = _precision(pred.dtype, models, optimizer, scaler)
            if rank == 0:
                events.emit(events.Precision(model=run.model_name, **precision))

        done = step + 1
        if rank == 0 and (done % LOG_EVERY == 0 or done == cfg.max_train_steps):
            clock.emit(done, round(step_loss, 6), max_gpu_mb=_max_gpu_mb())

        # ---- checkpoint -----------------------------------------------------------------------
        if done % cfg.checkpoint_every == 0 or done == cfg.max_train_steps:
            # loop_s: this worker's time in the loop so far (steps and measurements, not start-up
            # or waiting for a worker): what a sweep charges a trial for.
            metrics = {"step": done, "loss": float(np.mean(losses[-LOG_EVERY:])),
                       "loop_s": round(time.monotonic() - loop_start, 3)}
            with tempfile.TemporaryDirectory() as folder:
                ckpt = None
                if rank == 0:
                    evals = {"eval_loss_start": eval_start, "eval_loss": evaluate(models, examples, autocast)}
                    metrics.update(evals)
                    if encoder is not None:
                        curve.append({"step": done, **checkpoint_quality(
                            run, models, concepts, dataset, resolution, autocast, encoder)})
                        metrics.update({f"quality_{k}": v for k, v in curve[-1].items() if k != "step"})
                    save_checkpoint(Path(folder), run, done, losses, evals, precision, models,
                                    optimizer, scaler, resolution, autocast, curve)
                    ckpt = ray.train.Checkpoint.from_directory(folder)
                worker.report(metrics, checkpoint=ckpt)
            if rank == 0:
                events.emit(events.Checkpoint(model=run.model_name, step=done, loss=metrics["loss"],
                                              eval_loss=metrics["eval_loss"],
                                              quality=curve[-1] if encoder is not None else None))


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class Examples:
    """The training examples as (pixels, prompt): the instance images, then the class images of
    the prior loss. Their VAE distributions and prompt embeddings may be encoded once up front
    (the frozen encoders then run once, not every step)."""

    items: list[tuple[torch.Tensor, str]]
    n_instance: int
    dists: torch.Tensor | None = None
    embeds: torch.Tensor | None = None

    @property
    def n_prior(self) -> int:
        return len(self.items) - self.n_instance

    def encode_once(self, models: Models, *, prompts: bool) -> None:
        """Cache the latent distributions, and the prompt embeddings where the text encoder is
        frozen (`prompts`)."""
        self.dists = torch.cat([models.latent_dist(px[None]) for px, _ in self.items])
        if prompts:
            unique = sorted({p for _, p in self.items})
            with torch.no_grad():
                table = dict(zip(unique, models.encode_prompts(unique), strict=True))
            self.embeds = torch.stack([table[p] for _, p in self.items])

    def latent_params(self, models: Models, idx: list[int]) -> torch.Tensor:
        if self.dists is not None:
            return self.dists[idx]
        return models.latent_dist(torch.stack([self.items[i][0] for i in idx]))

    def embeddings(self, models: Models, idx: list[int], encoder=None) -> torch.Tensor:
        if self.embeds is not None:
            return self.embeds[idx]
        return models.encode_prompts([self.items[i][1] for i in idx], encoder)


def load_examples(run: ModelRun, storage: Storage, dataset: Path, concepts: list,
                  resolution: int) -> Examples:
    """The instance images with their prompts, then the class images of the prior loss."""
    cfg = run.config
    instance = [
        (_load_pixels(img.resolve(dataset), resolution, cfg.center_crop, cfg.seed),
         c.instance_prompt if cfg.use_identifier else c.instance_prompt.replace(f"{c.identifier} ", ""))
        for c in concepts for img in c.images
    ]
    prior: list[tuple[torch.Tensor, str]] = []
    if cfg.with_prior_preservation:
        for prompt in sorted({c.class_prompt for c in concepts}):
            folder = storage.fetch_cached(run.class_images[prompt])
            prior += [(_load_pixels(p, resolution, True, cfg.seed), prompt) for p in sorted(folder.glob("*.png"))]
    return Examples(instance + prior, n_instance=len(instance))


def draw(cfg, step: int, micro: int, rank: int, examples: Examples) -> tuple[list[int], torch.Generator]:
    """Which examples a micro-batch trains on, and the generator of its noise: a function of
    (seed, step, micro-batch, rank) only, so a resumed run sees exactly the batches the
    interrupted one would have seen. With the prior loss, class examples make the second half."""
    # hash() of a tuple of ints is the same in every process; of a str it is not (PYTHONHASHSEED).
    rng = random.Random(hash((cfg.seed, step, micro, rank)))
    idx = [rng.randrange(examples.n_instance) for _ in range(cfg.train_batch_size)]
    if examples.n_prior:
        idx += [examples.n_instance + rng.randrange(examples.n_prior) for _ in range(cfg.train_batch_size)]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro * 31 + rank)
    return idx, gen


# ---- models -------------------------------------------------------------------------------------
@dataclass
class Models:
    """The pipeline's components being trained, on the worker's device. `unet` and `text_encoder`
    become their DDP wrappers where they train; `_unwrap` gives the bare module."""

    tokenizer: Any  # CLIPTokenizer
    text_encoder: Any  # CLIPTextModel
    vae: Any  # AutoencoderKL
    unet: Any  # UNet2DConditionModel
    noise_scheduler: Any  # DDPMScheduler
    device: torch.device
    weight_dtype: torch.dtype  # of the frozen weights, and autocast's

    def encode_prompts(self, prompts: list[str], encoder=None) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return (encoder or self.text_encoder)(ids)[0]

    def latent_dist(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distribution (mean and log-variance, concatenated) of some images."""
        with torch.no_grad():
            return self.vae.encode(pixels.to(self.device, dtype=self.weight_dtype)).latent_dist.parameters


def load_models(base_dir: str, device: torch.device, weight_dtype: torch.dtype) -> Models:
    """The base model's components, all frozen (on the CPU until `to_training_dtypes`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    models = Models(
        tokenizer=CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(base_dir, subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet"),
        noise_scheduler=DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler"),
        device=device, weight_dtype=weight_dtype,
    )
    for module in (models.vae, models.text_encoder, models.unet):
        module.requires_grad_(False)
    return models


def unfreeze(cfg, models: Models, concepts: list) -> Callable[[], None]:
    """Unfreeze what the method trains. Returns what to run after each optimizer step: for
    textual inversion, AdamW's weight decay moves every embedding row, and only the identifiers'
    rows may change."""
    if cfg.method == "full":
        models.unet.requires_grad_(True)
        if cfg.train_text_encoder:
            models.text_encoder.requires_grad_(True)
        return lambda: None
    if cfg.method == "lora":
        from atelier.models.adapters import add_lora

        add_lora(models.unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, wide=cfg.lora_wide,
                 text_encoder=models.text_encoder if cfg.train_text_encoder else None)
        return lambda: None
    # Textual inversion: the identifier becomes a new token whose embedding alone trains.
    tokenizer, text_encoder = models.tokenizer, models.text_encoder
    for c in concepts:
        tokenizer.add_tokens([_ti_token(c.identifier)])
    text_encoder.resize_token_embeddings(len(tokenizer))
    embeddings = text_encoder.get_input_embeddings().weight
    token_ids = []
    with torch.no_grad():
        for c in concepts:
            new = tokenizer.convert_tokens_to_ids(_ti_token(c.identifier))
            init = tokenizer.encode(c.class_prompt.split()[-1], add_special_tokens=False)[0]
            embeddings[new] = embeddings[init].clone()  # start from the class noun
            token_ids.append(new)
    text_encoder.get_input_embeddings().requires_grad_(True)
    frozen_rows = torch.ones(len(tokenizer), dtype=torch.bool)
    frozen_rows[token_ids] = False
    original = embeddings.detach().clone()

    def keep_frozen_rows() -> None:
        with torch.no_grad():
            weight = text_encoder.get_input_embeddings().weight
            weight[frozen_rows] = original[frozen_rows].to(weight.dtype)

    return keep_frozen_rows


def to_training_dtypes(cfg, models: Models) -> None:
    """Mixed precision as in diffusers' scripts: frozen weights are stored in the compute dtype
    (half the bytes of float32), every trained parameter stays float32 (an fp16/bf16 update of
    lr 1e-6 rounds to nothing), and the forward passes run under autocast, which casts each op's
    inputs to one dtype."""
    device, weight_dtype = models.device, models.weight_dtype
    text_trains = cfg.train_text_encoder or cfg.method == "textual_inversion"
    models.vae.to(device, dtype=weight_dtype)
    models.unet.to(device, dtype=torch.float32 if cfg.method == "full" else weight_dtype)
    # The text encoder is small: whole in float32 when any of it trains (its embeddings for
    # textual inversion), with only the adapters in float32 for LoRA.
    text_fp32 = text_trains and cfg.method != "lora"
    models.text_encoder.to(device, dtype=torch.float32 if text_fp32 else weight_dtype)
    if cfg.method == "lora":
        from diffusers.training_utils import cast_training_params

        cast_training_params([models.unet, models.text_encoder], dtype=torch.float32)


# ---- loss ---------------------------------------------------------------------------------------
def noised_latents(models: Models, latent_params: torch.Tensor, gen: torch.Generator):
    """Latents sampled from the VAE's distribution, the noise to add and random timesteps."""
    mean, logvar = latent_params.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    latents = (mean + std * torch.randn(mean.shape, generator=gen).to(models.device))
    latents = latents * models.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen).to(models.device)
    timesteps = torch.randint(0, models.noise_scheduler.config.num_train_timesteps,
                              (latents.shape[0],), generator=gen).to(models.device)
    return latents, noise, timesteps


def compute_loss(models: Models, latents: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor, hidden: torch.Tensor, *, prior_loss_weight: float | None = None,
                 unet=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction on the noised latents against its target (the noise, or the velocity
    for a v-prediction model), as MSE; with `prior_loss_weight`, the batch's second half are class
    images and their loss is added with that weight. Returns the loss and the prediction."""
    scheduler = models.noise_scheduler
    pred = (unet or models.unet)(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if prior_loss_weight is None:
        return F.mse_loss(pred.float(), target.float()), pred
    instance, prior = pred.chunk(2)
    target, target_prior = target.chunk(2)
    loss = F.mse_loss(instance.float(), target.float())
    return loss + prior_loss_weight * F.mse_loss(prior.float(), target_prior.float()), pred


def evaluate(models: Models, examples: Examples, autocast) -> float:
    """Loss on a fixed batch (every instance image, fixed noise and timesteps): unlike the
    training loss, it is comparable across steps, so it shows whether the model learns.

    Only rank 0 evaluates at a checkpoint, so it runs the bare modules: a DDP wrapper's forward
    broadcasts buffers to ranks that are not there, and the job hangs."""
    unet, text_encoder = _unwrap(models.unet), _unwrap(models.text_encoder)
    num_timesteps = models.noise_scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(12345)
    total = 0.0
    with torch.no_grad(), autocast:
        for i in range(examples.n_instance):
            mean = examples.latent_params(models, [i]).float().chunk(2, dim=1)[0]
            mean = mean * models.vae.config.scaling_factor
            noise = torch.randn(mean.shape, generator=gen).to(models.device)
            t = torch.tensor([(i * 97 + 500) % num_timesteps], device=models.device)
            hidden = examples.embeddings(models, [i], text_encoder)
            total += compute_loss(models, mean, noise, t, hidden, unet=unet)[0].item()
    return total / examples.n_instance


# ---- checkpoint ---------------------------------------------------------------------------------
def save_checkpoint(folder: Path, run: ModelRun, step: int, losses: list[float], evals: dict,
                    precision: dict, models: Models, optimizer, scaler, resolution: int,
                    autocast, curve: list[dict] | None = None) -> None:
    """Training state, the exported weights in their final format, validation images, manifest.

    Exported weights are float32 whatever the training precision (they are the float32 master
    weights): a replica casts them to its own dtype as it loads them.
    """
    cfg = run.config
    unet, text_encoder = _unwrap(models.unet), _unwrap(models.text_encoder)
    # Plain tensors, numbers, lists and dicts only: `load_checkpoint` reads it with
    # weights_only=True, which unpickles nothing else.
    torch.save({"step": step, "losses": losses, "eval_start": evals["eval_loss_start"],
                "unet": _trained_state(unet), "text_encoder": _trained_state(text_encoder),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "curve": list(curve or [])},
               folder / STATE)
    model = folder / "model"
    if cfg.method == "full":
        unet.save_pretrained(model / "unet", safe_serialization=True)
        if cfg.train_text_encoder:
            text_encoder.save_pretrained(model / "text_encoder", safe_serialization=True)
    elif cfg.method == "lora":
        from atelier.models import adapters

        adapters.save_lora(unet, model, text_encoder=text_encoder if cfg.train_text_encoder else None)
    else:
        from atelier.models import adapters

        for identifier in run.identifiers:
            adapters.save_textual_inversion(text_encoder, models.tokenizer, _ti_token(identifier),
                                            model / identifier)
    (folder / "training.json").write_text(json.dumps(
        {"step": step, "loss": float(np.mean(losses[-LOG_EVERY:])), "steps_recorded": len(losses),
         **evals, "model_name": run.model_name, "precision": precision,
         "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
         "concepts": run.concepts, "config": cfg.model_dump(mode="json"),
         "quality_curve": list(curve or [])}, indent=2))
    _validation_images(folder / "validation", run, _pipeline(unet, text_encoder, models), resolution,
                       autocast)
    write_local_manifest(folder, {"kind": "checkpoint", "step": step, "model": run.model_name})


def load_checkpoint(checkpoint: ray.train.Checkpoint, models: Models, optimizer,
                    scaler) -> tuple[int, list[float], float, list[dict]]:
    """Restore the training state of a checkpoint: (step, losses so far, first eval loss, the
    quality curve so far).

    Strict: a checkpoint whose trained tensors are not exactly this run's (another method, LoRA
    rank or text-encoder setting under the same run name) is refused, not loaded in part."""
    with checkpoint.as_directory() as folder:
        verify_local(folder)  # a checkpoint is trusted only if every file matches its hash
        where = str(Path(folder) / STATE)
        try:
            state = torch.load(where, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise InvalidInput("training state holds more than tensors and plain values; not "
                               f"loaded ({str(e).splitlines()[0]})", where=where) from e
        if set(state) not in (STATE_KEYS, STATE_KEYS - {"curve"}):  # a run from before quality curves
            raise InvalidInput(f"training state has keys {sorted(state)}, expected "
                               f"{sorted(STATE_KEYS)}", where=where)
        for name in ("unet", "text_encoder"):
            module = _unwrap(getattr(models, name))
            _check_trained_state(name, module, state[name], where=where)
            # Only the trained tensors are saved; the frozen ones are the base model's. Each is
            # copied into the existing tensor, so it keeps its dtype.
            module.load_state_dict(state[name], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    return state["step"], state["losses"], state["eval_start"], state.get("curve", [])


def _trained_state(module) -> dict[str, torch.Tensor]:
    """The tensors of a module's trained parameters: what a checkpoint's state keeps of it."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in names}


def _check_trained_state(name: str, module, saved: dict, where: str) -> None:
    expected = _trained_state(module)
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & saved.keys() if saved[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

        parts = [f"{label} {some(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped)) if keys]
        raise InvalidInput(
            f"checkpoint does not fit the {name} this run trains: {'; '.join(parts)}", where=where,
            hint="the run was started with another method or config; resubmit under a new run name")


def checkpoint_quality(run: ModelRun, models: Models, concepts: list, dataset: Path, resolution: int,
                       autocast, encoder) -> dict[str, float | None]:
    """CLIP-I to the instance photos, CLIP-T (prompt without the identifier) and the colour probe
    of cfg.eval_images images per concept, averaged over the concepts: a point of the run's
    quality curve (atelier.quality's metrics, as `atelier eval` computes them)."""
    from PIL import Image

    from atelier.quality import metrics, probes
    from atelier.quality.evaluation import tensor, without

    cfg = run.config
    unet, text_encoder = _unwrap(models.unet), _unwrap(models.text_encoder)
    pipe = _pipeline(unet, text_encoder, models)
    was_training = unet.training
    unet.eval()
    values: dict[str, list[float]] = {"clip_i": [], "clip_t": [], "colour_distance": []}
    with torch.no_grad(), autocast:
        for concept in concepts:
            generators = [torch.Generator().manual_seed(s) for s in range(cfg.eval_images)]
            images = pipe([concept.instance_prompt] * cfg.eval_images, height=resolution, width=resolution,
                          num_inference_steps=cfg.validation_steps, generator=generators).images
            real = [Image.open(image.resolve(dataset)).convert("RGB") for image in concept.images]
            generated, photos = tensor(images, resolution), tensor(real, resolution)
            prompt = without(concept.identifier, concept.instance_prompt)
            for value in (metrics.clip_i(generated, photos, encoder),
                          metrics.clip_t(generated, [prompt] * len(images), encoder),
                          probes.colour_distance(images, real)):
                if value.value is not None:
                    values[value.metric].append(value.value)
    unet.train(was_training)
    return {k: round(float(np.mean(v)), 5) if v else None for k, v in values.items()}


def _pipeline(unet, text_encoder, models: Models):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline(  # diffusers' pipelines are typed loosely
        vae=models.vae, text_encoder=text_encoder, tokenizer=models.tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(models.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _validation_images(folder: Path, run: ModelRun, pipe, resolution: int, autocast) -> None:
    """Images of the validation prompts, under the training step's autocast: in mixed precision
    the components hold different dtypes (a float32 UNet or adapters beside a half VAE)."""
    cfg = run.config
    prompts = run.validation_prompts
    folder.mkdir(parents=True)
    unet = pipe.unet
    was_training = unet.training
    unet.eval()
    with torch.no_grad(), autocast:
        for i, prompt in enumerate(prompts):
            for seed in cfg.validation_seeds:
                image = pipe(prompt, num_inference_steps=cfg.validation_steps, height=resolution,
                             width=resolution, generator=torch.Generator().manual_seed(seed)).images[0]
                image.save(folder / f"{i:02d}-seed{seed}.png")
    unet.train(was_training)


# ---- small helpers ------------------------------------------------------------------------------
def _precision(computed_in: torch.dtype, models: Models, optimizer, scaler) -> dict:
    """The precision a step really ran with, read off the tensors rather than the config: the
    dtype the UNet computed in, each module's frozen and trained weights, the optimizer and the
    dtypes of its state (uint8 where 8-bit AdamW quantised it), the attention kernels."""
    def dtypes(tensors) -> list[str]:
        return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})

    weights = {}
    for name in ("unet", "text_encoder", "vae"):
        params = list(_unwrap(getattr(models, name)).parameters())
        weights[name] = {"frozen": dtypes(p for p in params if not p.requires_grad),
                         "trained": dtypes(p for p in params if p.requires_grad)}
    state_bytes: dict[str, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1:  # not step counters
                key = str(value.dtype).removeprefix("torch.")
                state_bytes[key] = state_bytes.get(key, 0) + value.numel() * value.element_size()
    unet = _unwrap(models.unet)
    return {
        "computed_in": str(computed_in).removeprefix("torch."),
        "weights": weights,
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "optimizer_state_bytes": state_bytes,
        "loss_scaling": scaler.is_enabled(),
        "gradient_checkpointing": bool(unet.is_gradient_checkpointing),
        "attention": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
    }


def _max_gpu_mb() -> float | None:
    """Peak GPU memory of this worker: what `atelier bench train` reports for a GPU pool."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _unwrap(model):
    return getattr(model, "module", model)


def _load_pixels(path: Path, resolution: int, center_crop: bool, seed: int) -> torch.Tensor:
    """An RGB image resized on its short side, cropped to a square, scaled to [-1, 1]. Decoded by
    the catalogue's `open_rgb`, as the build checked it: upright by EXIF, alpha over white, 16-bit scaled.

    A random crop is a function of (seed, file name): every DDP worker, and a resumed run, crop
    an image as the first run did."""
    crop = random.Random(f"{seed}:{path.name}")  # a str seed goes through sha512: stable anywhere
    with open_rgb(path) as im:
        scale = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                       Image.Resampling.BILINEAR)
        left = (im.width - resolution) // 2 if center_crop else crop.randint(0, im.width - resolution)
        top = (im.height - resolution) // 2 if center_crop else crop.randint(0, im.height - resolution)
        im = im.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _ti_token(identifier: str) -> str:
    """Textual inversion's new token is the identifier itself. CLIP's vocabulary holds it only as
    the word-final "olis</w>", so "olis" is a new added token, which the tokenizer matches before
    BPE: the same instance prompt works for training, validation and serving."""
    return identifier


def _weight_dtype(cfg, on_gpu: bool) -> torch.dtype:
    if cfg.mixed_precision == "fp16" or (cfg.mixed_precision == "auto" and on_gpu):
        return torch.float16
    if cfg.mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32


def _use_xformers(cfg) -> bool:
    if cfg.attention == "sdpa":
        return False
    try:
        import xformers  # noqa: F401
    except ImportError:
        if cfg.attention == "xformers":
            raise
        return False
    return True


def make_optimizer(cfg, on_gpu: bool, params: list) -> torch.optim.Optimizer:
    """AdamW as `cfg` asks: bitsandbytes' 8-bit one, or torch's fused one (benchmarks/gpu_sd.py
    times the same call)."""
    use_8bit = cfg.use_8bit_adam
    if use_8bit is None:
        use_8bit = on_gpu and _has_bitsandbytes()
    if use_8bit:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    # The fused kernel updates every tensor in one pass: on the tiny model the per-tensor loop of
    # the default AdamW took 11 ms of a ~28 ms step on CPU; fused takes 4.4 ms.
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay,
                             fused=True)


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True
