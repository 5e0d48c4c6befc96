"""The Ray token: generated once, private, found by every client; the head is told to require it.
(That the head really refuses a request or a driver without it: tests/integration/test_stack.py.)"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from atelier import rayauth, stack
from atelier.errors import InvalidInput
from atelier.settings import Settings


def test_a_generated_token_is_private_long_and_kept(tmp_path):
    path = tmp_path / "stack" / "ray-token"
    assert rayauth.create_token_file(path)
    first = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 64 and int(first, 16) >= 0  # 256 bits, hex
    assert not rayauth.create_token_file(path)  # a second start keeps the first token
    assert path.read_text() == first


def test_a_token_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "ray-token"
    rayauth.create_token_file(path)
    path.chmod(0o644)
    with pytest.raises(InvalidInput, match="readable by others"):
        rayauth.check_private(path)


def test_clients_of_the_embedded_head_send_its_token_as_a_bearer_header(tmp_path):
    settings = Settings(home=tmp_path)
    assert rayauth.headers(settings) == {}  # never started: nothing to send
    rayauth.create_token_file(settings.embedded_ray_token_file)
    token = settings.embedded_ray_token_file.read_text()
    assert rayauth.headers(settings) == {"Authorization": f"Bearer {token}"}


def test_clients_of_an_external_cluster_take_the_token_where_ray_would(tmp_path, monkeypatch):
    settings = Settings(home=tmp_path, ray_address="http://ray-head:8265")
    monkeypatch.delenv(rayauth.TOKEN_ENV, raising=False)
    monkeypatch.delenv(rayauth.TOKEN_PATH_ENV, raising=False)
    assert rayauth.headers(settings) == {}
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv(rayauth.TOKEN_PATH_ENV, str(tmp_path / "token"))
    assert rayauth.headers(settings) == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv(rayauth.TOKEN_ENV, "from-env")
    assert rayauth.headers(settings) == {"Authorization": "Bearer from-env"}


def test_the_embedded_head_and_what_it_starts_run_with_token_auth(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv(rayauth.TOKEN_ENV, "someone-elses-token")
    settings = Settings(home=tmp_path)
    head = stack.ray_head(settings)
    env = head.environment("marker")
    assert env["RAY_AUTH_MODE"] == "token"
    assert Path(env["RAY_AUTH_TOKEN_PATH"]) == settings.embedded_ray_token_file.absolute()
    assert rayauth.TOKEN_ENV not in env
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # 127.0.0.1 stays the node's address
    head.prepare()
    assert stat.S_IMODE(settings.embedded_ray_token_file.stat().st_mode) == 0o600
