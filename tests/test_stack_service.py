"""The embedded services' one lifecycle (start, wait until ready, stop), run on a small real
server: a Python HTTP server with a child process, on a free loopback port."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import psutil
import pytest

from atelier.errors import PortInUse, ServiceError
from atelier.stack import _process
from atelier.stack._process import Port, Service
from atelier.waiting import NotYet
from support import free_port

SCRIPTS = {
    # Starts a child, then serves HTTP; on SIGTERM it stops the child first, as Ray and weed do.
    "serve": """
import http.server, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
def bye(*_):
    child.terminate(); child.wait(); sys.exit(0)
signal.signal(signal.SIGTERM, bye)
time.sleep(0.3)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
""",
    "crash": "print('boom: cannot start'); raise SystemExit(3)",
    "mute": "import time; time.sleep(600)",
}


class Toy(Service):
    name = "toy"
    title = "the toy server"
    command = "`toy`"
    term_timeout_s = 5.0

    def __init__(self, state_dir: Path, port: int, script: str = "serve", timeout_s: float = 20):
        super().__init__(state_dir, host="127.0.0.1", log_file=state_dir / "toy.log",
                         start_timeout_s=timeout_s)
        self.port = port
        self.script = script

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ports(self) -> list[Port]:
        return [Port(self.port, "toy.port")]

    def port_map(self) -> dict[str, int]:
        return {"http": self.port}

    def argv(self) -> list[str]:
        return [sys.executable, "-c", SCRIPTS[self.script], str(self.port)]

    def ready(self) -> bool:
        import requests

        try:
            return requests.get(self.endpoint, timeout=1).status_code == 200
        except requests.RequestException as e:
            raise NotYet(f"no answer: {type(e).__name__}") from e


@pytest.fixture
def toy(tmp_path):
    made: list[Toy] = []

    def make(script: str = "serve", port: int | None = None, **kwargs) -> Toy:
        made.append(Toy(tmp_path / "toy", port or free_port(), script, **kwargs))
        return made[-1]

    yield make
    for service in made:
        service.stop()


def _toys_alive() -> list[int]:
    """Pids of live processes of any toy start (found by the marker in their environment)."""
    alive = []
    for proc in psutil.process_iter():
        try:
            if (proc.environ().get(_process.MARKER_ENV, "").startswith("toy-")
                    and proc.status() != psutil.STATUS_ZOMBIE):
                alive.append(proc.pid)
        except psutil.Error:
            pass
    return alive


def _ours(service: Toy) -> list[psutil.Process]:
    record = _process.read_record(service.record_file)
    return _process.members(record) if record else []


def test_start_waits_until_ready_and_stop_ends_every_process(toy):
    service = toy()
    assert service.start() is True
    assert service.running and service.ready()
    record = service.record()
    assert record.endpoint == service.endpoint and record.ports == {"http": service.port}
    assert len(_ours(service)) == 2  # the server and its child
    assert service.start() is False  # already running
    procs = _ours(service)
    assert service.stop() == 2
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    assert not service.record_file.exists() and not service.running
    assert service.stop() == 0
    assert _toys_alive() == []


def test_a_process_that_exits_while_starting_says_so_with_its_log(toy):
    service = toy("crash")
    with pytest.raises(ServiceError, match=r"`toy` exited with code 3 while starting") as raised:
        service.start()
    assert "boom: cannot start" in str(raised.value)
    assert not service.running and not service.record_file.exists()
    assert _toys_alive() == []


def test_a_server_that_never_gets_ready_is_stopped_after_the_timeout(toy):
    service = toy("mute", timeout_s=1.0)
    with pytest.raises(ServiceError, match=r"the toy server was not ready within 1 s \(no answer"):
        service.start()
    assert not service.running and not service.record_file.exists()
    assert _toys_alive() == []


def test_a_busy_port_starts_nothing(toy):
    # The port the test occupies is the one the kernel gave its socket: held by construction.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        service = toy(port=holder.getsockname()[1])
        with pytest.raises(PortInUse, match=rf"port {service.port} \(toy.port\)"):
            service.start()
    assert not service.log_file.exists() and not service.running


def test_a_port_in_time_wait_is_free_to_restart_on_but_not_to_pick():
    # What a server that stops leaves on its port for a minute: its end of each connection in
    # TIME_WAIT. The server restarting binds it (SO_REUSEADDR); stack.free_ports passes it over,
    # as it was just in use and a plain bind (a test's holder socket) is refused.
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            accepted.close()  # the server's end closes first
            client.recv(1)
    assert _process.port_free("127.0.0.1", port)
    assert not _process.port_free("127.0.0.1", port, time_wait_counts=True)
