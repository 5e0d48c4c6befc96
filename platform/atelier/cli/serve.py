"""`atelier serve ...` and `atelier generate`: serve registered models over HTTP, and call them."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from atelier.pools import POOLS
from atelier.settings import get_settings

app = typer.Typer(help="Serve registered models over HTTP with Ray Serve.", no_args_is_help=True)
console = Console()

CONFIG_HELP = "Serve config YAML (schema: ServeConfig). Default: the built-in defaults."
GPU_HELP = f"Pool the model deployment runs on: {', '.join(POOLS)}."


def register(root: typer.Typer) -> None:
    """Add `serve` and `generate` to the top-level command."""
    root.add_typer(app, name="serve")
    root.command("generate")(generate)


def _config(path: Path | None, **overrides):
    from atelier.endpoint.config import ServeConfig

    return ServeConfig.load(path, **overrides)


@app.command()
def up(
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    model: list[str] | None = typer.Option(
        None, "--model", "-m",
        help='Model to load at start ("name", "name:version" or a base name); the first is the '
        "default of requests that name none. Repeatable."),
    port: int | None = typer.Option(None, help="HTTP port (http.port)."),
    gpu: str | None = typer.Option(None, help=GPU_HELP),
    timeout: float = typer.Option(600, help="Seconds to wait for the application to run."),
) -> None:
    """Run the serving application on the Ray cluster (the embedded one by default); print its URL."""
    from atelier import stack
    from atelier.endpoint.deploy import serve_up

    settings = get_settings()
    cfg = _config(config, gpu=gpu)
    if port is not None:
        cfg = cfg.parse(cfg.model_dump() | {"http": cfg.http.model_copy(update={"port": port})},
                        where="--port")
    with console.status("starting the embedded stack ..."):
        stack.up(settings)
    with console.status("deploying ...") as status:
        cfg, url = serve_up(settings, cfg, model or [], timeout_s=timeout,
                            on_status=lambda s: status.update(f"application {s.lower()} ..."))
    console.print(f"serving [bold]{cfg.name}[/] at {url}  (API docs: {url}/docs)", highlight=False)
    if cfg.auth.required:
        console.print(f"API keys: {cfg.auth.api_keys_file}", highlight=False)
    example = cfg.default_model or next(iter(cfg.base_models), "NAME")
    console.print(f'try: atelier generate "a photo" --model {example} --url {url} --out images/',
                  highlight=False)
    typer.echo(url)


@app.command("config")
def config_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    gpu: str | None = typer.Option(None, help=GPU_HELP),
    out: Path | None = typer.Option(None, "--out", "-o", help="File to write. Default: stdout."),
) -> None:
    """Write the serveConfigV2 of a KubeRay RayService, from the same ServeConfig `serve up` uses."""
    from atelier.endpoint.rayservice import rayservice_yaml

    text = rayservice_yaml(_config(config, gpu=gpu), get_settings())
    if out is None:
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    console.print(f"wrote {out}", highlight=False)


@app.command()
def down() -> None:
    """Stop serving: delete every Serve application on the cluster (the stack keeps running)."""
    from atelier.endpoint.deploy import ServeCluster

    with console.status("stopping Serve ..."):
        ServeCluster(get_settings()).delete()
    console.print("Serve stopped")


@app.command()
def status(
    kube: bool = typer.Option(False, "--kube", help="Read the chart's RayService instead."),
    namespace: str = typer.Option("default", help="With --kube: the namespace."),
    name: str = typer.Option("atelier", help="With --kube: the RayService (the chart names it "
                             "after the release)."),
) -> None:
    """Applications, deployments and replica counts on the cluster."""
    from collections import Counter

    from atelier.endpoint.deploy import ServeCluster

    if kube:
        from atelier.kube import rayservice_status

        found = rayservice_status(get_settings(), name, namespace)
        state = "[green]ready[/]" if found["ready"] else f"[yellow]not ready[/] ({found['reason']})"
        console.print(f"RayService {namespace}/{name}: {state}, cluster {found['cluster'] or '-'}, "
                      f"{found['endpoints']} Serve endpoints", highlight=False)
        if found["upgrading_to"]:
            console.print(f"upgrading to the cluster {found['upgrading_to']}", highlight=False)
        table = Table("application", "status", "deployment", "deployment status")
        for row in found["applications"]:
            table.add_row(*(value or "-" for value in row))
        console.print(table)
        return
    details = ServeCluster(get_settings()).details()
    apps = details.get("applications") or {}
    if not apps:
        console.print("nothing is being served")
        return
    table = Table("application", "status", "deployment", "deployment status", "replicas")
    for name, application in sorted(apps.items()):
        for dep_name, dep in sorted((application.get("deployments") or {}).items()):
            counts = Counter(r["state"] for r in dep.get("replicas") or [])
            table.add_row(name, application.get("status", "?"), dep_name, dep.get("status", "?"),
                          ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "0")
    console.print(table)


def generate(
    prompt: str = typer.Argument(..., help="What the images show."),
    model: str | None = typer.Option(None, "--model", "-m", help='"name", "name:version" or a base name.'),
    n: int = typer.Option(1, "-n", help="Number of images."),
    out: Path = typer.Option(Path("images"), "--out", "-o", help="Folder for the PNGs."),
    url: str = typer.Option(None, help="API address. Default: $ATELIER_SERVE_URL or http://127.0.0.1:8000."),
    api_key_file: Path | None = typer.Option(
        None, help="File with the API key. Default: $ATELIER_API_KEY, else the local deployment's."),
    steps: int | None = typer.Option(None, help="Denoising steps."),
    seed: int | None = typer.Option(None, help="Seed of the first image."),
    width: int | None = typer.Option(None, help="Width in pixels."),
    height: int | None = typer.Option(None, help="Height in pixels."),
    scheduler: str | None = typer.Option(None, help="ddpm, ddim, pndm, lms, euler, euler_a or dpm++."),
    guidance_scale: float | None = typer.Option(None, help="Classifier-free guidance scale."),
    negative_prompt: str | None = typer.Option(None, help="What the images should not show."),
) -> None:
    """Generate images over the HTTP API and save them as PNGs."""
    from atelier import config_file
    from atelier.endpoint.api import GenerationRequest
    from atelier.endpoint.client import DEFAULT_URL, Client, save_images
    from atelier.endpoint.keys import find_api_key

    fields = dict(prompt=prompt, model=model, n=n, steps=steps, seed=seed, width=width, height=height,
                  scheduler=scheduler, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
    request = config_file.validate(GenerationRequest, {k: v for k, v in fields.items() if v is not None})
    url = url or os.environ.get("ATELIER_SERVE_URL") or DEFAULT_URL
    client = Client(url, find_api_key(api_key_file, get_settings()))
    with console.status(f"generating {n} image{'s' if n != 1 else ''} ..."):
        response = client.generate(request)
    for path in save_images(response, out):
        typer.echo(str(path))
    console.print(f"{response.model}, {response.width}x{response.height}, {response.steps} steps, "
                  f"{response.scheduler}", highlight=False, style="dim")
