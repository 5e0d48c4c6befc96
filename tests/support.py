"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

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
