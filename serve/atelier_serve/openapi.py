"""`python -m atelier_serve.openapi`: write the HTTP API's OpenAPI document for the default
config into schemas/openapi.json (a test checks it for drift). A deployed server documents its
own configured bounds at /docs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from atelier.endpoint.config import ServeConfig

OPENAPI = Path("schemas") / "openapi.json"


def openapi_json(config: ServeConfig | None = None) -> str:
    """The OpenAPI document of the app `build_api` makes for `config`, as deterministic JSON."""
    from atelier_serve.ingress import build_api

    # The routes only reach the ingress when called; the document needs nothing but the config.
    app = build_api(SimpleNamespace(config=config or ServeConfig()))  # type: ignore[arg-type]
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OPENAPI
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(openapi_json())
    print(out)
