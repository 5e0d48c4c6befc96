"""DreamBooth training loop, run by every Ray Train worker: data, models, loop, checkpoint.

It follows the study and diffusers' `train_dreambooth.py`: encode instance images to latents with
the frozen VAE, add noise at a random timestep, condition the UNet on the instance prompt's
embedding, and regress the noise (MSE); optionally add the prior-preservation loss on class images.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import ray.train
import ray.train.torch

from atelier.catalogue.schema import ConceptsFile
from atelier.models import resolve_model
from atelier.models.load import quiet_libraries
from atelier.rayjobs import progress_event
from atelier.storage import Storage, verify_local, write_local_manifest
from atelier.training.spec import ModelRun

STATE = "state.pt"
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
    rank, world, device, storage = worker.rank, worker.world, worker.device, worker.storage
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    quiet_libraries()

    # ---- data ---------------------------------------------------------------------------------
    dataset = storage.fetch_cached(run.dataset_uri)
    concepts = [c for c in ConceptsFile.load(dataset / "concepts.yaml").concepts
                if c.name in run.concepts]
    base_dir = resolve_model(cfg.base_model, settings=storage.settings, storage=storage)
    resolution = cfg.resolution or _native_resolution(base_dir)
    instance = [
        (_load_pixels(img.resolve(dataset), resolution, cfg.center_crop),
         c.instance_prompt if cfg.use_identifier else c.instance_prompt.replace(f"{c.identifier} ", ""))
        for c in concepts for img in c.images
    ]
    prior: list[tuple[torch.Tensor, str]] = []
    if cfg.with_prior_preservation:
        for prompt in sorted({c.class_prompt for c in concepts}):
            folder = storage.fetch_cached(run.class_images[prompt])
            prior += [(_load_pixels(p, resolution, True), prompt) for p in sorted(folder.glob("*.png"))]

    # ---- models -------------------------------------------------------------------------------
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.requires_grad_(False)

    token_ids: list[int] = []
    if cfg.method == "full":
        unet.requires_grad_(True)
        if cfg.train_text_encoder:
            text_encoder.requires_grad_(True)
    elif cfg.method == "lora":
        from atelier.models.adapters import add_lora

        add_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, wide=cfg.lora_wide,
                 text_encoder=text_encoder if cfg.train_text_encoder else None)
    else:  # textual inversion: the identifier becomes a new token whose embedding alone trains
        for c in concepts:
            tokenizer.add_tokens([_ti_token(c.identifier)])
        text_encoder.resize_token_embeddings(len(tokenizer))
        embeddings = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            for c in concepts:
                new = tokenizer.convert_tokens_to_ids(_ti_token(c.identifier))
                init = tokenizer.encode(c.class_prompt.split()[-1], add_special_tokens=False)[0]
                embeddings[new] = embeddings[init].clone()  # start from the class noun
                token_ids.append(new)
        text_encoder.get_input_embeddings().requires_grad_(True)
        frozen_rows = torch.ones(len(tokenizer), dtype=torch.bool)
        frozen_rows[token_ids] = False
        original_embeddings = embeddings.detach().clone()

    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if on_gpu and _use_xformers(cfg):
        unet.enable_xformers_memory_efficient_attention()

    # Mixed precision as in diffusers' scripts: frozen weights are stored in the compute dtype
    # (half the bytes of float32), every trained parameter stays
    # float32 (an fp16/bf16 update of lr 1e-6 rounds to nothing), and the forward passes run
    # under autocast, which casts each op's inputs to one dtype.
    weight_dtype = _weight_dtype(cfg, on_gpu)
    text_trains = cfg.train_text_encoder or cfg.method == "textual_inversion"
    vae.to(device, dtype=weight_dtype)
    unet.to(device, dtype=torch.float32 if cfg.method == "full" else weight_dtype)
    # The text encoder is small: whole in float32 when any of it trains (its embeddings for
    # textual inversion), with only the adapters in float32 for LoRA.
    text_fp32 = text_trains and cfg.method != "lora"
    text_encoder.to(device, dtype=torch.float32 if text_fp32 else weight_dtype)
    if cfg.method == "lora":
        from diffusers.training_utils import cast_training_params

        cast_training_params([unet, text_encoder], dtype=torch.float32)

    # ---- caches: the frozen encoders run once, not every step ----------------------------------
    def encode_prompts(prompts: list[str], encoder=None) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        return (encoder or text_encoder)(ids)[0]

    def latent_dist(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(pixels.to(device, dtype=weight_dtype)).latent_dist.parameters

    examples = instance + prior
    n_instance, n_prior = len(instance), len(prior)
    cached_dists = cached_embeds = None
    if cfg.cache_latents:
        cached_dists = torch.cat([latent_dist(px[None]) for px, _ in examples])
        if not text_trains:
            unique = sorted({p for _, p in examples})
            with torch.no_grad():
                table = dict(zip(unique, encode_prompts(unique)))
            cached_embeds = torch.stack([table[p] for _, p in examples])

    # ---- optimizer, distributed wrappers ------------------------------------------------------
    trained = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, on_gpu, trained)
    if cfg.method != "textual_inversion":
        unet = worker.prepare_model(unet)
    if text_trains:
        text_encoder = worker.prepare_model(text_encoder)
    # fp16's range is narrow: small gradients underflow to zero unless the loss is scaled up
    # first. bf16 has float32's range and needs no scaler.
    scaler = torch.amp.GradScaler(device.type, enabled=weight_dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    def evaluate() -> float:
        """Loss on a fixed batch (every instance image, fixed noise and timesteps): unlike the
        training loss, it is comparable across steps, so it shows whether the model learns.

        Only rank 0 evaluates at a checkpoint, so it runs the bare modules: a DDP wrapper's
        forward broadcasts buffers to ranks that are not there, and the job hangs."""
        unet_m, text_m = _unwrap(unet), _unwrap(text_encoder)
        gen = torch.Generator().manual_seed(12345)
        total = 0.0
        with torch.no_grad(), autocast:
            for i in range(n_instance):
                params = cached_dists[i:i + 1] if cached_dists is not None else latent_dist(examples[i][0][None])
                mean = params.float().chunk(2, dim=1)[0] * vae.config.scaling_factor
                noise = torch.randn(mean.shape, generator=gen).to(device)
                t = torch.tensor([(i * 97 + 500) % noise_scheduler.config.num_train_timesteps], device=device)
                hidden = cached_embeds[i:i + 1] if cached_embeds is not None else encode_prompts([examples[i][1]], text_m)
                pred = unet_m(noise_scheduler.add_noise(mean, noise, t), t, hidden).sample
                target = noise_scheduler.get_velocity(mean, noise, t) \
                    if noise_scheduler.config.prediction_type == "v_prediction" else noise
                total += F.mse_loss(pred.float(), target.float()).item()
        return total / n_instance

    # ---- resume -------------------------------------------------------------------------------
    start_step, losses = 0, []
    eval_start = evaluate()
    if worker.checkpoint:
        with worker.checkpoint.as_directory() as folder:
            verify_local(folder)  # a checkpoint is trusted only if every file matches its hash
            state = torch.load(Path(folder) / STATE, map_location="cpu", weights_only=False)
            # load_state_dict copies into the existing tensors, so each keeps its dtype.
            _unwrap(unet).load_state_dict(state["unet"], strict=False)
            _unwrap(text_encoder).load_state_dict(state["text_encoder"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            if "scaler" in state:  # written since fp16 training keeps a loss scale
                scaler.load_state_dict(state["scaler"])
            start_step, losses, eval_start = state["step"], state["losses"], state["eval_start"]
        if rank == 0:
            print(progress_event(event="resumed", model=run.model_name, step=start_step), flush=True)

    # ---- loop ---------------------------------------------------------------------------------
    unet.train()
    text_encoder.train(text_trains)
    batch = cfg.train_batch_size
    t0, last_log = time.monotonic(), start_step
    precision: dict | None = None  # what the first step really ran with
    if rank == 0:
        print(progress_event(event="start", model=run.model_name, step=start_step,
                             total=cfg.max_train_steps, images=n_instance, prior=n_prior,
                             workers=world), flush=True)
    for step in range(start_step, cfg.max_train_steps):
        step_loss = 0.0
        for micro in range(cfg.gradient_accumulation_steps):
            # Which examples: a function of (seed, step, micro-batch, rank) only, so a resumed
            # run sees exactly the batches the interrupted one would have seen.
            rng = random.Random(hash((cfg.seed, step, micro, rank)))
            idx = [rng.randrange(n_instance) for _ in range(batch)]
            if n_prior:
                idx += [n_instance + rng.randrange(n_prior) for _ in range(batch)]
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + micro * 31 + rank)

            with autocast:
                if cached_dists is not None:
                    params = cached_dists[idx]
                else:
                    params = latent_dist(torch.stack([examples[i][0] for i in idx]))
                mean, logvar = params.float().chunk(2, dim=1)
                std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
                latents = (mean + std * torch.randn(mean.shape, generator=gen).to(device))
                latents = latents * vae.config.scaling_factor
                noise = torch.randn(latents.shape, generator=gen).to(device)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                          (latents.shape[0],), generator=gen).to(device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                if cached_embeds is not None:
                    hidden = cached_embeds[idx]
                else:
                    hidden = encode_prompts([examples[i][1] for i in idx])
                pred = unet(noisy, timesteps, hidden).sample
                computed_in = pred.dtype  # the autocast dtype, as observed
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                if n_prior:
                    pred, pred_prior = pred.chunk(2)
                    target, target_prior = target.chunk(2)
                    loss = F.mse_loss(pred.float(), target.float())
                    loss = loss + cfg.prior_loss_weight * F.mse_loss(pred_prior.float(), target_prior.float())
                else:
                    loss = F.mse_loss(pred.float(), target.float())
            scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
            step_loss += loss.item() / cfg.gradient_accumulation_steps

        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm, foreach=True)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if cfg.method == "textual_inversion":
            # AdamW's weight decay moves every row; only the identifiers' rows may change.
            with torch.no_grad():
                weight = _unwrap(text_encoder).get_input_embeddings().weight
                weight[frozen_rows] = original_embeddings[frozen_rows].to(weight.dtype)
        losses.append(step_loss)
        if precision is None:
            precision = _precision(computed_in, {"unet": unet, "text_encoder": text_encoder,
                                                 "vae": vae}, optimizer, scaler)
            if rank == 0:
                print(progress_event(event="precision", model=run.model_name, **precision), flush=True)

        done = step + 1
        if rank == 0 and (done % LOG_EVERY == 0 or done == cfg.max_train_steps):
            rate = (done - last_log) / max(time.monotonic() - t0, 1e-9)
            print(progress_event(event="step", model=run.model_name, step=done,
                                 total=cfg.max_train_steps, loss=round(step_loss, 6),
                                 steps_per_s=round(rate, 3), max_rss_mb=_max_rss_mb(),
                                 eta_s=round((cfg.max_train_steps - done) / max(rate, 1e-9), 1)),
                  flush=True)
            t0, last_log = time.monotonic(), done

        # ---- checkpoint -----------------------------------------------------------------------
        if done % cfg.checkpoint_every == 0 or done == cfg.max_train_steps:
            metrics = {"step": done, "loss": float(np.mean(losses[-LOG_EVERY:]))}
            with tempfile.TemporaryDirectory() as folder:
                ckpt = None
                if rank == 0:
                    evals = {"eval_loss_start": eval_start, "eval_loss": evaluate()}
                    metrics.update(evals)
                    _save_checkpoint(Path(folder), run, done, losses, evals, precision, unet,
                                     text_encoder, optimizer, scaler, tokenizer, vae,
                                     noise_scheduler, resolution, autocast)
                    ckpt = ray.train.Checkpoint.from_directory(folder)
                worker.report(metrics, checkpoint=ckpt)
            if rank == 0:
                print(progress_event(event="checkpoint", model=run.model_name, step=done,
                                     loss=metrics["loss"], eval_loss=metrics["eval_loss"]), flush=True)


def _save_checkpoint(folder: Path, run: ModelRun, step: int, losses: list[float], evals: dict,
                     precision: dict, unet, text_encoder, optimizer, scaler, tokenizer, vae,
                     noise_scheduler, resolution: int, autocast) -> None:
    """Training state, the exported weights in their final format, validation images, manifest.

    Exported weights are float32 whatever the training precision (they are the float32 master
    weights): a replica casts them to its own dtype as it loads them.
    """
    cfg = run.config
    unet_m, text_m = _unwrap(unet), _unwrap(text_encoder)

    def trainable(module) -> dict:
        names = {n for n, p in module.named_parameters() if p.requires_grad}
        return {k: v for k, v in module.state_dict().items() if k in names}

    torch.save({"step": step, "losses": losses, "eval_start": evals["eval_loss_start"],
                "unet": trainable(unet_m),
                "text_encoder": trainable(text_m), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict()},
               folder / STATE)
    model = folder / "model"
    if cfg.method == "full":
        unet_m.save_pretrained(model / "unet", safe_serialization=True)
        if cfg.train_text_encoder:
            text_m.save_pretrained(model / "text_encoder", safe_serialization=True)
    elif cfg.method == "lora":
        from atelier.models import adapters

        adapters.save_lora(unet_m, model, text_encoder=text_m if cfg.train_text_encoder else None)
    else:
        from atelier.models import adapters

        for identifier in run.identifiers:
            adapters.save_textual_inversion(text_m, tokenizer, _ti_token(identifier),
                                            model / identifier)
    (folder / "training.json").write_text(json.dumps(
        {"step": step, "loss": float(np.mean(losses[-LOG_EVERY:])), "steps_recorded": len(losses),
         **evals, "model_name": run.model_name, "precision": precision,
         "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
         "concepts": run.concepts, "config": cfg.model_dump(mode="json")}, indent=2))
    _validation_images(folder / "validation", run, unet_m, text_m, tokenizer, vae,
                       noise_scheduler, resolution, autocast)
    write_local_manifest(folder, {"kind": "checkpoint", "step": step, "model": run.model_name})


def _validation_images(folder: Path, run: ModelRun, unet, text_encoder, tokenizer, vae,
                       noise_scheduler, resolution: int, autocast) -> None:
    """Images of the validation prompts, under the training step's autocast: in mixed precision
    the components hold different dtypes (a float32 UNet or adapters beside a half VAE)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    cfg = run.config
    prompts = run.validation_prompts
    folder.mkdir(parents=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
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
def _precision(computed_in: torch.dtype, modules: dict, optimizer, scaler) -> dict:
    """The precision a step really ran with, read off the tensors rather than the config: the
    dtype the UNet computed in, each module's frozen and trained weights, the optimizer and the
    dtypes of its state (uint8 where 8-bit AdamW quantised it), the attention kernels."""
    def dtypes(tensors) -> list[str]:
        return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})

    weights = {}
    for name, module in modules.items():
        params = list(_unwrap(module).parameters())
        weights[name] = {"frozen": dtypes(p for p in params if not p.requires_grad),
                         "trained": dtypes(p for p in params if p.requires_grad)}
    state_bytes: dict[str, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1:  # not step counters
                key = str(value.dtype).removeprefix("torch.")
                state_bytes[key] = state_bytes.get(key, 0) + value.numel() * value.element_size()
    unet = _unwrap(modules["unet"])
    return {
        "computed_in": str(computed_in).removeprefix("torch."),
        "weights": weights,
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "optimizer_state_bytes": state_bytes,
        "loss_scaling": scaler.is_enabled(),
        "gradient_checkpointing": bool(unet.is_gradient_checkpointing),
        "attention": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
    }


def _max_rss_mb() -> float:
    """Peak resident memory of this worker process so far."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _unwrap(model):
    return getattr(model, "module", model)


def _native_resolution(base_dir: str) -> int:
    config = json.loads(Path(base_dir, "unet", "config.json").read_text())
    vae = json.loads(Path(base_dir, "vae", "config.json").read_text())
    return int(config["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _load_pixels(path: Path, resolution: int, center_crop: bool) -> torch.Tensor:
    """An RGB image resized on its short side, cropped to a square, scaled to [-1, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = resolution / min(im.size)
        im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                       Image.Resampling.BILINEAR)
        left = (im.width - resolution) // 2 if center_crop else random.randint(0, im.width - resolution)
        top = (im.height - resolution) // 2 if center_crop else random.randint(0, im.height - resolution)
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


def _optimizer(cfg, on_gpu: bool, params: list) -> torch.optim.Optimizer:
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
