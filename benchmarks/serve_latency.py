"""Images/s and p50/p95 latency through the HTTP endpoint against the same diffusers pipeline
called directly, at 1 and 8 concurrent clients; cold start from zero replicas; LoRA load time.

Everything runs on a private embedded stack (SeaweedFS + Ray head on free ports, state in a
temporary folder) that is stopped at the end. Same model (the built-in tiny one, published to
the registry as a full model), prompt, steps and size on both sides; both sides get one torch
thread and encode PNGs. The direct side at 8 clients is 8 threads sharing one pipeline behind a
lock: what a server without batching does. Goals (issue 4): under 25 ms added p50 at one client;
at 8 clients, throughput at least the direct loop's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_latency.py [--requests 24] [--steps 25]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PROMPT = "photo of a pair of beaded hoops"
KEY = "benchmark-key"


# -- set-up ----------------------------------------------------------------------------------------
def publish_models(settings, tmp: Path) -> None:
    """bench-full: the tiny model as a registered full model (loaded from S3 by the replicas);
    bench-lora: a LoRA on the built-in tiny base."""
    import torch

    from atelier.models import adapters, build_model, load_pipeline
    from atelier.registry import Registry
    from atelier.storage import Storage

    registry = Registry(Storage(settings))
    fields = dict(concepts=[], hyperparameters={}, dataset_sha256="0" * 64)
    folder = build_model("tiny", tmp / "tiny")
    registry.publish(folder, name="bench-full", method="full", base_model="tiny", **fields)
    pipe = load_pipeline(str(folder))
    adapters.add_lora(pipe.unet, rank=4, wide=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapters.save_lora(pipe.unet, tmp / "lora")
    registry.publish(tmp / "lora", name="bench-lora", method="lora", base_model="tiny", **fields)


def serve_config(port: int, keys: Path, batch_wait: float):
    from atelier.endpoint.config import ServeConfig

    # One model replica of one CPU, like the direct loop's one thread; scale to zero allowed so
    # that the first request measures a cold start.
    return ServeConfig.parse({
        "name": "bench",
        "limits": {"max_images": 8},
        "pools": {"cpu": {
            "num_cpus": 1, "max_ongoing_requests": 16, "max_queued_requests": 64,
            "autoscaling": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                            "target_ongoing_requests": 8, "downscale_delay_s": 600,
                            "downscale_to_zero_delay_s": 600},
            "replica": {"max_batch_images": 8, "batch_wait_timeout_s": batch_wait,
                        "torch_threads": 1},
        }},
        "ingress": {"num_cpus": 0.25},
        "auth": {"api_keys_file": str(keys)},
        "http": {"port": port},
    })


# -- measuring -------------------------------------------------------------------------------------
def run_clients(call, clients: int, requests: int) -> dict:
    """`requests` calls spread over `clients` threads: images/s and latency percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            call()
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, per_client))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "images_per_s": len(latencies) / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[min(len(latencies) - 1, int(round(0.95 * len(latencies))) - 1)] * 1000,
    }


def direct_caller(folder: Path, steps: int):
    import torch

    from atelier.models import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline(str(folder))
    lock = threading.Lock()
    seeds = iter(range(10**9))

    def call() -> bytes:
        with lock:  # one pipeline: concurrent callers wait their turn
            image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, width=64, height=64,
                         generator=torch.Generator().manual_seed(next(seeds))).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    return call


MADE = {"images": 0}  # images the endpoint returned, to know when the metrics caught up
_made_lock = threading.Lock()


def endpoint_caller(url: str, model: str, steps: int):
    import requests

    local = threading.local()
    seeds = iter(range(10**9))

    def call() -> bytes:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.headers["Authorization"] = f"Bearer {KEY}"
        response = local.session.post(f"{url}/v1/images/generations", timeout=300, json={
            "prompt": PROMPT, "model": model, "steps": steps, "width": 64, "height": 64,
            "guidance_scale": 7.5, "seed": next(seeds), "response_format": "png"})
        response.raise_for_status()
        with _made_lock:
            MADE["images"] += 1
        return response.content

    return call


