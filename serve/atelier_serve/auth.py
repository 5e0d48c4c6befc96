"""API keys: bearer tokens from a file or an environment variable, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from pathlib import Path

from atelier.endpoint.config import Auth
from atelier.endpoint.keys import parse_keys
from atelier.errors import InvalidInput, Unauthorized


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The keys an ingress accepts. The file is re-read when it changes (a Kubernetes Secret
    volume is updated in place), so keys rotate without a restart."""

    def __init__(self, auth: Auth):
        self.auth = auth
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._from_file: set[bytes] = set()
        env_text = os.environ.get(auth.api_keys_env, "") if auth.api_keys_env else ""
        self._from_env = {_digest(k) for k in parse_keys(env_text)}
        if auth.required and not self._digests():
            where = " or ".join(filter(None, [
                str(auth.api_keys_file) if auth.api_keys_file else None,
                f"${auth.api_keys_env}" if auth.api_keys_env else None,
            ])) or "nowhere (set auth.api_keys_file or auth.api_keys_env)"
            raise InvalidInput(f"auth.required is set but no API key was found in {where}",
                               where="auth")

    def _digests(self) -> set[bytes]:
        path = self.auth.api_keys_file
        if path is not None:
            try:
                stat = Path(path).stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
            except OSError:
                stamp = None
            with self._lock:
                if stamp != self._stamp:
                    try:
                        text = Path(path).read_text()
                    except OSError:
                        text = ""  # a missing file holds no keys: fail closed
                    self._from_file = {_digest(k) for k in parse_keys(text)}
                    self._stamp = stamp
        return self._from_file | self._from_env

    def check(self, authorization: str | None) -> None:
        """Raise Unauthorized unless `authorization` is "Bearer <a valid key>"."""
        if not self.auth.required:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        candidate = _digest(token.strip())
        # Digests of equal length, each compared in constant time: the time taken says nothing
        # about how much of a key was right.
        if not any(hmac.compare_digest(candidate, known) for known in self._digests()):
            raise Unauthorized("invalid API key")
