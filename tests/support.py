"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_credentials(path: Path, access: str, secret: str) -> Path:
    """An AWS shared-credentials file, the format the platform reads keys from."""
    path.write_text(f"[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n")
    return path
