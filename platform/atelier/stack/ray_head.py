"""The embedded Ray head: `ray start --head --block` on loopback, with dashboard and Jobs API,
its every port behind Ray's token authentication."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

from atelier import rayauth
from atelier.errors import ServiceError
from atelier.stack._process import Port, Service
from atelier.waiting import NotYet

# Ports Ray would otherwise pick at random or take from fixed defaults (10001, 44217, 52365, ...)
# are laid out after the GCS port, so a second stack with another ray_port does not collide:
# +1 node manager, +2 object manager, +3 Ray Client server, +4/+5 dashboard agent HTTP/gRPC,
# +6 runtime-env agent, +7/+8 autoscaler/dashboard Prometheus servers (set through the
# environment), +10 .. +10+WORKER_PORTS-1 worker processes (one port each, drivers included).
# The Serve proxy's port is the serving application's business.
WORKER_PORT_OFFSET = 10
WORKER_PORTS = 100
_DERIVED = {
    "node_manager": (1, "Ray node manager"),
    "object_manager": (2, "Ray object manager"),
    "client_server": (3, "Ray Client server"),
    "dashboard_agent_http": (4, "Ray dashboard agent"),
    "dashboard_agent_grpc": (5, "Ray dashboard agent gRPC"),
    "runtime_env_agent": (6, "Ray runtime-env agent"),
    "autoscaler_metrics": (7, "Ray autoscaler metrics"),
    "dashboard_metrics": (8, "Ray dashboard metrics"),
}


def default_temp_dir(home: Path) -> Path:
    """Ray's temp dir for the stack of `home`. Ray puts unix sockets three levels below it and
    those paths may not exceed ~107 bytes, so it is short and under /tmp (not $TMPDIR, which is
    long on macOS), and named after `home` so that two homes never share one."""
    return Path("/tmp") / f"atelier-ray-{hashlib.sha1(str(home).encode()).hexdigest()[:8]}"


def ray_executable() -> str:
    beside = shutil.which("ray", path=str(Path(sys.executable).parent))
    found = beside or shutil.which("ray")
    if found is None:
        raise ServiceError("the `ray` command was not found", hint="pip install 'ray[default]'")
    return found


class RayHead(Service):
    """A single-node Ray cluster started with `ray start --head --block` as the leader of its own
    session. `stop` sends SIGTERM to that one process, which tears down the processes it started,
    then kills whatever of ours is left, and never touches another Ray on the machine."""

    name = "ray"
    title = "the Ray head"
    command = "`ray start`"
    term_timeout_s = 30.0
    ready_interval_s = 0.25

    def __init__(
        self,
        state_dir: Path,
        *,
        temp_dir: Path,
        token_file: Path,
        port: int = 6380,
        dashboard_port: int = 8265,
        metrics_port: int = 8090,
        host: str = "127.0.0.1",
        num_cpus: int | None = None,
        log_file: Path | None = None,
        start_timeout_s: float = 90.0,
    ):
        state_dir = Path(state_dir).absolute()
        super().__init__(state_dir, host=host,
                         log_file=Path(log_file) if log_file else state_dir / "ray.log",
                         start_timeout_s=start_timeout_s)
        self.temp_dir = Path(temp_dir)
        self.token_file = Path(token_file).absolute()
        self.port = port
        self.dashboard_port = dashboard_port
        self.metrics_port = metrics_port
        self.num_cpus = num_cpus

    @property
    def address(self) -> str:
        """GCS address, what `ray.init(address=...)` takes."""
        return f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """Dashboard and Jobs API address, what the Job Submission client takes."""
        return f"http://{self.host}:{self.dashboard_port}"

    def derived_port(self, role: str) -> int:
        return self.port + _DERIVED[role][0]

    @property
    def worker_ports(self) -> range:
        first = self.port + WORKER_PORT_OFFSET
        return range(first, first + WORKER_PORTS)

    def ports(self) -> list[Port]:
        # Checked on every interface: without Ray's single-machine switch (see environment)
        # Ray binds these there whatever --node-ip-address says.
        ports = [
            Port(self.port, "stack.ray_port", all_interfaces=True),
            Port(self.dashboard_port, "stack.dashboard_port"),
            Port(self.metrics_port, "stack.metrics_port", all_interfaces=True),
        ]
        ports += [
            Port(self.port + offset, f"stack.ray_port + {offset} ({what})", all_interfaces=True)
            for offset, what in _DERIVED.values()
        ]
        ports += [
            Port(n, f"stack.ray_port + {n - self.port} (Ray worker ports)", all_interfaces=True)
            for n in self.worker_ports
        ]
        return ports

    def port_map(self) -> dict[str, int]:
        return {
            "gcs": self.port,
            "dashboard": self.dashboard_port,
            "metrics": self.metrics_port,
            **{role: self.derived_port(role) for role in _DERIVED},
            "min_worker": self.worker_ports.start,
            "max_worker": self.worker_ports.stop - 1,
        }

    def argv(self) -> list[str]:
        argv = [
            ray_executable(), "start", "--head", "--block",
            "--node-ip-address", self.host,
            "--port", str(self.port),
            "--include-dashboard", "true",
            "--dashboard-host", self.host,
            "--dashboard-port", str(self.dashboard_port),
            "--metrics-export-port", str(self.metrics_port),
            "--node-manager-port", str(self.derived_port("node_manager")),
            "--object-manager-port", str(self.derived_port("object_manager")),
            "--ray-client-server-port", str(self.derived_port("client_server")),
            "--dashboard-agent-listen-port", str(self.derived_port("dashboard_agent_http")),
            "--dashboard-agent-grpc-port", str(self.derived_port("dashboard_agent_grpc")),
            "--runtime-env-agent-port", str(self.derived_port("runtime_env_agent")),
            "--min-worker-port", str(self.worker_ports.start),
            "--max-worker-port", str(self.worker_ports.stop - 1),
            "--temp-dir", str(self.temp_dir),
            "--disable-usage-stats",
            "--log-style", "record",
            "--log-color", "false",
        ]
        if self.num_cpus is not None:
            argv += ["--num-cpus", str(self.num_cpus)]
        return argv

    def prepare(self) -> None:
        rayauth.create_token_file(self.token_file)
        rayauth.check_private(self.token_file)

    def environment(self, marker: str) -> dict[str, str]:
        env = super().environment(marker)
        # Two guards. Ray's token authentication: every gRPC call and every dashboard request
        # (Jobs API, Serve REST API) must carry the token. The processes the head starts (job
        # drivers, Ray Train workers, Serve replicas) inherit these variables and so present it
        # too; our HTTP clients send it as a bearer header (rayauth.headers). And loopback:
        # `ray start` swaps 127.0.0.1 for the machine's address, and then the GCS, raylet, object
        # manager, agents and workers listen on every interface; Ray's single-machine switch
        # (meant for macOS and Windows) keeps 127.0.0.1, and every port on it.
        env.update(rayauth.driver_env(self.token_file))
        # A token in the environment would win over the file (Ray reads it first).
        env.pop(rayauth.TOKEN_ENV, None)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["AUTOSCALER_METRIC_PORT"] = str(self.derived_port("autoscaler_metrics"))
        env["DASHBOARD_METRIC_PORT"] = str(self.derived_port("dashboard_metrics"))
        # On a laptop's few cores, several torch threads per worker are many times slower than
        # one (see FIELD_NOTES); a value the user exported wins.
        env.setdefault("OMP_NUM_THREADS", "1")
        # On SIGTERM Ray 2.60 first drains the node for up to 30 s, so that a Kubernetes rolling
        # upgrade loses no request; on one machine that is being stopped there is nothing to
        # hand over to, and `down` should take seconds.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        # An address in the environment would point our own `ray` CLI at another cluster.
        env.pop("RAY_ADDRESS", None)
        # Job entrypoints run `python -m atelier_jobs...`: on the embedded head that must be the
        # interpreter Atelier is installed in, as if its virtual environment were activated.
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
        return env

    def ready(self) -> bool:
        """The dashboard and its Jobs API answer."""
        import requests

        answers = {}
        try:
            # /api/version answers as soon as the dashboard listens; the Jobs API, which the
            # platform submits to, is a module that comes up a moment later.
            for path in ("/api/version", "/api/jobs/"):
                response = requests.get(self.endpoint + path, timeout=2,
                                        headers=rayauth.bearer(rayauth.read_token(self.token_file)))
                if response.status_code in (401, 403):
                    raise ServiceError(f"the Ray head refused the token in {self.token_file} "
                                       f"({response.status_code})")
                response.raise_for_status()
                answers[path] = response.json()
        except (requests.RequestException, ValueError) as e:
            raise NotYet(f"the Jobs API does not answer yet: {e}") from e
        if not isinstance(answers["/api/version"], dict) or not answers["/api/version"].get("ray_version"):
            raise NotYet("/api/version names no Ray version yet")
        return True
