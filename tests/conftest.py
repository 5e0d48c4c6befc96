"""Shared fixtures: a moto S3 server on a random loopback port, settings pointing at it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from support import write_credentials


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)  # two threads on shared cores can be 10-30x slower


@pytest.fixture(scope="session")
def moto_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def settings(tmp_path, moto_server):
    """Settings for a fresh bucket on the moto server, state under tmp_path."""
    import uuid

    import boto3

    from atelier.settings import S3Settings, Settings

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3", endpoint_url=moto_server, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    creds = write_credentials(tmp_path / "credentials", "testing", "testing")
    return Settings(
        home=tmp_path / "home",
        s3=S3Settings(endpoint=moto_server, bucket=bucket, credentials_file=creds),
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The built-in tiny model, built once per session."""
    from atelier.models import build_model

    return build_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


def pytest_collection_modifyitems(config, items):
    """GPU paths (fp16, xformers, 8-bit Adam) run where CUDA is, and skip cleanly elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU path); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
