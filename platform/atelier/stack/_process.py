"""Process bookkeeping for the embedded services: port checks, detached start, stopping our own."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
from pydantic import BaseModel, ConfigDict, Field

from atelier.errors import InvalidInput, PortInUse, ServiceError

# Every process a service spawns inherits this variable from the process we start. It is how
# `down` recognises its own processes among the user's others: Ray renames its workers
# ("ray::MyActor") and moves them to their own process groups, but it does not scrub their
# environment.
MARKER_ENV = "ATELIER_STACK_MARKER"

# Popen objects of services this Python process started: kept so that they can be reaped
# (no zombie left behind in a long-lived process such as pytest) and not garbage-collected
# while their child runs.
_children: dict[int, subprocess.Popen] = {}


class ProcessRecord(BaseModel):
    """What `up` writes next to a service's data so that `status` and `down` find it again."""

    model_config = ConfigDict(extra="forbid")

    pid: int = Field(description="Pid of the process `up` started; leader of its own session.")
    marker: str = Field(description=f"Value of {MARKER_ENV} in every process of this start.")
    started_at: float = Field(description="Unix time the process was started.")
    endpoint: str = Field(description="Main address the service answers on.")
    ports: dict[str, int] = Field(description="Every port the service was told to use, by role.")


@dataclass(frozen=True)
class Port:
    """A port a service will bind, with the setting it comes from (for error messages)."""

    number: int
    setting: str
    # Ray binds some of its ports on every interface whatever --node-ip-address says.
    all_interfaces: bool = False


def new_marker(service: str) -> str:
    return f"{service}-{uuid.uuid4().hex[:12]}"


def read_record(path: Path) -> ProcessRecord | None:
    try:
        return ProcessRecord.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def write_record(path: Path, record: ProcessRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record.model_dump(), indent=2) + "\n")
    os.replace(tmp, path)


def _reap(pid: int) -> None:
    popen = _children.get(pid)
    if popen is not None and popen.poll() is not None:
        del _children[pid]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _belongs(proc: psutil.Process, record: ProcessRecord) -> bool:
    """True if `proc` was started, directly or not, by the start that `record` describes."""
    try:
        if proc.environ().get(MARKER_ENV) == record.marker:
            return True
        # A child that cleared its environment still sits in the session of our leader; the
        # start time rules out an unrelated process that reused the leader's pid since.
        return (
            os.getsid(proc.pid) == record.pid
            and proc.create_time() >= record.started_at - 1.0
        )
    except (psutil.Error, OSError):
        return False


def is_running(record: ProcessRecord | None) -> bool:
    """Whether the process `record` names is alive and is still ours (not a reused pid)."""
    if record is None:
        return False
    _reap(record.pid)
    try:
        proc = psutil.Process(record.pid)
    except psutil.Error:
        return False
    return _alive(proc) and _belongs(proc, record)


def members(record: ProcessRecord) -> list[psutil.Process]:
    """Every live process that belongs to the start `record` describes, the leader included."""
    own = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid != own and _alive(proc) and _belongs(proc, record):
            found.append(proc)
    return found


def check_ports(host: str, ports: list[Port]) -> None:
    """Raise InvalidInput if two ports coincide, PortInUse if one is taken on this machine."""
    check_distinct(ports)
    check_free(host, ports)


def check_distinct(ports: list[Port]) -> None:
    seen: dict[int, Port] = {}
    for port in ports:
        if not 0 < port.number < 65536:
            raise InvalidInput(f"port {port.number} ({port.setting}) is not between 1 and 65535")
        if port.number in seen:
            raise InvalidInput(
                f"port {port.number} is wanted by both {seen[port.number].setting} "
                f"and {port.setting}",
                hint="give the embedded services distinct ports",
            )
        seen[port.number] = port


def check_free(host: str, ports: list[Port]) -> None:
    for port in ports:
        if not port_free(host, port.number, all_interfaces=port.all_interfaces):
            setting = port.setting.split(" ")[0]
            raise PortInUse(
                f"port {port.number} ({port.setting}) is already in use",
                hint=f"stop what holds it or set ATELIER_{setting.upper().replace('.', '__')}",
            )


def port_free(host: str, port: int, *, all_interfaces: bool = False) -> bool:
    """Bind test, as the server would bind: SO_REUSEADDR, so that TIME_WAIT does not count."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    addresses = [host, wildcard] if all_interfaces else [host]
    for address in addresses:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                raise ServiceError(f"cannot test port {port} on {address}: {e}") from e
    return True


def spawn(argv: list[str], *, env: dict[str, str], log_file: Path, cwd: Path) -> subprocess.Popen:
    """Start `argv` detached: its own session (so a Ctrl-C in the terminal that ran `atelier up`
    does not reach it, and so its session id identifies its descendants), output to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _children[popen.pid] = popen
    return popen


def exit_code(pid: int) -> int | None:
    """Exit code of a process this Python process started, None while it runs (or if unknown)."""
    popen = _children.get(pid)
    return None if popen is None else popen.poll()


def stop(record: ProcessRecord, *, term_timeout_s: float, grace_s: float = 5.0) -> int:
    """Stop the start `record` describes and everything it spawned; return how many processes
    were running. SIGTERM goes to the leader only (it shuts its own children down in order);
    whatever of ours is left after `grace_s` gets SIGKILL."""
    procs = {p.pid: p for p in members(record)}
    leader = procs.get(record.pid)
    # Without its leader (it crashed or was killed) nobody shuts the rest down in order.
    for proc in [leader] if leader is not None else procs.values():
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _wait_gone([leader] if leader is not None else list(procs.values()), term_timeout_s)
    deadline = time.monotonic() + grace_s
    while True:
        for proc in members(record):
            procs.setdefault(proc.pid, proc)
        left = [p for p in procs.values() if _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _wait_gone(left, 5.0)
    still = [p.pid for p in procs.values() if _alive(p)]
    _reap(record.pid)
    if still:
        raise ServiceError(f"processes {still} did not exit after SIGKILL")
    return len(procs)


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        for p in procs:
            _reap(p.pid)
        time.sleep(0.1)


def log_tail(path: Path, *, since: int = 0, lines: int = 20) -> str:
    """The last `lines` lines of `path` written after byte offset `since`."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"
