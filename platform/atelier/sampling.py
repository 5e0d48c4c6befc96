"""Generating images from a pipeline: one request model shared by the CLI, jobs and Serve."""

from __future__ import annotations

import io

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SampleRequest(BaseModel):
    """Images to generate with one model: one image per (prompt, seed)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model reference: built-in name, folder, s3:// prefix or hub id.")
    prompts: list[str] = Field(min_length=1, description="One image is made per prompt.")
    negative_prompt: str | None = Field(None, description="What the images should not show.")
    steps: int = Field(25, ge=1, le=200, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, le=30, description="Classifier-free guidance scale.")
    width: int = Field(64, ge=8, le=2048, description="Image width in pixels (multiple of 8).")
    height: int = Field(64, ge=8, le=2048, description="Image height in pixels (multiple of 8).")
    seed: int = Field(0, ge=0, description="Seed of the first prompt; prompt i uses seed + i.")
    out: str = Field(description="Where to commit the PNGs (s3:// prefix or folder).")

    @model_validator(mode="after")
    def _multiple_of_8(self) -> "SampleRequest":
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name} must be a multiple of 8 (latents are 1/8 of the image)")
        return self


def render(pipe, prompt: str, request: SampleRequest, seed: int) -> bytes:
    """One PNG for `prompt`; the same seed gives the same bytes on the same hardware."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    image = pipe(
        prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        width=request.width,
        height=request.height,
        generator=generator,
    ).images[0]
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
