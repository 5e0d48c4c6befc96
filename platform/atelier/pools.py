"""The node pools Atelier runs on (CPU nodes, one-T4 nodes, one-A100 nodes): one table, read by the
training config, the serve config and the RayJob renderer, and dumped for the Helm chart."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from atelier.errors import InvalidInput

HalfDtype = Literal["float16", "bfloat16"]

# GPU nodes are picked by GKE's `cloud.google.com/gke-accelerator` label: GKE sets it on every GPU
# node by itself, and on Autopilot / node auto-provisioning the selector is what makes the cluster
# create a node with that GPU. `nvidia.com/gpu.product` (GPU Feature Discovery) would need the
# NVIDIA GPU Operator, and its A100 values differ per variant (SXM4/PCIE, 40/80 GB), which a
# nodeSelector cannot match as one. Other clouds: label the node pools with these same values.
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
# GPU node pools carry this taint (GKE adds it itself) so that nothing else lands on them.
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# Ray keeps this share of a node's free memory for its object store (Ray's default
# object_store_memory proportion); tasks and actors may reserve only the rest.
RAY_OBJECT_STORE_SHARE = 0.3


class NodePool(BaseModel):
    """One kind of Kubernetes node, and the pod one Ray worker gets on it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[a-z][a-z0-9]*$",
        description="Pool name: `--gpu`, ServeConfig.gpu, TrainConfig.gpu_type, the RayJob's "
        "worker group and the atelier.dev/gpu label.",
    )
    description: str = Field(description="The nodes in a few words.")
    accelerator: str | None = Field(
        None, description=f"Value of the node label {ACCELERATOR_LABEL} that selects these "
        "nodes (and tolerates their GPU taint). Unset: CPU nodes, no selector, no toleration."
    )
    ray_accelerator_type: str | None = Field(
        None, description='Ray\'s name of the GPU ("T4", "A100"), which Ray detects on the node; '
        "a replica that asks for it is placed only here."
    )
    gpus: int = Field(0, ge=0, description="GPUs of a worker pod (nvidia.com/gpu).")
    cpus: int = Field(ge=1, description="CPUs of a worker pod, requested and limited alike.")
    memory_gib: int = Field(
        ge=1, description="Memory of a worker pod in GiB, requested and limited alike (a worker "
        "is never OOM-killed for memory it was promised)."
    )
    half_dtypes: tuple[HalfDtype, ...] = Field(
        description="Half-precision dtypes the pool computes in: a training's mixed_precision "
        "and a replica's dtype must be one of them or float32 (the T4 has no bfloat16 units)."
    )

    @property
    def ray_memory_gib(self) -> float:
        """Memory Ray lets tasks and actors reserve in one worker pod."""
        return self.memory_gib * (1 - RAY_OBJECT_STORE_SHARE)

    def node_selector(self) -> dict[str, str]:
        return {ACCELERATOR_LABEL: self.accelerator} if self.accelerator else {}

    def tolerations(self) -> list[dict[str, str]]:
        return [dict(GPU_TOLERATION)] if self.gpus else []

    def resources(self) -> dict[str, dict[str, Any]]:
        """The worker container's resources."""
        amounts: dict[str, Any] = {"cpu": str(self.cpus), "memory": f"{self.memory_gib}Gi"}
        limits = {**amounts, "nvidia.com/gpu": self.gpus} if self.gpus else dict(amounts)
        return {"requests": amounts, "limits": limits}

    def kubernetes(self) -> dict[str, Any]:
        """The worker pod's scheduling fields and its container's resources."""
        pod: dict[str, Any] = {}
        if self.node_selector():
            pod["nodeSelector"] = self.node_selector()
        if self.tolerations():
            pod["tolerations"] = self.tolerations()
        return {**pod, "resources": self.resources()}

    def check_dtype(self, dtype: str, where: str) -> None:
        """Refuse a half dtype the pool does not compute in (it would run emulated, far slower)."""
        if dtype in ("float16", "bfloat16") and dtype not in self.half_dtypes:
            raise InvalidInput(f"the {self.name} pool does not compute in {dtype} (it does in "
                               f"{', '.join(self.half_dtypes)} and float32)", where=where)

    def check_fits(self, where: str, *, cpus: float = 0, gpus: float = 0,
                   memory_gib: float | None = None) -> None:
        """Refuse what one worker pod of this pool cannot host: Ray would wait for it forever."""
        for asked, offered, unit in ((cpus, self.cpus, "CPUs"), (gpus, self.gpus, "GPUs"),
                                     (memory_gib or 0, self.ray_memory_gib, "GiB of memory")):
            if asked > offered:
                raise InvalidInput(f"asks for {asked:g} {unit}, more than a {self.name} worker "
                                   f"pod offers Ray ({offered:g})", where=where)


# Sized for one worker per node on the usual machines, leaving room for the node's own daemons.
_TABLE = (
    NodePool(name="cpu", description="CPU-only nodes (8 vCPUs, e.g. GKE e2-standard-8).",
             cpus=6, memory_gib=24, half_dtypes=("float16", "bfloat16")),
    NodePool(name="t4", description="Nodes with one NVIDIA T4, 16 GB (GKE n1-standard-8 + T4).",
             accelerator="nvidia-tesla-t4", ray_accelerator_type="T4", gpus=1,
             cpus=6, memory_gib=24, half_dtypes=("float16",)),
    NodePool(name="a100", description="Nodes with one NVIDIA A100, 40 GB (GKE a2-highgpu-1g).",
             accelerator="nvidia-tesla-a100", ray_accelerator_type="A100", gpus=1,
             cpus=10, memory_gib=72, half_dtypes=("float16", "bfloat16")),
)
POOLS: dict[str, NodePool] = {pool.name: pool for pool in _TABLE}
GPU_POOLS: dict[str, NodePool] = {name: pool for name, pool in POOLS.items() if pool.gpus}

# The names as types, for the config models' fields (and so their JSON Schemas' enums).
# A type checker cannot read a Literal built from the table, so to it they are plain names.
if TYPE_CHECKING:
    PoolName = str
    GpuPoolName = str
else:
    PoolName = Literal[tuple(POOLS)]
    GpuPoolName = Literal[tuple(GPU_POOLS)]


def unknown(name: object, *, gpu: bool = False) -> str:
    """The one message for a pool name not in the table."""
    known = GPU_POOLS if gpu else POOLS
    return f"unknown {'GPU ' if gpu else ''}pool {name!r}: expected one of {', '.join(known)}"


def pool(name: str, *, gpu: bool = False, where: str = "gpu") -> NodePool:
    """The pool of that name (a GPU pool where `gpu`); InvalidInput naming the known ones."""
    found = (GPU_POOLS if gpu else POOLS).get(name)
    if found is None:
        raise InvalidInput(unknown(name, gpu=gpu), where=where)
    return found


def known_name(value: Any, *, gpu: bool = False) -> Any:
    """A config field's check (before its Literal's): the same message as `pool`."""
    if isinstance(value, str) and value not in (GPU_POOLS if gpu else POOLS):
        raise ValueError(unknown(value, gpu=gpu))
    return value


def dump() -> dict[str, dict[str, Any]]:
    """Every pool as plain data, with its worker pod's Kubernetes fields (for the Helm chart)."""
    return {name: {**p.model_dump(mode="json"), "kubernetes": p.kubernetes()}
            for name, p in POOLS.items()}
