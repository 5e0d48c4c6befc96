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
    from atelier.errors import NotFound

    table = Table("name", "resolution", "digest", "description")
    for spec in BUILTIN.values():
        try:
            digest = spec.digest()
        except NotFound:  # a pretrained built-in whose weights are not in this checkout
            digest = "(not pretrained)"
        table.add_row(spec.name, str(spec.resolution), digest, spec.description)
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


@app.command("upload")
def upload(
    folder: str = typer.Argument(..., help="A local folder: a diffusers model, or a CLIP/DINO encoder."),
    to: str = typer.Option(..., "--to", help="The s3:// prefix to commit it to."),
) -> None:
    """Commit a local folder to S3 with a manifest (every file's sha256), so that training, serving
    and `atelier eval --clip-encoder s3://...` can load it from there, verified."""
    from pathlib import Path

    from atelier.cli.progress import transfer_bar
    from atelier.errors import InvalidInput, NotFound
    from atelier.storage import Storage, is_s3

    if not is_s3(to):
        raise InvalidInput("--to must be an s3:// prefix", where=to)
    source = Path(folder).expanduser()
    if not source.is_dir():
        raise NotFound("no such folder", where=folder)
    with transfer_bar(f"uploading {source.name}") as progress:
        manifest = Storage().commit(source, to, {"kind": "upload", "source": str(source.resolve())},
                                    progress=progress)
    console.print(f"committed {source} to {to} ({len(manifest.files)} files, "
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
    from atelier.quality.results import SUMMARY

    registry = _registry()
    summaries = {}
    for card in cards:
        evaluation = registry.evaluation(card)
        summaries[card.ref] = evaluation.summary() if evaluation else {}
    aliases: dict[str, list[str]] = {}
    for model in sorted({c.name for c in cards}):
        for alias, move in registry.aliases(model).items():
            aliases.setdefault(move.ref, []).append(alias)
    # A column per metric that some listed model has a value of: the mean over the model's
    # concepts in its latest evaluation ("-": not evaluated, or no encoder for it; `atelier models
    # show` says why). ↑: higher is better.
    shown = [m for m in SUMMARY if any(s.get(m) is not None for s in summaries.values())]
    table = Table("name", "version", "aliases", "method", "base", "identifiers", "final loss",
                  *(f"{m} {'↑' if SUMMARY[m] else '↓'}" for m in shown), "created")
    for card in cards:
        summary = summaries[card.ref]
        table.add_row(
            card.name, str(card.version), " ".join(aliases.get(card.ref, [])) or "-", card.method,
            card.base_model,
            " ".join(c.identifier for c in card.concepts),
            "-" if card.final_loss is None else f"{card.final_loss:.4g}",
            *("-" if summary.get(m) is None else f"{summary[m]:.4g}" for m in shown),
            card.created_at,
        )
    console.print(table)


@app.command("show")
def show(ref: str = typer.Argument(..., help='"name" (latest version), "name:version" or "name@alias".')
         ) -> None:
    """Print a model version's card as YAML."""
    import yaml

    registry = _registry()
    uri, card = registry.get(ref)
    document = card.model_dump(mode="json")
    evaluation = registry.evaluation(card)
    # The latest evaluation (`atelier eval`), kept beside the card: a summary, then per concept.
    document["aliases"] = sorted(a for a, m in registry.aliases(card.name).items() if m.version == card.version)
    document["evaluation"] = None if evaluation is None else {
        "evaluated_at": evaluation.evaluated_at,
        "summary": evaluation.summary(),
        "base_summary": evaluation.summary(base=True),
        "unavailable": evaluation.unavailable(),
        "concepts": [c.model_dump(mode="json", exclude_none=True) for c in evaluation.concepts],
        "config": evaluation.config.model_dump(mode="json"),
    }
    # Plain text, not rich: the output stays valid YAML at any terminal width.
    typer.echo(f"# {uri}\n" + yaml.safe_dump(document, sort_keys=False).rstrip())


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


@app.command("promote")
def promote(
    ref: str = typer.Argument(
        ..., help='The version to promote: "name:version", "name" (latest) or "name@other-alias".'),
    alias: str = typer.Option(..., "--alias", "-a", help='The alias to move ("prod").'),
    promote_if: str | None = typer.Option(
        None, "--promote-if", help='A gate: "clip_i > 0.8 and fid < 40". The candidate\'s '
        "evaluation must meet it and beat the current version on each metric named."),
    note: str | None = typer.Option(None, help="Why, kept in the alias's history."),
) -> None:
    """Point an alias at a version. Endpoints serving "name@alias" switch to it without a
    restart; if someone else moves the alias meanwhile, nothing is written (exit 11); a gate
    that says no changes nothing (exit 12)."""
    from atelier import promotion
    from atelier.settings import get_settings

    move, webhook = promotion.promote(_registry(), ref, alias, promote_if=promote_if, note=note,
                                      webhook=get_settings().promotion_webhook)
    before = f" (was version {move.previous})" if move.previous is not None else ""
    console.print(f"{move.name}@{move.alias} -> version {move.version}{before}", highlight=False)
    _said(webhook)


@app.command("rollback")
def rollback(
    name: str = typer.Argument(..., help="Model name."),
    alias: str = typer.Option(..., "--alias", "-a", help='The alias to move back ("prod").'),
    note: str | None = typer.Option(None, help="Why, kept in the alias's history."),
) -> None:
    """Point an alias back at the version it named before its latest move."""
    from atelier import promotion
    from atelier.settings import get_settings

    move, webhook = promotion.rollback(_registry(), name, alias, note=note,
                                       webhook=get_settings().promotion_webhook)
    console.print(f"{move.name}@{move.alias} -> version {move.version} (rolled back from version "
                  f"{move.previous})", highlight=False)
    _said(webhook)


def _said(webhook: str | None) -> None:
    if webhook is not None:
        console.print(f"webhook: {webhook}", highlight=False,
                      style="yellow" if webhook.startswith("failed") else None)


@app.command("history")
def history(
    name: str = typer.Argument(..., help="Model name."),
    alias: str | None = typer.Option(None, "--alias", "-a", help="Only this alias."),
) -> None:
    """Every move of a model's aliases, oldest first."""
    moves = _registry().history(name, alias)
    if not moves:
        console.print(f"{name} has no aliases" if alias is None else f"{name}@{alias} never moved")
        return
    table = Table("when", "alias", "move", "action", "version", "by", "note")
    for m in moves:
        table.add_row(m.at, m.alias, str(m.seq), m.action,
                      f"{m.previous} -> {m.version}" if m.previous is not None else str(m.version),
                      m.by, m.note or "")
    console.print(table)


@app.command("pretrain")
def pretrain(
    out: str | None = typer.Option(
        None, "--out", "-o", help="Folder the pack is written to (default: where the built-in "
        "model `shop` reads it, platform/atelier/models/weights/shop)."),
    seed: int = typer.Option(0, help="Seed of the weights and of the world."),
    smoke: bool = typer.Option(False, help="A seconds-long run of the same job (for tests)."),
    run_name: str | None = typer.Option(None, help="Run name; reuse one to resume that run."),
) -> None:
    """Pretrain the shop base (tiny SD + shop CLIP) on the shop world as a Ray Train job, then
    write its pack where the built-in model `shop` reads it (or to --out). About 80 minutes on 2
    CPU cores."""
    from pathlib import Path

    from atelier import stack
    from atelier.cli.progress import follow_job
    from atelier.models.shop import PACK
    from atelier.settings import get_settings
    from atelier.training.pretrain import PretrainConfig, fetch_pack, submit_pretrain

    if smoke and not out:  # a seconds-long run is no base to generate with
        from atelier.errors import InvalidInput

        raise InvalidInput("--smoke needs --out: its pack must not replace the built-in shop base",
                           where="--smoke")
    settings = get_settings()
    stack.up(settings)
    config = PretrainConfig.smoke(seed=seed) if smoke else PretrainConfig(seed=seed)
    job_id, spec = submit_pretrain(settings, config, run_name=run_name)
    console.print(f"pretraining job {job_id}: run {spec.run_name}")
    follow_job(job_id, console)
    folder = fetch_pack(settings, spec, Path(out) if out else PACK)
    console.print(f"shop base pack written to {folder} (from {spec.out_uri})")
