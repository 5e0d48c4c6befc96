"""The HTTP API's bodies: the generation request (bounded by the config), responses and errors."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from atelier.endpoint.config import ModelRef, ServeConfig
from atelier.sampling import ImageSide, image_side

Scheduler = Literal["ddpm", "ddim", "pndm", "lms", "euler", "euler_a", "dpm++"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
ResponseFormat = Literal["png", "b64_json"]
# Image i uses seed + i; 32 bits keep every seed exact in any JSON client.
MAX_SEED = 2**32 - 1


def _cross_field_rules(schema: dict[str, Any]) -> None:
    """What `_consistent` checks, said in the JSON Schema too (if/then), so that the document
    describes exactly the bodies the server takes: png means n = 1, and seed + n - 1 stays within
    MAX_SEED (one rule per n, where the schema bounds n)."""
    rules: list[dict[str, Any]] = [{
        "if": {"properties": {"response_format": {"const": "png"}}, "required": ["response_format"]},
        "then": {"properties": {"n": {"const": 1}}},
    }]
    rules += [{"if": {"properties": {"n": {"const": n}}, "required": ["n"]},
               "then": {"properties": {"seed": {"maximum": MAX_SEED - n + 1}}}}
              for n in range(2, schema["properties"]["n"].get("maximum", 1) + 1)]
    schema["allOf"] = rules


class GenerationRequest(BaseModel):
    """Images to generate from one prompt with one model. Unset fields take the server's defaults
    (its config's `defaults`, or the model's own size and scheduler)."""

    # strict: JSON types as the schema says them (`"seed": false` or `"n": "2"` is a 422, not 0 or 2).
    # JSON Schema's integer includes 7.0, so `_whole_numbers` lets that one through.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_cross_field_rules)

    prompt: str = Field(min_length=1, description="What the images show.")
    negative_prompt: str | None = Field(None, description="What the images should not show.")
    model: ModelRef | None = Field(
        None,
        description='Registered model: "name" (latest version), "name:version" or "name@alias" '
        '(the version promoted to the alias), or a base model listed by GET /v1/models. Unset: '
        "the server's default model.",
    )
    n: int = Field(1, ge=1, description="Number of images; image i uses seed + i.")
    steps: int | None = Field(None, ge=1, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, description="Classifier-free guidance scale.")
    width: ImageSide | None = Field(None, description="Width in pixels, a multiple of 8. Unset: the model's.")
    height: ImageSide | None = Field(None, description="Height in pixels, a multiple of 8. Unset: the model's.")
    scheduler: Scheduler | None = Field(None, description="Sampler. Unset: the model's own.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED,
        description="Seed of the first image: the same seed, model and settings give the same "
        "image. Unset: a random seed, returned with the images.",
    )
    response_format: ResponseFormat = Field(
        "b64_json",
        description="b64_json: JSON with base64 PNGs and their seeds; png: the PNG itself (n = 1).",
    )

    @field_validator("n", "steps", "width", "height", "seed", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any) -> Any:
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @model_validator(mode="after")
    def _consistent(self) -> GenerationRequest:
        if self.response_format == "png" and self.n != 1:
            raise ValueError("response_format png returns one image: use n = 1, or b64_json")
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            raise ValueError(f"seed + n - 1 must be at most {MAX_SEED}")
        return self


def request_model(config: ServeConfig) -> type[GenerationRequest]:
    """`GenerationRequest` with the configured bounds and defaults as its own constraints, so that
    FastAPI rejects (422, naming the field) and documents (/docs) exactly what this server takes."""
    limits, defaults = config.limits, config.defaults
    doc = {name: field.description for name, field in GenerationRequest.model_fields.items()}
    return create_model(
        "GenerationRequest",
        __base__=GenerationRequest,
        __doc__=GenerationRequest.__doc__,
        prompt=(str, Field(min_length=1, max_length=limits.max_prompt_chars, description=doc["prompt"])),
        negative_prompt=(str | None, Field(None, max_length=limits.max_prompt_chars,
                                           description=doc["negative_prompt"])),
        # Never null on the server: the configured default, else required (and documented so).
        model=(ModelRef, Field(config.default_model or ..., description=doc["model"])),
        n=(int, Field(1, ge=1, le=limits.max_images, description=doc["n"])),
        steps=(int, Field(defaults.steps, ge=1, le=limits.max_steps, description=doc["steps"])),
        guidance_scale=(float, Field(defaults.guidance_scale, ge=0, le=limits.max_guidance_scale,
                                     description=doc["guidance_scale"])),
        width=(image_side(limits.min_side, limits.max_width) | None,
               Field(None, description=doc["width"])),
        height=(image_side(limits.min_side, limits.max_height) | None,
                Field(None, description=doc["height"])),
    )


class GeneratedImage(BaseModel):
    """One image of a response."""

    model_config = ConfigDict(extra="forbid")

    b64_json: str = Field(description="The PNG, base64-encoded.")
    seed: int = Field(description="Seed it was made with: send it back to get the same image.")


class GenerationResponse(BaseModel):
    """What `response_format: b64_json` returns."""

    model_config = ConfigDict(extra="forbid")

    created: int = Field(description="Unix time the images were made.")
    model: str = Field(description='The model that made them, resolved to "name:version" where '
                       "it is a registered one.")
    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")
    steps: int = Field(description="Denoising steps.")
    guidance_scale: float = Field(description="Classifier-free guidance scale.")
    scheduler: str = Field(description="Sampler used.")
    data: list[GeneratedImage] = Field(description="The images, in seed order.")


class ModelInfo(BaseModel):
    """A model the server can generate with."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description='What to put in a request\'s "model": "name:version" or a base name.')
    object: Literal["model"] = Field("model", description="Always \"model\".")
    name: str = Field(description="Registry or base name.")
    version: int | None = Field(description="Registry version; None for a base model.")
    latest: bool = Field(description='Whether "name" alone means this version.')
    method: str = Field(description="full, lora, textual_inversion, or base.")
    base_model: str | None = Field(description="What a lora/textual_inversion model applies to.")
    created_at: str | None = Field(description="When it was published (UTC, ISO 8601).")


class ModelList(BaseModel):
    """GET /v1/models."""

    model_config = ConfigDict(extra="forbid")

    object: Literal["list"] = Field("list", description="Always \"list\".")
    data: list[ModelInfo] = Field(description="Base models first, then registered ones by name and version.")


class ErrorDetail(BaseModel):
    """What went wrong, said once."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="Error class: InvalidInput, Unauthorized, NotFound, ModelNotReady, "
                      "Overloaded, StorageUnavailable, ...")
    message: str = Field(description="One line for a person, naming the field or model.")
    status: int = Field(description="The HTTP status, repeated.")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer of the API."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail = Field(description="The error.")
