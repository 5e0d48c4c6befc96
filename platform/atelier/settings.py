"""Platform settings: where state lives, which S3 endpoint and Ray cluster to use, which ports.

Read from the environment (prefix ATELIER_, nested fields with "__", e.g. ATELIER_S3__ENDPOINT).
With no S3 endpoint and no Ray address configured, the platform uses the embedded stack
(`atelier up`): SeaweedFS and a Ray head on 127.0.0.1, state under `home`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class S3Settings(BaseModel):
    """An S3-compatible endpoint. Credentials never live here: they come from the environment
    (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), an AWS shared-credentials file, or the embedded
    stack's generated file."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str | None = Field(
        None,
        description="Endpoint URL, e.g. https://s3.us-east-1.amazonaws.com or http://minio:9000. "
        "Unset: the embedded SeaweedFS on 127.0.0.1.",
    )
    region: str = Field("us-east-1", description="Region the client signs requests for.")
    bucket: str = Field("atelier", description="Bucket holding models, checkpoints and datasets.")
    credentials_file: Path | None = Field(
        None, description="AWS shared-credentials file (INI) to read keys from."
    )
    profile: str = Field("default", description="Profile to read from credentials_file.")


class StackSettings(BaseModel):
    """Ports and resources of the embedded single-machine stack."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address every embedded service binds to.")
    s3_port: int = Field(8333, description="SeaweedFS S3 gateway port.")
    master_port: int = Field(9333, description="SeaweedFS master HTTP port (gRPC is +10000).")
    volume_port: int = Field(8380, description="SeaweedFS volume server HTTP port (gRPC is +10000).")
    filer_port: int = Field(8888, description="SeaweedFS filer HTTP port (gRPC is +10000).")
    ray_port: int = Field(6380, description="Ray GCS port of the local head.")
    dashboard_port: int = Field(8265, description="Ray dashboard and Jobs API port.")
    metrics_port: int = Field(8090, description="Ray Prometheus metrics export port.")
    num_cpus: int | None = Field(None, description="CPUs the local Ray head offers (default: all).")
    start_timeout_s: float = Field(90.0, description="How long to wait for a service to be ready.")


class KubeSettings(BaseModel):
    """How training jobs run as KubeRay RayJobs (`atelier train submit --kube`)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        "ghcr.io/atelier/atelier:0.1.0-gpu",
        description="Atelier runtime image (Ray, CUDA PyTorch and this package) for the head and "
        "GPU workers. The default is a placeholder: set it to the image you build and push.",
    )
    s3_secret: str = Field(
        "atelier-s3",
        description="Secret in the job's namespace holding AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY; every pod gets its keys as environment variables.",
    )
    service_account: str | None = Field(
        None, description="Service account of the Ray pods. Unset: the namespace's default."
    )
    ray_version: str = Field(
        "2.60.0", description="Ray version inside the image (KubeRay's rayVersion)."
    )
    head_cpu: str = Field(
        "2", description="CPU of the Ray head pod, which runs the job's driver but no training."
    )
    head_memory: str = Field("8Gi", description="Memory of the Ray head pod.")
    context: str | None = Field(
        None,
        description="kubeconfig context to use. Unset: the current context, or the in-cluster "
        "service account when there is no kubeconfig.",
    )
    ray_token_secret: str | None = Field(
        None,
        description="Secret (data key `auth_token`) holding the Ray token of each job's cluster. "
        "Unset: KubeRay generates a token for each job's cluster. Either way the job's Ray runs "
        "with token authentication.",
    )
    settings_configmap: str | None = Field(
        "atelier-settings",
        description="ConfigMap, in the job's namespace, written by the Helm chart "
        "(`<release>-settings`; `atelier-settings` for `helm install atelier`): its ATELIER_* "
        "keys fill every setting not set here, so a job uses the installation's storage, image "
        "and Secrets. Missing: nothing is filled. Empty: not read.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ATELIER_", env_nested_delimiter="__", extra="forbid"
    )

    home: Path = Field(
        default_factory=lambda: Path.home() / ".atelier",
        description="State folder: embedded-stack data, logs, credentials and the model cache.",
    )
    s3: S3Settings = Field(default_factory=S3Settings)
    stack: StackSettings = Field(default_factory=StackSettings)
    kube: KubeSettings = Field(
        default_factory=KubeSettings, description="Training as KubeRay RayJobs (--kube)."
    )
    ray_address: str | None = Field(
        None,
        description="Ray dashboard address (http://host:8265) of a cluster. Unset: the embedded head.",
    )
    promotion_webhook: str | None = Field(
        None, description="URL POSTed every alias move (promotion or rollback) as JSON.",
    )

    @property
    def embedded_s3(self) -> bool:
        return self.s3.endpoint is None

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint or f"http://{self.stack.host}:{self.stack.s3_port}"

    @property
    def ray_dashboard(self) -> str:
        return self.ray_address or f"http://{self.stack.host}:{self.stack.dashboard_port}"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def stack_dir(self) -> Path:
        return self.home / "stack"

    @property
    def embedded_credentials_file(self) -> Path:
        return self.stack_dir / "s3-credentials"

    @property
    def embedded_ray_token_file(self) -> Path:
        """Token of the embedded Ray head (mode 0600), generated on its first start."""
        return self.stack_dir / "ray-token"


def get_settings() -> Settings:
    return Settings()
