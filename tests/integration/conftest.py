"""Integration-tier fixtures: a real SeaweedFS on free loopback ports, and free port layouts."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import yaml

from atelier import stack
from atelier.settings import Settings, StackSettings
from atelier.stack.seaweedfs import SeaweedFS

_SEAWEED = ("s3_port", "master_port", "volume_port", "filer_port")


@pytest.fixture(scope="session")
def free_stack_ports() -> Callable[[], dict[str, int]]:
    """A function returning StackSettings port fields that are free right now and distinct from
    every layout handed out before in this session."""
    handed_out: set[int] = set()

    def pick() -> dict[str, int]:
        ports = stack.free_ports(avoid=handed_out)
        handed_out.add(ports["s3_port"])
        return ports

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


def stack_env(settings: Settings) -> dict[str, str]:
    """The environment of `atelier` run in a shell against the stack of `settings`."""
    return {"ATELIER_HOME": str(settings.home)} | {
        f"ATELIER_STACK__{k.upper()}": str(v) for k, v in settings.stack.model_dump().items() if v is not None}


@pytest.fixture(scope="module")
def env(cluster):
    """The CLI pointed at the session's stack, as `atelier` run in a shell with its settings."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in stack_env(cluster).items():
            mp.setenv(k, v)
        yield cluster


@pytest.fixture(scope="module")
def serve(env, tmp_path_factory):
    """`with serve(config): ...`: `atelier serve up --config` with `config` (a dict) and the base
    model "tiny" on the session's stack, then `atelier serve down`."""
    from atelier.cli.main import main

    @contextmanager
    def up(config: dict) -> Iterator[None]:
        path = tmp_path_factory.mktemp("serve") / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["serve", "up", "--config", str(path), "--model", "tiny"]) == 0
        try:
            yield
        finally:
            assert main(["serve", "down"]) == 0

    return up
