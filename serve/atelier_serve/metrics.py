"""Application metrics beside Ray Serve's own: latency, images and model loads per model and GPU."""

from __future__ import annotations

# Seconds: from a 64 px test image on a CPU to a large batch of 1024 px images on a T4.
LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300]
LOAD_BOUNDARIES = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160]
# Half-integers, so that each small batch size has a bucket of its own (le="1.5" is batches of 1).
# Ray exports a histogram's _sum from bucket midpoints: count images with the counter instead.
BATCH_BOUNDARIES = [1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 32.5, 64.5]


class ModelMetrics:
    """Created inside a replica: Ray's metric objects need its context. Exported (with Serve's
    deployment and replica tags) on each node's metrics port, names prefixed `ray_`."""

    def __init__(self, gpu: str):
        from ray.serve import metrics

        self.gpu = gpu
        # Ray annotates tag_keys as a 1-tuple; it takes any tuple of names.
        tags: tuple[str] = ("model", "gpu")  # type: ignore[assignment]
        self.latency = metrics.Histogram(
            "atelier_generation_latency_s",
            description="Time from a generation request reaching a model replica to its images "
            "(queueing for a batch included), by model and GPU type.",
            boundaries=LATENCY_BOUNDARIES, tag_keys=tags,
        )
        self.images = metrics.Counter(
            "atelier_images_generated",
            description="Images generated, by model and GPU type.", tag_keys=tags,
        )
        self.load = metrics.Histogram(
            "atelier_model_load_s",
            description="Time to load a model into a replica (S3 fetch included), by model and GPU type.",
            boundaries=LOAD_BOUNDARIES, tag_keys=tags,
        )
        self.failures = metrics.Counter(
            "atelier_generation_failures",
            description="Requests a model replica answered with an error, by model and GPU type.",
            tag_keys=tags,
        )
        self.weights = metrics.Gauge(
            "atelier_replica_weights_bytes",
            description="Bytes of model weights a replica holds (bases plus adapters), by GPU type; "
            "compare with the pool's memory_budget_gb.",
            tag_keys=("gpu",),
        )
        self.batch_images = metrics.Histogram(
            "atelier_batch_images",
            description="Images per pipeline call: how well batching works, by GPU type.",
            boundaries=BATCH_BOUNDARIES, tag_keys=("gpu",),
        )

    def tags(self, model: str) -> dict[str, str]:
        return {"model": model, "gpu": self.gpu}


class IngressMetrics:
    """The ingress's own metrics (created inside its replica, as ModelMetrics)."""

    def __init__(self):
        from ray.serve import metrics

        tags: tuple[str] = ("model",)
        self.replica_retries = metrics.Counter(
            "atelier_replica_retries",
            description="Generations the ingress sent again because the model replica they went "
            "to had gone away (killed, node lost), by model.", tag_keys=tags,
        )

    def retried(self, model: str) -> None:
        self.replica_retries.inc(tags={"model": model})