def pipeline_calls(metrics_url: str, timeout_s: float = 60) -> tuple[float, float] | None:
    """(images generated, pipeline calls made) as the replicas' metrics say, once they count
    every image the endpoint returned (metrics are exported every few seconds). Exact counts:
    a Ray histogram's _sum is rebuilt from bucket midpoints, so it is not used."""
    import requests

    from atelier.waiting import poll

    def counted() -> tuple[float, float] | None:
        images = calls = 0.0
        for line in requests.get(metrics_url, timeout=10).text.splitlines():
            if line.startswith("ray_atelier_images_generated"):
                images += float(line.rsplit(" ", 1)[1])
            elif line.startswith("ray_atelier_batch_images_count"):
                calls += float(line.rsplit(" ", 1)[1])
        return (images, calls) if images >= MADE["images"] else None

    return poll(counted, timeout_s=timeout_s, interval_s=1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24, help="requests per scenario")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image")
    parser.add_argument("--batch-wait", type=float, default=None,
                        help="batch_wait_timeout_s (default: the cpu pool's)")
    args = parser.parse_args()


    from atelier import stack
    from atelier.endpoint.config import Replica
    from atelier.endpoint.deploy import ServeCluster, serve_up
    from atelier.models.libraries import quiet_libraries
    from atelier.settings import Settings, StackSettings
    from atelier.stack.ray_head import default_temp_dir

    quiet_libraries()
    batch_wait = Replica().batch_wait_timeout_s if args.batch_wait is None else args.batch_wait
    tmp = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    ports = stack.free_ports(spare=1)
    http_port = ports["s3_port"] + stack.SPARE_OFFSET
    settings = Settings(home=tmp / "home", stack=StackSettings(**ports, num_cpus=2))
    keys = tmp / "api-keys"
    keys.write_text(KEY + "\n")
    url = f"http://127.0.0.1:{http_port}"
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    stack.up(settings)
    print(f"embedded stack up in {time.perf_counter() - t0:.1f} s", flush=True)
    cluster = ServeCluster(settings)
    try:
        publish_models(settings, tmp)
        cfg = serve_config(http_port, keys, batch_wait)
        serve_up(settings, cfg, timeout_s=300)
        assert cluster.replicas(cfg.name, "StableDiffusion") == {}, "expected zero model replicas"

        # Cold start: no replica; the first request starts one, which fetches the weights from S3.
        full = endpoint_caller(url, "bench-full", args.steps)
        started = time.perf_counter()
        full()
        cold = time.perf_counter() - started
        warm = min(_timed(full) for _ in range(3))
        print(f"cold start {cold:.2f} s, then {warm * 1000:.0f} ms per image", flush=True)

        # A LoRA into a warm replica: the base is loaded first, so only the adapter is new.
        endpoint_caller(url, "tiny", args.steps)()
        lora = endpoint_caller(url, "bench-lora", args.steps)
        lora_first = _timed(lora)
        lora_warm = min(_timed(lora) for _ in range(3))

        folder = tmp / "tiny"
        direct = direct_caller(folder, args.steps)
        direct()  # warm-up, as the endpoint's replica is warm
        metrics = f"http://127.0.0.1:{settings.stack.metrics_port}/metrics"
        batch: dict[int, float] = {}
        for clients in (1, 8):
            results[f"direct pipeline, {clients} client{'s' if clients > 1 else ''}"] = run_clients(
                direct, clients, args.requests)
            before = pipeline_calls(metrics)
            results[f"HTTP endpoint, {clients} client{'s' if clients > 1 else ''}"] = run_clients(
                full, clients, args.requests)
            after = pipeline_calls(metrics)
            if before and after and after[1] > before[1]:
                batch[clients] = (after[0] - before[0]) / (after[1] - before[1])
            print(f"measured {clients} client(s)", flush=True)
    finally:
        cluster.delete()
        stack.down(settings)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(default_temp_dir(settings.home.absolute()), ignore_errors=True)

    print()
    print(f"tiny model, {args.steps} steps, 64x64 px, PNG; {args.requests} requests per row; "
          f"1 torch thread each side; batch_wait_timeout_s {batch_wait}")
    print(f"{'scenario':<28} {'images/s':>9} {'p50 ms':>9} {'p95 ms':>9}")
    for name, r in results.items():
        print(f"{name:<28} {r['images_per_s']:>9.2f} {r['p50_ms']:>9.1f} {r['p95_ms']:>9.1f}")
    one_d, one_e = results["direct pipeline, 1 client"], results["HTTP endpoint, 1 client"]
    eight_d, eight_e = results["direct pipeline, 8 clients"], results["HTTP endpoint, 8 clients"]
    print(f"added p50 at 1 client: {one_e['p50_ms'] - one_d['p50_ms']:.1f} ms (goal < 25 ms)")
    print(f"throughput at 8 clients, endpoint / direct: "
          f"{eight_e['images_per_s'] / eight_d['images_per_s']:.2f}x (goal >= 1)")
    if batch:
        print("mean images per pipeline call in the endpoint's rows: " +
              ", ".join(f"{v:.2f} at {k} client{'s' if k > 1 else ''}" for k, v in batch.items()))
    print(f"cold start, zero replicas to first image (weights from S3): {cold:.2f} s "
          f"(a warm request: {warm * 1000:.0f} ms)")
    print(f"LoRA into a warm replica: first request {lora_first * 1000:.0f} ms, warm "
          f"{lora_warm * 1000:.0f} ms, so loading took ~{(lora_first - lora_warm) * 1000:.0f} ms")


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
