"""What every S3 client of the platform shares: the checksum environment non-AWS servers need,
the AWS shared-credentials file format (read and written), and a boto3 client for such servers."""

from __future__ import annotations

import configparser
import os
from pathlib import Path

from atelier.errors import StorageUnavailable
from atelier.files import write_new

# Non-AWS servers (SeaweedFS, MinIO, ...) reject or corrupt uploads when the AWS SDK (boto3 >=
# 1.36, the C++ SDK under pyarrow) adds its newer default checksums; every client the platform
# creates runs with these set.
CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
}


def set_checksum_env() -> None:
    """Set CHECKSUM_ENV in this process's environment, leaving values the user exported."""
    for key, value in CHECKSUM_ENV.items():
        os.environ.setdefault(key, value)


def read_credentials_file(path: Path, profile: str = "default") -> tuple[str, str]:
    """(access key, secret key) of `profile` in an AWS shared-credentials file."""
    parser = configparser.ConfigParser()
    try:
        found = parser.read(path)
    except configparser.Error as e:
        raise StorageUnavailable("credentials file is not in INI format", where=str(path)) from e
    if not found:
        raise StorageUnavailable("credentials file not found or unreadable", where=str(path))
    if profile not in parser:
        raise StorageUnavailable(f"no profile [{profile}]", where=str(path))
    section = parser[profile]
    try:
        return section["aws_access_key_id"], section["aws_secret_access_key"]
    except KeyError as e:
        raise StorageUnavailable(f"profile [{profile}] lacks {e.args[0]}", where=str(path)) from e


def create_credentials_file(path: Path, access_key: str, secret_key: str, *,
                            comment: str = "") -> bool:
    """Write keys as profile [default] of a new credentials file (mode 0600, folder 0700), unless
    the file exists: True if this call created it. Of two processes racing, the first one's keys
    win, and nobody reads a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    text = f"{header}[default]\naws_access_key_id = {access_key}\naws_secret_access_key = {secret_key}\n"
    return write_new(path, text, mode=0o600)


def boto3_client(endpoint: str, access_key: str | None, secret_key: str | None, *,
                 region: str = "us-east-1", **config):
    """A boto3 S3 client set up for an S3-compatible server rather than AWS: path-style
    addressing, SigV4, the checksum environment. `config` goes to botocore's Config."""
    import boto3
    from botocore.config import Config

    set_checksum_env()
    options = {"signature_version": "s3v4", "s3": {"addressing_style": "path"}, **config}
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(**options),
    )
