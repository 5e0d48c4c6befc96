"""A client of the HTTP API, for `atelier generate` and the benchmark: errors come back as the
same AtelierError classes the server raised."""

from __future__ import annotations

import base64
from pathlib import Path

from urllib3.util import Retry

from atelier.endpoint.api import GenerationRequest, GenerationResponse, ModelList
from atelier.errors import (
    AtelierError,
    InvalidInput,
    ModelNotReady,
    NotFound,
    Overloaded,
    ServiceError,
    Unauthorized,
)

DEFAULT_URL = "http://127.0.0.1:8000"
ERRORS_BY_STATUS: dict[int, type[AtelierError]] = {
    401: Unauthorized, 404: NotFound, 422: InvalidInput, 424: ModelNotReady, 503: Overloaded,
}
MAX_RETRY_AFTER_S = 30.0


class _Retry(Retry):
    """Waits as long as the server's Retry-After asks, up to MAX_RETRY_AFTER_S."""

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), MAX_RETRY_AFTER_S)


class Client:
    """The Atelier image API at `url`."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, *,
                 timeout_s: float = 300.0, retries: int = 2):
        import requests
        from requests.adapters import HTTPAdapter

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.session = requests.Session()
        # Overload (503) is temporary by definition: it is retried, after the server's
        # Retry-After. Nothing else is: a generation that timed out is not sent twice.
        retry = _Retry(total=retries, status=retries, connect=0, read=0, other=0,
                       status_forcelist={503}, allowed_methods=None, backoff_factor=0.5,
                       raise_on_status=False)
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, **kwargs):
        import requests

        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
        except requests.RequestException as e:
            raise ServiceError("cannot reach the image API", where=self.url,
                               hint="is it running? `atelier serve up`") from e
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text.strip()[:300] or response.reason
            raise ERRORS_BY_STATUS.get(response.status_code, AtelierError)(
                f"{response.status_code}: {message}", where=self.url + path)
        return response

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
