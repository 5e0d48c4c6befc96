"""The training configuration: every hyperparameter of a DreamBooth run, in one model.

The YAML file (`--config train.yaml`), the CLI flags and the Ray job's own argument are this
model; its JSON Schema is generated into schemas/. Defaults are the jewelry study's best: lr 1e-6,
200 steps, no prior preservation, identifier on.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from atelier import config_file, pools
from atelier.errors import InvalidInput
from atelier.models.ref import Method
from atelier.sampling import ImageSide

HALF = {"fp16": "float16", "bf16": "bfloat16"}
# A GPU pool of the one table (atelier.pools); an unknown one gets the table's message.
GpuType = Annotated[pools.GpuPoolName | None, BeforeValidator(partial(pools.known_name, gpu=True))]


class TrainConfig(BaseModel):
    """Hyperparameters and resources of one DreamBooth training job."""

    model_config = ConfigDict(extra="forbid")

    # -- what to train -----------------------------------------------------------------------
    base_model: str = Field(
        "tiny", description="Model to fine-tune: built-in name, folder, s3:// prefix or hub id."
    )
    method: Method = Field(
        "full",
        description="full: fine-tune the UNet (and optionally the text encoder); lora: low-rank "
        "adapters on the UNet; textual_inversion: only the identifier's embedding trains.",
    )
    train_text_encoder: bool = Field(
        False, description="full/lora: also train the text encoder (disables embedding caching)."
    )
    concept_mode: Literal["per_concept", "joint"] = Field(
        "per_concept",
        description="per_concept: one model per concept; joint: one model for all concepts.",
    )
    model_name: str | None = Field(
        None,
        description="Registry name of the result (per_concept appends the concept name). "
        "Default: the concepts file's stem.",
    )
    use_identifier: bool = Field(
        True,
        description="Keep the rare identifier in the instance prompt (off: the plain style prompt; "
        "the study found the identifier helps).",
    )

    # -- optimisation ------------------------------------------------------------------------
    learning_rate: float = Field(1e-6, gt=0, le=1.0, description="AdamW learning rate.")
    max_train_steps: int = Field(200, gt=0, le=1_000_000, description="Optimiser steps per model.")
    train_batch_size: int = Field(1, ge=1, le=256, description="Instance images per worker step.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    resolution: ImageSide | None = Field(
        None,
        description="Training image side in pixels, a multiple of 8. Default: the base model's.",
    )
    center_crop: bool = Field(True, description="Center-crop (else random-crop) to the resolution.")
    seed: int = Field(0, ge=0, description="Seed of weights noise, timesteps and data order.")

    # -- method-specific ---------------------------------------------------------------------
    lora_rank: int = Field(4, ge=1, le=256, description="LoRA rank.")
    lora_alpha: int | None = Field(None, ge=1, description="LoRA alpha (default: the rank).")
    lora_wide: bool = Field(
        False, description="LoRA on conv/proj/ff layers too, not only attention projections."
    )

    # -- prior preservation ------------------------------------------------------------------
    with_prior_preservation: bool = Field(
        False, description="Add the class-prior loss on images the base model generates."
    )
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the prior loss.")
    num_class_images: int = Field(
        16, ge=1, le=10_000, description="Class images per class prompt (generated once, cached)."
    )
    class_image_steps: int = Field(25, ge=1, le=200, description="Steps to generate class images.")

    # -- efficiency --------------------------------------------------------------------------
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: fp16 on GPU, fp32 on CPU."
    )
    use_8bit_adam: bool | None = Field(
        None, description="bitsandbytes AdamW8bit. None: on when CUDA and bitsandbytes are there."
    )
    attention: Literal["auto", "sdpa", "xformers"] = Field(
        "auto", description="auto: xformers when installed on GPU, else PyTorch SDPA."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    cache_latents: bool = Field(
        True, description="Encode images (and frozen prompts) once, not every step."
    )

    # -- checkpoints, validation, resources --------------------------------------------------
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage per run.")
    validation_prompts: list[str] | None = Field(
        None, description="Prompts rendered beside each checkpoint. Default: the instance prompts."
    )
    validation_seeds: list[int] = Field([0], min_length=1, description="A seed per image.")
    validation_steps: int = Field(20, ge=1, le=200, description="Denoising steps of validation images.")
    eval_encoder: str | None = Field(
        None, description="CLIP encoder (folder, s3:// prefix, cached hub id, or 'shop-clip') that "
        "measures each checkpoint: CLIP-I to the instance photos, CLIP-T and the colour probe of "
        "eval_images images per concept, recorded as the model's quality curve. None: off.")
    eval_images: int = Field(4, ge=2, le=64, description="Images per concept for each checkpoint's metrics.")
    num_workers: int = Field(1, ge=1, le=512, description="Ray Train workers (DDP).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); else CPU workers (gloo).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    max_failures: int = Field(2, ge=0, description="Worker failures tolerated; each resumes from the last checkpoint.")
    gpu_type: GpuType = Field(
        None, description="GPU pool to run on (labels the metrics; picks the KubeRay worker group)."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.method == "textual_inversion" and self.train_text_encoder:
            raise ValueError("textual_inversion trains only the identifier's embedding")
        if self.method == "textual_inversion" and not self.use_identifier:
            raise ValueError("textual_inversion needs the identifier: it is what it learns")
        if self.gpu_type and self.mixed_precision in HALF:
            try:
                pools.POOLS[self.gpu_type].check_dtype(HALF[self.mixed_precision], "")
            except InvalidInput as e:
                raise ValueError(f"mixed_precision {self.mixed_precision}: {e.message}") from None
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> TrainConfig:
        """Read a YAML file (or take the defaults); flags given on the command line override it."""
        return config_file.load(cls, path, "training config", **overrides)
