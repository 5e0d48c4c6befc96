"""A client of the HTTP API, for `atelier generate` and the benchmark: errors come back as the
same AtelierError classes the server raised."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from atelier.errors import (
    AtelierError,
    InvalidInput,
    ModelNotReady,
    NotFound,
    Overloaded,
    ServiceError,
    Unauthorized,
)
from atelier.endpoint.api import GenerationRequest, GenerationResponse, ModelList
from atelier.endpoint.config import parse_keys
from atelier.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8000"
_BY_STATUS: dict[int, type[AtelierError]] = {
    401: Unauthorized, 404: NotFound, 422: InvalidInput, 424: ModelNotReady, 503: Overloaded,
}


def find_api_key(key_file: Path | None, settings: Settings | None = None) -> str | None:
    """The key to send: the first in `key_file`, else $ATELIER_API_KEY, else the first key of the
    local deployment's file (what `atelier serve up` made)."""
    from atelier.endpoint.deploy import api_keys_path

    if key_file is None and os.environ.get("ATELIER_API_KEY"):
        return os.environ["ATELIER_API_KEY"].strip()
    if key_file is None and settings is not None:
        candidate = api_keys_path(settings)
        key_file = candidate if candidate.exists() else None
    if key_file is None:
        return None
    try:
        keys = parse_keys(Path(key_file).read_text())
    except OSError as e:
        raise InvalidInput(f"cannot read the API key file: {e.strerror}", where=str(key_file)) from e
    if not keys:
        raise InvalidInput("no key in the file", where=str(key_file))
    return keys[0]


class Client:
    """The Atelier image API at `url`."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, *,
                 timeout_s: float = 300.0, retries: int = 2):
        import requests

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, **kwargs):
        import requests

        for attempt in range(self.retries + 1):
            try:
                response = self.session.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
            except requests.RequestException as e:
                raise ServiceError("cannot reach the image API", where=self.url,
                                   hint="is it running? `atelier serve up`") from e
            if response.status_code == 503 and attempt < self.retries:
                # Overload is temporary by definition: wait as long as the server asks.
                time.sleep(min(float(response.headers.get("Retry-After") or 1), 30.0))
                continue
            if response.status_code >= 400:
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text.strip()[:300] or response.reason
                raise _BY_STATUS.get(response.status_code, AtelierError)(
                    f"{response.status_code}: {message}", where=self.url + path)
            return response
        raise AssertionError("unreachable")

    def generate(self, request: GenerationRequest) -> GenerationResponse:
        """Images for `request` (always fetched as b64_json, which carries the seeds)."""
        body = request.model_dump(exclude_none=True) | {"response_format": "b64_json"}
        response = self._call("POST", "/v1/images/generations", json=body)
        return GenerationResponse.model_validate(response.json())

    def models(self) -> ModelList:
        return ModelList.model_validate(self._call("GET", "/v1/models").json())


def save_images(response: GenerationResponse, out: Path) -> list[Path]:
    """Write the PNGs as <model>-<seed>.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    stem = response.model.replace(":", "-v").replace("/", "_")
    paths = []
    for image in response.data:
        path = out / f"{stem}-{image.seed}.png"
        path.write_bytes(base64.b64decode(image.b64_json))
        paths.append(path)
    return paths
