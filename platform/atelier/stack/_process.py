"""The embedded services' common ground: the Service base class (start, wait until ready, stop)
and the process bookkeeping under it: port checks, detached start, stopping our own."""

from __future__ import annotations

import errno
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
from atelier.files import write_atomic
from atelier.waiting import poll

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
    write_atomic(path, record.model_dump_json(indent=2) + "\n")


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


def port_free(host: str, port: int, *, all_interfaces: bool = False,
              time_wait_counts: bool = False) -> bool:
    """Bind test, as the server would bind: SO_REUSEADDR, so that TIME_WAIT does not count.
    With `time_wait_counts`, a port whose connections a process closed in the last minute (our
    own restart, a stack someone just stopped) counts as taken, as a bind without SO_REUSEADDR
    sees it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    addresses = [host, wildcard] if all_interfaces else [host]
    for address in addresses:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            if not time_wait_counts:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                raise ServiceError(f"cannot test port {port} on {address}: {e}") from e
    return True


def ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections (and binds to port 0). A free port in it
    can be taken by any process's next connection; one outside it only by an explicit bind."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 65535  # Linux's default start, IANA's (macOS, BSD) end
    return range(low, high + 1)


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

    def all_gone() -> bool:
        for proc in members(record):
            procs.setdefault(proc.pid, proc)
        return not any(_alive(p) for p in procs.values())

    poll(all_gone, timeout_s=grace_s, interval_s=0.2)
    left = [p for p in procs.values() if _alive(p)]
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
    def gone() -> bool:
        for p in procs:
            _reap(p.pid)
        return not any(_alive(p) for p in procs)

    poll(gone, timeout_s=timeout_s, interval_s=0.1)


def log_tail(path: Path, *, since: int = 0, lines: int = 20) -> str:
    """The last `lines` lines of `path` written after byte offset `since`."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"


class Service:
    """A server process of the embedded stack: `start` spawns it detached and waits until it is
    ready, `stop` stops it and everything it spawned. Its record file, next to its state, lets
    any later process (`atelier status`, `atelier down`) find it again.

    A subclass says how to run it (`argv`, `environment`, `ports`) and when it is ready
    (`ready`, which raises waiting.NotYet with the reason while it is not)."""

    name: str  # prefix of the marker; the service's name in `atelier status`
    title: str  # in messages: "SeaweedFS", "the Ray head"
    command: str  # in messages about the process: "SeaweedFS", "`ray start`"
    term_timeout_s = 20.0  # how long it may take to shut down in order after SIGTERM
    ready_interval_s = 0.1

    def __init__(self, state_dir: Path, *, host: str, log_file: Path, start_timeout_s: float):
        self.state_dir = Path(state_dir).absolute()
        self.host = host
        self.log_file = Path(log_file)
        self.start_timeout_s = start_timeout_s

    # -- what a subclass says ------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """Main address clients use."""
        raise NotImplementedError

    def ports(self) -> list[Port]:
        """Every port it binds, checked before it starts."""
        raise NotImplementedError

    def port_map(self) -> dict[str, int]:
        """Its ports by role, as `status` reports them."""
        raise NotImplementedError

    def argv(self) -> list[str]:
        raise NotImplementedError

    def environment(self, marker: str) -> dict[str, str]:
        return {**os.environ, MARKER_ENV: marker}

    def prepare(self) -> None:
        """Make what it needs before its process starts (folders, configuration files)."""

    def ready(self) -> bool:
        """True once it serves; raise waiting.NotYet, with the reason, while it does not."""
        raise NotImplementedError

    def after_stop(self, record: ProcessRecord) -> None:
        """Clean up after its processes are gone."""

    # -- the lifecycle -------------------------------------------------------------------------
    @property
    def record_file(self) -> Path:
        return self.state_dir / "pid.json"

    def record(self) -> ProcessRecord | None:
        """The record of the running instance, None if it is not running."""
        record = read_record(self.record_file)
        return record if is_running(record) else None

    @property
    def running(self) -> bool:
        return self.record() is not None

    @property
    def pid(self) -> int | None:
        record = self.record()
        return record.pid if record else None

    def start(self) -> bool:
        """Start and wait until ready. False if it already ran."""
        if self.running:
            return False
        check_ports(self.host, self.ports())
        argv = self.argv()
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.prepare()
        marker = new_marker(self.name)
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        started_at = time.time()
        popen = spawn(argv, env=self.environment(marker), log_file=self.log_file, cwd=self.state_dir)
        write_record(self.record_file, ProcessRecord(
            pid=popen.pid, marker=marker, started_at=started_at, endpoint=self.endpoint,
            ports=self.port_map(),
        ))
        try:
            self._wait_ready(popen.pid, log_start)
        except BaseException:
            self.stop()
            raise
        return True

    def stop(self) -> int:
        """Stop the running instance; return how many processes were stopped (0: none ran)."""
        record = read_record(self.record_file)
        stopped = stop(record, term_timeout_s=self.term_timeout_s) if record else 0
        self.record_file.unlink(missing_ok=True)
        if record:
            self.after_stop(record)
        return stopped

    def _wait_ready(self, pid: int, log_start: int) -> None:
        def started() -> bool:
            code = exit_code(pid)
            if code is not None:
                raise ServiceError(
                    f"{self.command} exited with code {code} while starting; last lines of "
                    f"{self.log_file}:\n{log_tail(self.log_file, since=log_start)}"
                )
            return self.ready()

        ready, why = poll(started, timeout_s=self.start_timeout_s, interval_s=self.ready_interval_s)
        if not ready:
            raise ServiceError(
                f"{self.title} was not ready within {self.start_timeout_s:g} s ({why or 'no answer'}); "
                f"last lines of {self.log_file}:\n{log_tail(self.log_file, since=log_start)}"
            )
