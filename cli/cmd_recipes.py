"""``squeeze recipes``: the shipped recipes, what each does and the figure it reached here."""

from __future__ import annotations

import click
from squeeze.cli.helptext import examples
from squeeze.cli.main import cli


@cli.command(epilog=examples("recipes"))
@click.option("--show", metavar="NAME", help="Print the recipe file(s) of NAME.")
def recipes(show):
    """List the shipped recipes and the figure each reached.

    Select one with `squeeze compress MODEL_DIR --recipe NAME`; a name may have a decoder and an
    encoder variant, and the model picks. Each figure is the latest bench run of the recipe's
    command (bench/README.md, 3b).
    """
    from rich.console import Console
    from rich.table import Table

    from squeeze.errors import SqueezeError
    from squeeze.recipe import reached, shipped_recipes

    all_recipes = shipped_recipes()
    if show:
        picked = [r for r in all_recipes if r.name == show]
        if not picked:
            raise SqueezeError(f"no shipped recipe {show!r}: the shipped ones are "
                               f"{', '.join(sorted({r.name for r in all_recipes}))}")
        for r in picked:
            click.echo(f"# {r.path.name}\n{r.path.read_text()}")
        return
    t = Table(title="shipped recipes (squeeze compress MODEL_DIR --recipe NAME)")
    for col in ("name", "for", "what it does", "reaches"):
        t.add_column(col, overflow="fold")
    for r in all_recipes:
        t.add_row(r.name, r.kind or "any", r.summary, reached(r))
    Console().print(t)
