"""`atelier models ...`: the built-in base models, and the registry of trained ones."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from atelier.models.builtin import BUILTIN

app = typer.Typer(help="Built-in base models and the model registry.", no_args_is_help=True)
console = Console()


@app.command("builtin")
def builtin() -> None:
    """List the models Atelier can build from configs (no download needed)."""
    table = Table("name", "resolution", "config digest", "description")
    for spec in BUILTIN.values():
        table.add_row(spec.name, str(spec.resolution), spec.digest(), spec.description)
    console.print(table)


@app.command("build")
def build(
    name: str = typer.Argument(..., help=f"Built-in model: {', '.join(BUILTIN)}."),
    out: str = typer.Option(..., "--out", "-o", help="A folder, or an s3:// prefix to commit it to."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Build a built-in model from its config and save it as a diffusers folder (or to S3)."""
    import tempfile

    from atelier.cli.progress import transfer_bar
    from atelier.models import build_model
    from atelier.storage import Storage, is_s3

    if not is_s3(out):
        path = build_model(name, out, seed=seed)
        console.print(f"built {name} at {path}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = build_model(name, f"{tmp}/{name}", seed=seed)
        with transfer_bar(f"uploading {name}") as progress:
            manifest = Storage().commit(local, out, {"kind": "base-model", "name": name,
                                                     "seed": seed}, progress=progress)
    console.print(f"committed {name} to {out} ({len(manifest.files)} files, "
                  f"{manifest.total_bytes / 1e6:.1f} MB, manifest {manifest.digest[:12]})")


def _registry():
    from atelier.registry import Registry
    from atelier.settings import get_settings
    from atelier.storage import Storage

    return Registry(Storage(get_settings()))


@app.command("list")
def list_models(
    name: str | None = typer.Argument(None, help="Only the versions of this model."),
) -> None:
    """List the registered model versions."""
    cards = _registry().list(name)
    if not cards:
        console.print("no models registered" + (f" under {name!r}" if name else ""))
        return
    table = Table("name", "version", "method", "base", "identifiers", "final loss", "created")
    for card in cards:
        table.add_row(
            card.name, str(card.version), card.method, card.base_model,
            " ".join(c.identifier for c in card.concepts),
            "-" if card.final_loss is None else f"{card.final_loss:.4g}",
            card.created_at,
        )
    console.print(table)


@app.command("show")
def show(ref: str = typer.Argument(..., help='"name" (latest version) or "name:version".')) -> None:
    """Print a model version's card as YAML."""
    import yaml

    uri, card = _registry().get(ref)
    # Plain text, not rich: the output stays valid YAML at any terminal width.
    typer.echo(f"# {uri}\n" + yaml.safe_dump(card.model_dump(mode="json"), sort_keys=False).rstrip())


@app.command("rm")
def rm(
    ref: str = typer.Argument(..., help='"name:version", or "name" with --all-versions.'),
    all_versions: bool = typer.Option(False, "--all-versions", help="Remove every version of the name."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove a model version (or every version of a model) from the registry."""
    registry = _registry()
    targets = registry.rm(ref, all_versions=all_versions, dry_run=True)  # typos fail before asking
    if not yes:
        typer.confirm(f"remove {', '.join(targets)}?", abort=True)
    for uri in registry.rm(ref, all_versions=all_versions):
        console.print(f"removed {uri}", highlight=False)
