"""The ``squeeze`` command line: thin click commands over the Python API.

User mistakes (:class:`squeeze.SqueezeError`) print one line and exit with code 2.
"""

from __future__ import annotations

import sys

import click

from squeeze.errors import SqueezeError
from squeeze.report import print_json, write_json


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


def _group_size(_ctx, _param, value):
    """--group-size N (a whole number) or "channel" (one scale per output row)."""
    if value is None or value == "channel":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a whole number of input columns nor 'channel'") from None


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _print_versions(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    from squeeze.versions import versions

    v = versions()
    click.echo(f"squeeze {v['squeeze_version']} (torch {v['torch']}, transformers {v['transformers']})")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_versions,
              help="Show the versions of squeeze, torch and transformers and exit.")
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
@click.option("--repair", type=click.Choice(["dsnot"]), help="Repair the pruning mask afterwards (DSnoT, training-free; "
              "keeps the sparsity / N:M pattern).")
@click.option("--sparsity-profile", type=click.Choice(["uniform", "owl"]), help="Unstructured --sparsity per layer: "
              "uniform (default) or owl (layers with more activation outliers keep more weights, same total).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Extra pass setting (repeatable).")
@click.option("--layers", help="pyramiddrop / mustdrop: language-model layers where image tokens are dropped, "
              "e.g. 8,16,24.")
@click.option("--ratios", help="pyramiddrop: keep ratio of the image tokens at each of --layers, e.g. "
              "0.5,0.25,0.125.")
@click.option("--act-sparsity", type=float, help="Activation sparsity target for teal / wina, e.g. 0.5.")
@click.option("--allocation", type=click.Choice(["uniform", "greedy"]), help="Per-site activation sparsity "
              "allocation for teal / wina [default: uniform].")
@click.option("--recover-steps", type=int, help="Distillation steps after the drelu conversion.")
@click.option("--quantize", type=click.Choice(["int8", "int4", "fp8"]), help="Also quantize the weights (after the "
              "method, in the same sweep; pruned zeros stay exact), e.g. --method sparsegpt --pattern 2:4 "
              "--quantize int4.")
@click.option("--group-size", callback=_group_size, metavar="N|channel", help="--quantize: input columns per scale, "
              "or channel (one per output row) [default: 128 for int4, channel for int8/fp8]; any dimension works "
              "(a partial last group; --format compressed-tensors needs N to divide it).")
@click.option("--asymmetric", is_flag=True, help="--quantize int8/int4 with zero points (default: symmetric).")
@click.option("--quant-solver", type=click.Choice(["obs", "rtn"]), help="--quantize: obs = GPTQ error compensation "
              "on calibration data, rtn = round to nearest [default: obs].")
@click.option("--quant-actorder", type=click.Choice(["static", "none"]), help="--quantize with obs: the column "
              "order of the sweep, static = GPTQ's act-order (decreasing calibrated input energy), none = left to "
              "right [default: static].")
@click.option("--quant-observer", type=click.Choice(["minmax", "mse"]), help="--quantize: how each group's scale is "
              "chosen, minmax = the whole range, mse = the clipping that minimises the rounding error [default: "
              "mse, but minmax for --asymmetric and for int8/fp8 with rtn].")
