"""Ray job: generate images from a model in parallel Ray tasks and commit them to storage.

    python -m atelier_jobs.sample --request '<SampleRequest JSON>'
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import ray

from atelier.models.ref import S3Prefix, parse_model_ref
from atelier.sampling import SampleRequest, render
from atelier.storage import Storage
from atelier.training import events


@ray.remote(num_cpus=1)
def _render_chunk(request_json: str, indices: list[int]) -> list[tuple[int, bytes]]:
    import torch

    from atelier.models.load import load_model

    torch.set_num_threads(1)
    request = SampleRequest.model_validate_json(request_json)
    pipe = load_model(request.model)
    return [(i, render(pipe, request.prompts[i], request, request.seed + i)) for i in indices]


def run(request: SampleRequest, workers: int) -> None:
    storage = Storage()
    if isinstance(model := parse_model_ref(request.model), S3Prefix):
        storage.read_manifest(model.uri)  # fail before any task starts if it is not committed
    n = len(request.prompts)
    workers = max(1, min(workers, n))
    chunks = [list(range(w, n, workers)) for w in range(workers)]
    pending = [_render_chunk.remote(request.model_dump_json(), c) for c in chunks]
    images: dict[int, bytes] = {}
    while pending:
        done, pending = ray.wait(pending)
        for i, png in ray.get(done[0]):
            images[i] = png
        events.emit(events.Sampled(done=len(images), total=n))
    with tempfile.TemporaryDirectory() as tmp:
        for i, png in images.items():
            Path(tmp, f"{i:03d}.png").write_bytes(png)
        manifest = storage.commit(
            tmp, request.out, {"kind": "samples", "request": request.model_dump()}, overwrite=True
        )
    events.emit(events.SamplesCommitted(uri=request.out, files=len(manifest.files)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--request", required=True, help="SampleRequest as JSON")
    parser.add_argument("--workers", type=int, default=2, help="parallel Ray tasks")
    args = parser.parse_args(argv)
    request = SampleRequest.model_validate_json(args.request)
    ray.init(log_to_driver=True)
    run(request, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
