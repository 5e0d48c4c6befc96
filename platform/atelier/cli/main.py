"""Entry point of the `atelier` command. Sub-command groups live in sibling modules."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from atelier.errors import AtelierError

app = typer.Typer(
    name="atelier",
    help="DreamBooth fine-tuning and Stable Diffusion serving on Ray, with models in S3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)


def _register() -> None:
    # Imported here so that `atelier --help` stays fast and each group owns its module.
    from atelier.cli import catalogue, demo, models, schema, stack, train

    stack.register(app)
    app.add_typer(catalogue.app, name="catalogue")
    app.add_typer(models.app, name="models")
    app.add_typer(train.app, name="train")
    demo.register(app)
    schema.register(app)
    from atelier.cli import serve

    serve.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; an AtelierError becomes one line on stderr and its exit code."""
    _register()
    try:
        result = app(args=argv, standalone_mode=False)
    except AtelierError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as e:  # click's usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Exit):
            return e.exit_code
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
