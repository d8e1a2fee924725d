"""``squeeze convert``: rewrite a compact squeeze export in another layout (compressed-tensors)."""

from __future__ import annotations

import click
from squeeze.cli.helptext import examples
from squeeze.cli.main import _quiet_transformers, cli

from squeeze.report import write_json


@cli.command(epilog=examples("convert"))
@click.argument("src")
@click.option("--out", "out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--format", "fmt", type=click.Choice(["compressed-tensors"]), default="compressed-tensors",
              show_default=True, help="compressed-tensors: the layout transformers + compressed-tensors loads "
              "without squeeze and vLLM serves; the same codes and scales as SRC.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
def convert(src, out, fmt, overwrite, json_path):
    """Rewrite an export in the compressed-tensors layout (vLLM).

    Rewrite SRC, a squeeze export compressed with --format auto or compressed (or a sparse dense
    one), in --format's layout, without quantizing again.
    """
    from squeeze.cli.report import print_kv
    from squeeze.export_ct import convert as convert_fn

    _quiet_transformers()
    report = convert_fn(src, out, format=fmt, overwrite=overwrite)
    if json_path:
        write_json(json_path, report)
    print_kv(f"squeeze convert -> {report['out']}", report)  # with the size and loads-with lines
