"""Shared fixtures: a moto S3 server on a random loopback port, settings pointing at it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from support import bucket_settings


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
    return bucket_settings(moto_server, tmp_path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The built-in tiny model, built once per session."""
    from atelier.models import build_model

    return build_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def concepts_file(tmp_path_factory):
    """The synthetic shop's concepts file (19 concepts)."""
    from atelier.catalogue.build import build_concepts
    from atelier.catalogue.synth import synth_shop
    from atelier.models.tokenizer import build_clip_tokenizer

    tmp = tmp_path_factory.mktemp("shop")
    build_concepts(synth_shop(tmp / "shop"), tmp / "concepts.yaml", build_clip_tokenizer())
    return tmp / "concepts.yaml"


def pytest_collection_modifyitems(config, items):
    """GPU paths (fp16, xformers, 8-bit Adam) run where CUDA is, and skip cleanly elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU path); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def models_cli(settings, monkeypatch, capsys):
    """`atelier models ARGS...` against `settings`' bucket: (exit code, stdout, stderr)."""
    import io

    from atelier.cli.main import main

    monkeypatch.setenv("ATELIER_HOME", str(settings.home))
    monkeypatch.setenv("ATELIER_S3__ENDPOINT", settings.s3.endpoint)
    monkeypatch.setenv("ATELIER_S3__BUCKET", settings.s3.bucket)
    monkeypatch.setenv("ATELIER_S3__CREDENTIALS_FILE", str(settings.s3.credentials_file))

    def run(*argv, answer=None):
        if answer is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(answer + "\n"))
        capsys.readouterr()
        code = main(["models", *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
