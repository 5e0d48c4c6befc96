"""What quality measurement produces, without torch: a metric's value (or why it has none), and a
model's evaluation as the registry stores it beside the model's card."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SHOP_CLIP = "shop-clip"  # the shop base's own CLIP (atelier.models.shop), usable offline
# The columns of `atelier models list`: each metric, and whether higher is better.
SUMMARY: dict[str, bool] = {"clip_i": True, "clip_t": True, "dino": True, "fid": False,
                            "kid": False, "is": True}


METRICS = ("clip_i", "clip_t", "dino", "fid", "kid", "is")


class MetricValue(BaseModel):
    """One metric of one image set: its value, or why there is none."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description=f"One of {', '.join(METRICS)}.")
    value: float | None = Field(None, description="None when unavailable.")
    spread: float | None = Field(None, description="KID and IS: their standard deviation over subsets.")
    encoder: str | None = Field(None, description="The encoder it was computed with.")
    images: int = Field(0, description="Generated images it was computed on.")
    unavailable: str | None = Field(None, description="Why there is no value.")


def unavailable(metric: str, reason: str) -> MetricValue:
    return MetricValue(metric=metric, unavailable=reason)


class EvalConfig(BaseModel):
    """How `atelier eval` generates and measures."""

    model_config = ConfigDict(extra="forbid")

    images: int = Field(8, ge=2, le=256, description="Images per prompt (seeds seed..seed+images-1).")
    seed: int = Field(0, ge=0, description="Seed of the first image.")
    steps: int = Field(25, ge=1, le=200, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, le=30, description="Classifier-free guidance scale.")
    contexts: list[str] = Field(
        ["{instance}, on a dark background", "{instance}, on a light background"],
        description="New-context prompts; {instance} is the instance prompt.")
    clip_encoder: str | None = Field(
        SHOP_CLIP, description="CLIP for CLIP-I/CLIP-T/FID/KID/IS: a folder, s3:// prefix or cached hub "
        f"id (production: openai/clip-vit-large-patch14 copied to S3); {SHOP_CLIP!r}: the shop base's "
        "CLIP, trained on the synthetic shop only; None: those metrics are unavailable.")
    dino_encoder: str | None = Field(
        None, description="DINO ViT for the DINO metric (production: facebook/dino-vits16 copied to "
        "S3); None: DINO is unavailable.")
    compare_base: bool = Field(True, description="Also generate with the base model, for comparison.")


class ConceptEvaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    concept: str = Field(description="Concept name.")
    prompts: dict[str, list[str]] = Field(description="instance, class and context prompts used.")
    metrics: list[MetricValue] = Field(description="The model's metrics.")
    base_metrics: list[MetricValue] = Field(description="The base model's (empty unless compared).")
    grid: str | None = Field(None, description="Comparison grid (real | base | model), relative path.")


class Evaluation(BaseModel):
    """A model's evaluation: what the registry shows beside its card."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The model evaluated, name:version.")
    base_model: str = Field(description="Its base model.")
    evaluated_at: str = Field(description="UTC time, ISO 8601.")
    config: EvalConfig = Field(description="How it was evaluated.")
    concepts: list[ConceptEvaluation] = Field(description="Per concept.")

    def summary(self, *, base: bool = False) -> dict[str, float | None]:
        """Each SUMMARY metric's mean over the concepts (None where no concept has it)."""
        out: dict[str, float | None] = {}
        for name in SUMMARY:
            values = [m.value for c in self.concepts for m in (c.base_metrics if base else c.metrics)
                      if m.metric == name and m.value is not None]
            out[name] = sum(values) / len(values) if values else None
        return out

    def unavailable(self) -> dict[str, str]:
        """metric -> why it has no value (the first reason seen)."""
        out: dict[str, str] = {}
        for c in self.concepts:
            for m in c.metrics:
                if m.value is None and m.unavailable:
                    out.setdefault(m.metric, m.unavailable)
        return out


class EvalSpec(BaseModel):
    """The evaluation job's arguments."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Registered model, name or name:version.")
    config: EvalConfig = Field(description="How to evaluate.")


