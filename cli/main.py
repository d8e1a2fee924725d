"""The ``squeeze`` command line: thin click commands over the Python API.

User mistakes (:class:`squeeze.SqueezeError`) print one line and exit with code 2.
"""

from __future__ import annotations

import json
import sys

import click

from squeeze.errors import SqueezeError


def _parse_sets(values) -> dict:
    """--set KEY=VALUE (repeatable): extra pass settings; VALUE is read as YAML (numbers, bools)."""
    import yaml

    out = {}
    for item in values or ():
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise SqueezeError(f"bad --set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = yaml.safe_load(val)
    return out


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="squeeze")
def cli():
    """squeeze: make transformer checkpoints smaller and faster."""


@cli.command()
@click.argument("model_dir", required=False)
@click.option("--out", "out", type=click.Path(), help="Output folder (written atomically).")
@click.option("--method", help="Pass to run (magnitude, wanda, ...). Default for the embedded model: wanda 2:4.")
@click.option("--pattern", help="N:M semi-structured pattern, e.g. 2:4 or 4:8.")
@click.option("--sparsity", type=float, help="Unstructured sparsity in (0, 1), e.g. 0.5.")
@click.option("--recipe", type=click.Path(), help="YAML/JSON recipe: an ordered list of {pass: NAME, ...}.")
@click.option("--calib", default="builtin", show_default=True,
              help="builtin, a .txt/.jsonl/.parquet file, a saved datasets folder or a datasets name.")
@click.option("--nsamples", type=int, help="Calibration sequences [default: 128; 64 for the embedded model].")
@click.option("--seqlen", type=int, help="Tokens per calibration sequence [default: 512; 128 embedded].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--packing", type=click.Choice(["auto", "rows", "concat"]), default="auto", show_default=True)
@click.option("--targets", help="Regex over linear names to compress (default: every linear in the blocks).")
@click.option("--ignore", help="Regex over linear names to leave alone.")
@click.option("--dtype", default="auto", show_default=True, help="Export dtype: auto (as source), float32, "
              "float16, bfloat16.")
@click.option("--strict", is_flag=True, help="Error when a linear's input dim is not a multiple of M.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Extra pass setting (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
@click.option("--verify/--no-verify", default=None,
              help="Reload the export and compare with the source on held-out data [default: on for the "
                   "embedded model].")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the checkpoint (off by default).")
def compress(model_dir, out, method, pattern, sparsity, recipe, calib, nsamples, seqlen, seed, packing, targets,
             ignore, dtype, strict, sets, overwrite, json_path, verify, trust_remote_code):
    """Compress MODEL_DIR (default: the embedded all-MiniLM-L6-v2) and export it to --out."""
    from squeeze.cli.report import print_compress_report, run_with_progress

    _quiet_transformers()
    if model_dir is None and out is None:
        out = "squeezed/all-MiniLM-L6-v2-" + (method or "wanda") + "-" + (
            pattern.replace(":", "of") if pattern else (f"{sparsity:g}" if sparsity else "2of4"))
        from pathlib import Path

        Path(out).parent.mkdir(exist_ok=True)
    kwargs = dict(method=method, pattern=pattern, sparsity=sparsity, recipe=recipe, calib=calib,
                  nsamples=nsamples, seqlen=seqlen, seed=seed, packing=packing, targets=targets, ignore=ignore,
                  dtype=dtype, strict=strict, overwrite=overwrite, json_path=None,
                  trust_remote_code=trust_remote_code, **_parse_sets(sets))
    result = run_with_progress(model_dir, out, kwargs)
    report = result.report
    if verify if verify is not None else model_dir is None:
        from squeeze.cli.report import verify_export

        report["verify"] = verify_export(result, model_dir)
    if json_path:
        from pathlib import Path

        Path(json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_compress_report(report)


@cli.command("eval")
@click.argument("model_dir")
@click.option("--data", default="builtin-eval", show_default=True, help="Evaluation data (same forms as --calib).")
@click.option("--reference", type=click.Path(), help="Dense model to compare with (KL / embedding cosine).")
@click.option("--max-rows", type=int, help="Use only the first N rows.")
@click.option("--seqlen", type=int, help="Truncate rows to this many tokens [default: the model's context].")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
def eval_cmd(model_dir, data, reference, max_rows, seqlen, json_path):
    """Perplexity (causal LMs), KL to --reference, embedding cosine (encoders)."""
    from squeeze.evaluate import evaluate

    _quiet_transformers()
    report = evaluate(model_dir, data, reference=reference, max_rows=max_rows, seqlen=seqlen, json_path=json_path)
    from squeeze.cli.report import print_kv

    print_kv("eval", report)


@cli.command()
@click.argument("model_dir")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(model_dir, as_json):
    """Per-linear sparsity and pattern validity, sizes, and what squeeze did."""
    from squeeze.info import info as info_fn

    _quiet_transformers()
    report = info_fn(model_dir)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        from squeeze.cli.report import print_info

        print_info(report)


def main(argv=None):
    try:
        cli.main(args=argv, standalone_mode=False)
    except SqueezeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
