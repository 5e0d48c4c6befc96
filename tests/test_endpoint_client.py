"""The API client against a real HTTP server on loopback: overload (503) is retried after the
server's Retry-After, nothing else is; API keys of a local deployment."""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from atelier.endpoint import client as client_module
from atelier.endpoint.api import GenerationRequest
from atelier.endpoint.client import Client
from atelier.endpoint.keys import api_keys_path, find_api_key, local_api_keys
from atelier.errors import Overloaded, ServiceError
from atelier.settings import Settings

MODELS = {"object": "list", "data": []}
IMAGES = {"created": 1, "model": "tiny", "width": 64, "height": 64, "steps": 2,
          "guidance_scale": 7.5, "scheduler": "ddim", "data": []}


class Script:
    """A server that answers 503 `busy` times (with `retry_after`), then 200."""

    def __init__(self, busy: int, retry_after: str | None = "0"):
        self.busy = busy
        self.retry_after = retry_after
        self.seen: list[tuple[str, float]] = []


@pytest.fixture
def server():
    scripts: list[Script] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            script = scripts[-1]
            script.seen.append((self.command, time.monotonic()))
            if self.command == "POST":
                self.rfile.read(int(self.headers["Content-Length"]))
            if len(script.seen) <= script.busy:
                body = json.dumps({"error": {"message": "busy"}}).encode()
                self.send_response(503)
                if script.retry_after is not None:
                    self.send_header("Retry-After", script.retry_after)
            else:
                body = json.dumps(MODELS if self.command == "GET" else IMAGES).encode()
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def run(script: Script) -> tuple[str, Script]:
        scripts.append(script)
        return f"http://127.0.0.1:{httpd.server_address[1]}", script

    yield run
    httpd.shutdown()
    httpd.server_close()


def test_overload_is_retried_and_then_succeeds(server):
    url, script = server(Script(busy=2))
    assert Client(url, retries=2).models().data == []
    assert len(script.seen) == 3


def test_overload_without_retry_after_is_retried_too(server):
    url, script = server(Script(busy=1, retry_after=None))
    Client(url).models()
    assert len(script.seen) == 2


def test_a_generation_is_retried_too(server):
    url, script = server(Script(busy=1))
    assert Client(url).generate(GenerationRequest(prompt="a ring")).model == "tiny"
    assert [method for method, _ in script.seen] == ["POST", "POST"]


def test_overload_that_lasts_is_overloaded_after_the_retries(server):
    url, script = server(Script(busy=10))
    with pytest.raises(Overloaded, match="503: busy"):
        Client(url, retries=2).models()
    assert len(script.seen) == 3


def test_the_client_waits_as_long_as_retry_after_asks(server):
    url, script = server(Script(busy=1, retry_after="1"))
    Client(url).models()
    (_, first), (_, second) = script.seen
    assert second - first >= 0.95


def test_a_long_retry_after_is_capped(server, monkeypatch):
    monkeypatch.setattr(client_module, "MAX_RETRY_AFTER_S", 0.2)
    slept = _record_retry_sleeps(monkeypatch)
    url, script = server(Script(busy=1, retry_after="120"))
    Client(url).models()
    assert slept == [0.2]  # what the client waited, not what the server asked
    assert len(script.seen) == 2


def _record_retry_sleeps(monkeypatch) -> list[float]:
    """The waits urllib3's Retry asks for, recorded (and still taken): the retry policy, checked
    without timing the test, which a loaded machine would stretch."""
    import urllib3.util.retry as retry_module

    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 3))
        time.sleep(seconds)

    # The module's own name for `time`, so that no other thread's sleeps are recorded.
    monkeypatch.setattr(retry_module, "time", SimpleNamespace(sleep=sleep, time=time.time))
    return slept


def test_an_unreachable_server_is_a_service_error_at_once(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slept = _record_retry_sleeps(monkeypatch)
    with pytest.raises(ServiceError, match="cannot reach the image API"):
        Client(f"http://127.0.0.1:{port}", retries=5).models()
    assert slept == []  # a refused connection is not retried


def test_local_keys_are_made_once_private_and_found_by_the_client(tmp_path, monkeypatch):
    monkeypatch.delenv("ATELIER_API_KEY", raising=False)
    settings = Settings(home=tmp_path / "home")
    assert find_api_key(None, settings) is None
    path = local_api_keys(settings)
    assert path == api_keys_path(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = find_api_key(None, settings)
    assert key and len(key) >= 32
    assert local_api_keys(settings) == path and find_api_key(None, settings) == key
    monkeypatch.setenv("ATELIER_API_KEY", " from-env ")
    assert find_api_key(None, settings) == "from-env"
