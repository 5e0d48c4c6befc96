"""The Ray cluster's token (Ray's token authentication, RAY_AUTH_MODE=token): generated for the
embedded head into the Atelier home, and presented by each of our clients, as a bearer header to
the dashboard (Jobs API, Serve REST API) or, for a driver, through Ray's environment variables."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from atelier.errors import InvalidInput
from atelier.files import write_new
from atelier.settings import Settings

# Ray 2.60 reads these (C++ AuthenticationTokenLoader): the mode, then the token from
# RAY_AUTH_TOKEN, else from the file RAY_AUTH_TOKEN_PATH names, else from ~/.ray/auth_token.
MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# "0": no multi-node cluster (Ray's default on macOS and Windows): localhost stays the node's IP.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def create_token_file(path: Path) -> bool:
    """Write a new random token (256 bits, hex, as `ray get-auth-token --generate` makes) to
    `path`, readable by its owner only, unless the file exists; True if this call wrote it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_new(path, secrets.token_hex(32), mode=0o600)


def check_private(path: Path) -> None:
    """InvalidInput if others than its owner may read or write the token file."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InvalidInput(f"the Ray token file is readable by others (mode {mode:o})",
                           where=str(path), hint=f"chmod 600 {path}, or delete it to rotate")


def read_token(path: Path | str) -> str | None:
    """The token in `path`, None where there is no such file or it is empty."""
    try:
        return Path(path).read_text().strip() or None
    except FileNotFoundError:
        return None


def token(settings: Settings) -> str | None:
    """The token of the cluster `settings` name: the embedded head's generated file, or for an
    external cluster what Ray itself would read from the environment (none where unset)."""
    if settings.ray_address is None:
        return read_token(settings.embedded_ray_token_file)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if os.environ.get(TOKEN_PATH_ENV):
        return read_token(os.environ[TOKEN_PATH_ENV])
    return None


def bearer(value: str | None) -> dict[str, str]:
    """The HTTP header the dashboard checks; empty without a token."""
    return {"Authorization": f"Bearer {value}"} if value else {}


def headers(settings: Settings) -> dict[str, str]:
    """Headers for requests to the dashboard of the cluster `settings` name."""
    return bearer(token(settings))


def driver_env(token_file: Path) -> dict[str, str]:
    """Environment of a Ray process on this machine (the embedded head, what it starts, a driver
    of yours): token authentication with the token in `token_file`, and Ray's single-machine
    mode, in which it keeps 127.0.0.1 as the node's address instead of swapping in the
    machine's (the head then listens on loopback only, and a driver looks for it there)."""
    return {MODE_ENV: "token", TOKEN_PATH_ENV: str(token_file), SINGLE_MACHINE_ENV: "0"}
