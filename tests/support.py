"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_credentials(path: Path, access: str, secret: str) -> Path:
    """An AWS shared-credentials file, the format the platform reads keys from."""
    path.write_text(f"[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n")
    return path


def bucket_settings(moto_server: str, folder: Path):
    """Settings for a fresh bucket on the moto server, with state and credentials under `folder`."""
    import uuid

    import boto3

    from atelier.settings import S3Settings, Settings

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3", endpoint_url=moto_server, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    creds = write_credentials(folder / "credentials", "testing", "testing")
    return Settings(
        home=folder / "home",
        s3=S3Settings(endpoint=moto_server, bucket=bucket, credentials_file=creds),
    )


def free_port() -> int:
    """A port free now, for a server (a toy, Ray Serve's proxy) to bind a moment later: outside
    the kernel's ephemeral range, where no outgoing connection can take it in between (a port-0
    pick lies inside it), and not in TIME_WAIT."""
    from atelier.stack import _process

    ephemeral = _process.ephemeral_ports()
    for _ in range(100):
        # Below the ports our own components take by themselves: Ray's defaults (6379, 8265,
        # workers 10002-19999), SeaweedFS's (8080, 8333, ...), the private stacks' (12000+).
        port = random.randrange(2000, 6000)
        if port not in ephemeral and _process.port_free("127.0.0.1", port, time_wait_counts=True):
            return port
    raise AssertionError("no free port found between 2000 and 6000")


def tool(name: str, hint: str) -> str:
    """An external tool's executable: on PATH, beside this interpreter (the dev extras' bin) or in
    the repository's .tools/<name>/bin (`make tools`). Without it the test skips, saying `hint`;
    under CI (where `make test` has fetched every tool) it fails instead, so that a missing tool
    can never pass for a passing check."""
    import os
    import shutil
    import sys

    import pytest

    found = next(filter(None, (shutil.which(name, path=path) for path in (
        None, str(Path(sys.executable).parent), str(REPO / ".tools" / name / "bin")))), None)
    if found:
        return found
    message = f"no {name}: {hint}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
