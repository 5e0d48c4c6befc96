"""Generating images from a pipeline: one request model shared by the CLI, jobs and Serve."""

from __future__ import annotations

import io
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonDict


def _multiple_of_8(side: int) -> int:
    if side % 8:
        raise ValueError(f"{side} is not a multiple of 8 (latents are 1/8 of the image side)")
    return side


# Documented as multipleOf, checked by `_multiple_of_8` (whose message says why).
_MULTIPLE_OF_8: JsonDict = {"multipleOf": 8}


def image_side(ge: int = 8, le: int = 2048):
    """The type of an image side in pixels between `ge` and `le`: a multiple of 8, as every
    model here works on latents 1/8 of the image side. The bounds live in the type so that they
    hold (and show in the JSON Schema) for an optional side too."""
    return Annotated[int, Field(ge=ge, le=le, json_schema_extra=_MULTIPLE_OF_8), AfterValidator(_multiple_of_8)]


ImageSide = Annotated[int, Field(ge=8, le=2048, json_schema_extra=_MULTIPLE_OF_8), AfterValidator(_multiple_of_8)]
"""`image_side()` with the widest bounds, for annotations (a type checker reads no calls)."""


class SampleRequest(BaseModel):
    """Images to generate with one model: one image per (prompt, seed)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model reference: built-in name, folder, s3:// prefix or hub id.")
    prompts: list[str] = Field(min_length=1, description="One image is made per prompt.")
    negative_prompt: str | None = Field(None, description="What the images should not show.")
    steps: int = Field(25, ge=1, le=200, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, le=30, description="Classifier-free guidance scale.")
    width: ImageSide = Field(64, description="Image width in pixels (multiple of 8).")
    height: ImageSide = Field(64, description="Image height in pixels (multiple of 8).")
    seed: int = Field(0, ge=0, description="Seed of the first prompt; prompt i uses seed + i.")
    out: str = Field(description="Where to commit the PNGs (s3:// prefix or folder).")


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
    return encode_png(image)


def encode_png(image) -> bytes:
    """A PIL image as PNG bytes: what every image Atelier returns or stores is."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
