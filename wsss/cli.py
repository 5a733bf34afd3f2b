"""The `wsss` command line: a thin Typer shell over the library API."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from wsss.config import load_config
from wsss.errors import WsssError

app = typer.Typer(
    help="wsss: end-to-end weakly-supervised semantic segmentation (AFA + PAR).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    name: str = typer.Argument(..., help="voc | coco | custom | demo, or a path to a YAML file"),
    overrides: Optional[List[str]] = typer.Argument(None, help="section.key=value overrides"),
) -> None:
    """Print the resolved configuration as YAML."""
    typer.echo(load_config(name, overrides or []).to_yaml(), nl=False)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except WsssError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
