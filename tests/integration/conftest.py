"""Integration-tier fixtures: a real SeaweedFS on free loopback ports, and free port layouts."""

from __future__ import annotations

import random
import secrets
import socket
from typing import Callable

import pytest

from atelier import stack
from atelier.settings import Settings, StackSettings
from atelier.stack.seaweedfs import GRPC_OFFSET, SeaweedFS

# Offsets from a base port of every port one embedded stack binds: SeaweedFS's HTTP ports (and
# the admin port at master + 1), each also + GRPC_OFFSET; the Ray GCS port with the 110 ports
# Ray derives from it (ray_head.py); the dashboard and metrics ports.
_SEAWEED = {"s3_port": 0, "master_port": 2, "volume_port": 4, "filer_port": 6}
_RAY = {"ray_port": 10, "dashboard_port": 130, "metrics_port": 131}


def _bindable(port: int) -> bool:
    for address in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def _layout_ports(base: int) -> list[int]:
    seaweed = [base + o for o in (*_SEAWEED.values(), _SEAWEED["master_port"] + 1)]
    ray = list(range(base + 10, base + 10 + 120)) + [base + 130, base + 131]
    return seaweed + [p + GRPC_OFFSET for p in seaweed] + ray


@pytest.fixture(scope="session")
def free_stack_ports() -> Callable[[], dict[str, int]]:
    """A function returning StackSettings port fields that are free right now and distinct from
    every layout handed out before in this session. Bases stay below 22000 so that the
    SeaweedFS gRPC ports (+10000) stay under the kernel's ephemeral range (32768+), where an
    outgoing connection could take one between this check and the server's bind."""
    handed_out: set[int] = set()

    def pick() -> dict[str, int]:
        for _ in range(200):
            base = random.randrange(12000, 22000, 200)
            ports = _layout_ports(base)
            if base not in handed_out and all(_bindable(p) for p in ports):
                handed_out.add(base)
                return {name: base + o for name, o in {**_SEAWEED, **_RAY}.items()}
        raise RuntimeError("no free block of ports found for an embedded stack")

    return pick


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory, free_stack_ports):
    """A running SeaweedFS that enforces generated keys, with its bucket created. It has
    .endpoint, .access_key, .secret_key, .bucket, .data_dir, .client(), and .stop()/.start()
    for restart tests (data survives)."""
    ports = free_stack_ports()
    server = SeaweedFS(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key=secrets.token_urlsafe(15),
        secret_key=secrets.token_urlsafe(30),
        bucket="atelier-test",
        start_timeout_s=60,
        **{name: ports[name] for name in _SEAWEED},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, free_stack_ports):
    """A whole embedded stack (SeaweedFS + a Ray head with 2 CPUs) on free ports."""
    home = tmp_path_factory.mktemp("home")
    settings = Settings(home=home, stack=StackSettings(**free_stack_ports(), num_cpus=2))
    stack.up(settings)
    try:
        yield settings
    finally:
        stack.down(settings)


@pytest.fixture(scope="session")
def concepts_file(tmp_path_factory):
    """The synthetic shop's concepts file (19 concepts)."""
    from atelier.catalogue.build import build_concepts
    from atelier.catalogue.synth import synth_shop
    from atelier.models.tokenizer import build_clip_tokenizer

    tmp = tmp_path_factory.mktemp("shop")
    build_concepts(synth_shop(tmp / "shop"), tmp / "concepts.yaml", build_clip_tokenizer())
    return tmp / "concepts.yaml"
