"""Stable Diffusion models built from configs, deterministic from a seed.

No weights can be downloaded here, so every path runs on models built from their architecture:
- `tiny`: SD-shaped (latents 1/8 of the image side, 4 channels; CLIP tokenizer, 77 tokens), about
  10 MB, for tests and the demo: a train-save-load-generate cycle takes seconds on 2 CPU cores.
- `sd15`, `sd21-base`: the published architectures with random weights, for measuring latency,
  memory and FLOPs without the weights.
Each is saved in the standard diffusers folder layout, so everything downstream loads it like a
real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atelier.errors import IntegrityError, InvalidInput

_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
)


BUILT = "atelier_builtin.json"  # which built-in a folder holds: name, seed, config digest


@dataclass(frozen=True)
class ModelSpec:
    """Configs of one SD architecture: enough to build it without any download."""

    name: str
    description: str
    resolution: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(_SCHEDULER))
    pretrained: bool = False  # weights committed with the code (atelier.models.shop), not seeded noise

    def digest(self) -> str:
        parts: list[Any] = [self.unet, self.vae, self.text, self.scheduler]
        if self.pretrained:  # the weights are part of what the model is
            from atelier.models.shop import read_info

            parts.append(read_info()["weights_sha256"])
        blob = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

BUILTIN: dict[str, ModelSpec] = {
    "tiny": (_TINY := ModelSpec(
        name="tiny",
        description="SD-shaped tiny model (~10 MB) for tests and the laptop demo; 64 px",
        resolution=64,
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=[32, 64, 64],
            layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[32, 32, 64, 64],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
            scaling_factor=0.18215,
        ),
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="quick_gelu",
        ),
    )),
    # The tiny architecture pretrained on the synthetic shop (`atelier models pretrain`): a base
    # that knows hoops, necklaces, rings and studs in four metals, so fine-tuning shows.
    "shop": ModelSpec(
        name="shop",
        description="tiny, pretrained on the synthetic shop (committed weights); 64 px",
        # Its VAE is 48 wide (not 64) in its two coarsest blocks, so that the whole pack stays
        # under the 5 MB of committed weights the project allows (2.4 M parameters in fp16).
        resolution=64, unet=_TINY.unet, text=_TINY.text, pretrained=True,
        vae=_TINY.vae | dict(block_out_channels=[32, 32, 48, 48], norm_num_groups=16),
    ),
    "sd15": ModelSpec(
        name="sd15",
        description="Stable Diffusion 1.5 architecture, random weights (latency/memory/FLOPs)",
        resolution=512,
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=[320, 640, 1280, 1280],
            layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        vae=_SD_VAE,
        text=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
    ),
    "sd21-base": ModelSpec(
        name="sd21-base",
        description="Stable Diffusion 2.1-base architecture, random weights (latency/memory/FLOPs)",
        resolution=512,
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=[320, 640, 1280, 1280],
            layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
        ),
        vae=_SD_VAE,
        text=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            projection_dim=512,
            hidden_act="gelu",
        ),
    ),
}


def build_pipeline(name: str, seed: int = 0):
    """Instantiate the pipeline of a built-in architecture with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from atelier.models.libraries import quiet_libraries
    from atelier.models.tokenizer import build_clip_tokenizer

    quiet_libraries()
    spec = _spec(name)
    tokenizer = build_clip_tokenizer()
    # One seed per component, so changing one config never changes another's weights.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec.vae)
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec.text,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = PNDMScheduler(skip_prk_steps=True, **spec.scheduler)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_model(name: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build a built-in model and save it as a diffusers folder at `out_dir` (atomically)."""
    from atelier.files import move_into_place

    out = Path(out_dir)
    if _spec(name).pretrained:
        from atelier.models.shop import materialise

        return materialise(out)
    pipe = build_pipeline(name, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    stamp = json.dumps({"name": name, "seed": seed, "config_digest": _spec(name).digest()}) + "\n"
    # transformers 5 writes a model only from distributed rank 0 (and silently nothing elsewhere);
    # a training worker of another rank building its base into its own folder must write it too.
    pipe.text_encoder.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        missing = [c for c in ("unet", "vae", "text_encoder") if not any((tmp / c).glob("*.safetensors"))]
        if missing:
            raise IntegrityError(f"building {name} wrote no weights for {', '.join(missing)}",
                                 where=str(out))
        (tmp / BUILT).write_text(stamp)
        # Built-ins are deterministic: the same model already there (from another process) is
        # kept, not deleted under whoever reads it.
        move_into_place(tmp, out, keep=lambda there: _read(there / BUILT) == stamp
                        and (there / "model_index.json").exists())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _spec(name: str) -> ModelSpec:
    try:
        return BUILTIN[name]
    except KeyError:
        raise InvalidInput(
            f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN)}"
        ) from None
