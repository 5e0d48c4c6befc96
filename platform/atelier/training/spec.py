"""What the control plane hands a training job: the config plus where its data lives."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from atelier.training.config import TrainConfig


class TrainJobSpec(BaseModel):
    """The training job's one argument (as JSON)."""

    model_config = ConfigDict(extra="forbid")

    config: TrainConfig = Field(description="Hyperparameters and resources.")
    dataset_uri: str = Field(description="Committed dataset: concepts.yaml plus its images.")
    dataset_sha256: str = Field(description="Content hash of the dataset (its manifest digest).")
    run_name: str = Field(description="Run name; resubmitting the same name resumes it.")
    concepts: list[str] | None = Field(None, description="Concept names to train; None: all.")


class ModelRun(BaseModel):
    """One model a job trains: per_concept jobs have one per concept, joint jobs one in all."""

    model_config = ConfigDict(extra="forbid")

    config: TrainConfig
    dataset_uri: str
    concepts: list[str] = Field(description="Concepts this model learns.")
    identifiers: list[str] = Field(description="Their identifiers, in the same order.")
    validation_prompts: list[str] = Field(description="Prompts rendered beside each checkpoint.")
    model_name: str = Field(description="Registry name the model is published under.")
    run_name: str = Field(description="Ray Train run name (storage folder) of this model.")
    class_images: dict[str, str] = Field(
        default_factory=dict, description="Class prompt -> committed class images (prior loss)."
    )