@click.option("--format", "fmt", type=click.Choice(["auto", "dense", "compressed", "compressed-tensors"]), default="auto",
              show_default=True,
              help="auto: store what the passes promise compactly (2:4 as values + 2-bit positions, other sparsity "
                   "as values + bitmask when smaller, quantized weights as codes + scales; loaded by squeeze.load "
                   "or, after `import squeeze`, transformers' auto classes), else a plain checkpoint; dense: zeros "
                   "and dequantized values in plain safetensors that any engine loads; compressed: like auto, an "
                   "error when there is nothing to pack; compressed-tensors: the layout transformers + "
                   "compressed-tensors loads without squeeze and vLLM serves (quantized codes, zeros in place).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
@click.option("--details", is_flag=True, help="Report every linear, not one row per layer.")
@click.option("--verify/--no-verify", default=None,
              help="Reload the export and compare with the source on held-out data [default: on for the "
                   "embedded model].")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the checkpoint (off by default).")
@click.option("--calib-generate", type=int, default=0, metavar="K",
              help="RAC: the dense model continues each calibration sample by K tokens; calibrate on both.")
@click.option("--calib-generate-mode", type=click.Choice(["sample", "greedy"]), default="sample", show_default=True)
@click.option("--calib-generate-temperature", type=float, default=1.0, show_default=True)
@click.option("--calib-generate-top-p", type=float, default=1.0, show_default=True)
def compress(model_dir, out, method, pattern, sparsity, recipe, calib, nsamples, seqlen, seed, packing, targets,
             ignore, dtype, strict, sets, fmt, overwrite, json_path, details, verify, trust_remote_code, **generate):
    """Compress MODEL_DIR (default: the embedded all-MiniLM-L6-v2) and export it to --out."""
    from squeeze.cli.report import print_compress_report
    from squeeze.compressor import compress as compress_fn

    _quiet_transformers()
    if model_dir is None and out is None:
        out = "squeezed/all-MiniLM-L6-v2-" + (method or "wanda") + "-" + (
            pattern.replace(":", "of") if pattern else (f"{sparsity:g}" if sparsity else "2of4"))
        from pathlib import Path

        Path(out).parent.mkdir(exist_ok=True)
    kwargs = dict(method=method, pattern=pattern, sparsity=sparsity, recipe=recipe, calib=calib,
                  nsamples=nsamples, seqlen=seqlen, seed=seed, packing=packing, targets=targets, ignore=ignore,
                  dtype=dtype, strict=strict, overwrite=overwrite, format=fmt, json_path=None,
                  trust_remote_code=trust_remote_code, **generate, **_parse_sets(sets))
    verify = verify if verify is not None else model_dir is None
    # without --verify nothing needs the compressed model afterwards: stream the blocks (less memory)
    kwargs.setdefault("keep_in_memory", None if verify else False)
    result = compress_fn(model_dir, out, **kwargs)
    report = result.report
    if verify:
        from squeeze.cli.report import verify_export

        report["verify"] = verify_export(result)
    if json_path:
        write_json(json_path, report)
    print_compress_report(report, details)


@cli.command("eval")
@click.argument("model_dir")
@click.option("--data", default="builtin-eval", show_default=True, help="Evaluation data (same forms as --calib).")
@click.option("--reference", type=click.Path(), help="Dense model to compare with (KL / embedding cosine).")
@click.option("--max-rows", type=int, help="Use only the first N rows.")
@click.option("--seqlen", type=int, help="Truncate rows to this many tokens [default: the model's context].")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
@click.option("--flops", is_flag=True, help="LLaVA-family: prefill (per stage) and decode-step FLOPs with the "
              "recorded vision-token dropping vs none, on a synthetic prompt (quality is skipped unless --data "
              "or --reference is given).")
@click.option("--flops-text-tokens", type=int, default=64, show_default=True, help="Text tokens of that prompt.")
@click.option("--activation-stats", is_flag=True, help="Token- and chunk-level sparsity (TLS, CLS for chunks "
              "1..64) of the MLP intermediate, per layer (inactive = zero input of down_proj).")
@click.option("--act-threshold", type=float, default=0.0, show_default=True,
              help="With --activation-stats: count |x| <= this as inactive (for dense SwiGLU models).")
def eval_cmd(model_dir, data, reference, max_rows, seqlen, json_path, flops, flops_text_tokens, activation_stats,
             act_threshold):
    """Perplexity (causal LMs), KL to --reference, embedding cosine (encoders)."""
    from squeeze.evaluation import evaluate

    _quiet_transformers()
    data_given = click.get_current_context().get_parameter_source("data") != click.core.ParameterSource.DEFAULT
    report = {}
    if not flops or data_given or reference:
        report = evaluate(model_dir, data, reference=reference, max_rows=max_rows, seqlen=seqlen,
                          json_path=None if flops else json_path, activation_stats=activation_stats,
                          act_threshold=act_threshold)
    if flops:
        from squeeze.vision.flops import flops_summary

        report.update(flops_summary(model_dir, flops_text_tokens))
        if json_path:
            write_json(json_path, report)
    from squeeze.cli.report import print_kv

    stats = report.pop("activation_stats", None)
    print_kv("eval", report)
    if stats:
        from squeeze.act_stats import format_table

        click.echo(format_table(stats))


@cli.command()
@click.argument("model_dir")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(model_dir, as_json):
    """Per-linear sparsity and pattern validity, sizes, and what squeeze did."""
    from squeeze.inspection import info as info_fn

    _quiet_transformers()
    report = info_fn(model_dir)
    if as_json:
        print_json(report)
    else:
        from squeeze.cli.report import print_info

        print_info(report)


from squeeze.cli import (
    cmd_depth,  # noqa: F401  (registers finetune, tune-exit, drop-layers, generate)
    cmd_convert,  # noqa: F401  (registers `squeeze convert`)
    cmd_recover,  # noqa: F401  (registers `squeeze recover`)
)


def main(argv=None):
    from squeeze.cli.progress import command_sink

    try:
        # the sink's context closes first, so its display is gone before an error line is printed
        with command_sink():
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
