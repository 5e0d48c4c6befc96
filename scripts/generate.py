"""Regenerate every generated file of the repository: the JSON Schemas (schemas/*.schema.json),
the HTTP API's OpenAPI document, the Serve config example, the generated blocks of the Helm
chart's values.yaml (pools and ServeConfig defaults) and the chart's Grafana dashboard. `make
generate` runs it; the paths are the repository's whatever the working directory. The tests
compare each file with its generator, and `make check-generated` fails when regenerating changes
anything git tracks."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def outputs() -> dict[Path, str]:
    """Repository-relative path -> the text its generator makes now."""
    from atelier import schemas
    from atelier.endpoint.rayservice import EXAMPLE, example_yaml
    from atelier.kube import chart, dashboard
    from atelier_serve.openapi import OPENAPI, openapi_json

    files = {Path("schemas") / name: text for name, text in schemas.render().items()}
    files[OPENAPI] = openapi_json()
    files[EXAMPLE] = example_yaml()
    files[chart.VALUES] = chart.values_yaml((ROOT / chart.VALUES).read_text())
    files[dashboard.PATH] = dashboard.json_text()
    return files


def main() -> int:
    files = outputs()
    stale = {p for p in (ROOT / "schemas").glob("*.schema.json")} - {ROOT / p for p in files}
    for path in sorted(stale):  # a model that was removed takes its schema with it
        path.unlink()
        print(f"removed {path.relative_to(ROOT)}")
    for relative, text in sorted(files.items()):
        path = ROOT / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
