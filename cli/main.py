"""The ``squeeze`` command line: thin click commands over the Python API.

User mistakes (:class:`squeeze.SqueezeError`) print one line and exit with code 2.
"""

from __future__ import annotations

import sys

import click

from squeeze.cli.helptext import MethodName, MethodOption, examples
from squeeze.errors import SqueezeError
from squeeze.report import print_json, write_json


def _parse_sets(values) -> dict:
    """--set KEY=VALUE (repeatable): extra pass settings; VALUE is read as YAML (numbers, bools)."""
    from squeeze.recipe import yaml_load

    out = {}
    for item in values or ():
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise SqueezeError(f"bad --set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = yaml_load(val)
    return out


def _group_size(_ctx, _param, value):
    """--group-size N (a whole number) or "channel" (one scale per output row)."""
    if value is None or value == "channel":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a whole number of input columns nor 'channel'") from None


# True when this process is the `squeeze` program itself (main() reading sys.argv), not a caller
# running commands in-process (tests, notebooks), whose later code may still want Triton
_PROGRAM = False


def _seconds_since_start() -> float:
    import time

    import psutil

    return time.time() - psutil.Process().create_time()


def _quiet_transformers():
    if _PROGRAM:
        from squeeze.lean import skip_unusable_triton

        skip_unusable_triton()
    from squeeze import when_transformers_loads

    when_transformers_loads(_quiet)


def _quiet():
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


# Every command's one-line summary (the first docstring line) fits the "Commands" list of an
# 80-column terminal, where click would cut a longer one with "..." (tests/test_cli_help.py).
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_versions,
              help="Show the versions of squeeze, torch and transformers and exit.")
def cli():
    """squeeze: make transformer checkpoints smaller and faster.

    Run `squeeze COMMAND --help` for a command's options, methods and examples.
    """


@cli.command(epilog=examples("compress"))
@click.argument("model_dir", required=False)
@click.option("--out", "out", type=click.Path(), help="Output folder (written atomically).")
@click.option("--method", cls=MethodOption, type=MethodName("--method"),
              help="The method to run: {names} (several in one sweep: --recipe). Quantization is "
                   "--quantize, mask repair --repair, LayerSkip `squeeze finetune`. Default for the embedded "
                   "model: the quick-2:4 recipe (SparseGPT 2:4).")
@click.option("--pattern", help="N:M semi-structured pattern, e.g. 2:4 or 4:8.")
@click.option("--sparsity", type=float, help="Unstructured sparsity in (0, 1), e.g. 0.5.")
@click.option("--recipe", help="A shipped recipe's name (e.g. best-2:4; `squeeze recipes` lists them) or a YAML/JSON "
              "file: an ordered list of {pass: NAME, ...}, or a mapping with passes: and recover:.")
@click.option("--calib", default="builtin", show_default=True,
              help="builtin, a .txt/.jsonl/.parquet file, a saved datasets folder or a datasets name.")
@click.option("--nsamples", type=int, help="Calibration sequences [default: 128; 64 for the embedded model].")
@click.option("--seqlen", type=int, help="Tokens per calibration sequence [default: 512, or the model's "
              "context if shorter; 128 for the embedded model].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the calibration windows (--packing concat) and the --calib-generate sampling.")
@click.option("--packing", type=click.Choice(["auto", "rows", "concat"]), default="auto", show_default=True,
              help="How --calib becomes --nsamples x --seqlen tokens: rows (the start of each row long "
                   "enough, in file order), concat (random windows of all rows joined), auto (rows when enough "
                   "rows are long enough).")
@click.option("--targets", help="Regex over linear names to compress (default: every linear in the blocks).")
@click.option("--ignore", help="Regex over linear names to leave alone.")
@click.option("--dtype", default="auto", show_default=True, help="Export dtype: auto (as the source; bfloat16 "
              "for the embedded model), float32, float16, bfloat16 (or fp32, fp16, bf16). Calibration math runs "
              "in float32.")
@click.option("--strict", is_flag=True, help="Error when a linear's input dim is not a multiple of M.")
@click.option("--repair", cls=MethodOption, type=MethodName("--repair"), help="Repair the --method's "
              "pruning mask afterwards, training-free, keeping its sparsity / N:M pattern: {names} (DSnoT).")
@click.option("--sparsity-profile", type=click.Choice(["uniform", "owl"]), help="Unstructured --sparsity per layer: "
              "uniform (default) or owl (layers with more activation outliers keep more weights, same total).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Extra pass setting (repeatable).")
@click.option("--layers", help="pyramiddrop / mustdrop: language-model layers where image tokens are dropped, "
              "e.g. 8,16,24.")
@click.option("--ratios", help="pyramiddrop: keep ratio of the image tokens at each of --layers, e.g. "
              "0.5,0.25,0.125.")
@click.option("--act-sparsity", type=float, help="Activation sparsity target for teal / wina [default: 0.5].")
@click.option("--allocation", type=click.Choice(["uniform", "greedy"]), help="Per-site activation sparsity "
              "allocation for teal / wina [default: uniform].")
@click.option("--recover-steps", type=int, help="drelu: distillation steps after the conversion [default: 0, "
              "none].")
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
@click.option("--resume", is_flag=True, help="Continue an interrupted run (same settings and thread count) from the "
              "last block it finished, kept in .OUT.compress-work next to --out; the export is byte-identical.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
@click.option("--details", is_flag=True, help="Report every linear, not one row per layer.")
@click.option("--verify/--no-verify", default=None,
              help="Reload the export and check that it reproduces the compressed model in memory [default: on "
                   "for the embedded model]; quality against the source is --eval-data.")
@click.option("--eval-data", default="auto", show_default=True, metavar="SRC|auto|none",
              help="Held-out data to score the export against the source on (same forms as --calib); auto: the "
                   "built-in held-out text when the model has a tokenizer; none: skip.")
@click.option("--eval-rows", type=int, help="Score on the first N rows of --eval-data [default: the first rows up to "
              "32768 tokens].")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the checkpoint (off by default).")
@click.option("--calib-generate", type=int, default=0, metavar="K",
              help="RAC: the dense model continues each calibration sample by K tokens; calibrate on both.")
@click.option("--calib-generate-mode", type=click.Choice(["sample", "greedy"]), default="sample",
              show_default=True, help="RAC: sample the continuations (seeded by --seed) or take the most likely token.")
@click.option("--calib-generate-temperature", type=float, default=1.0, show_default=True,
              help="RAC sampling temperature.")
@click.option("--calib-generate-top-p", type=float, default=1.0, show_default=True,
              help="RAC sampling: draw from the most likely tokens holding this much probability.")
@click.option("--nproc", type=int, default=None, metavar="N",
              help="Calibrate in N processes (torch.distributed, launched as torchrun does), each on its share of "
                   "the calibration samples; rank 0 writes. Same masks as one process (README: Distributed "
                   "calibration).")
def compress(model_dir, out, method, pattern, sparsity, recipe, calib, nsamples, seqlen, seed, packing, targets,
             ignore, dtype, strict, sets, fmt, overwrite, resume, json_path, details, verify, eval_data, eval_rows,
             trust_remote_code, nproc, **generate):
    """Prune, quantize or sparsify a checkpoint into a new export.

    Compress MODEL_DIR (default: the embedded all-MiniLM-L6-v2, written to squeezed/ when --out is
    not given) block by block with --method or --recipe, calibrated on --calib, and export it to
    --out.
    """
    from squeeze import distributed

    if nproc is not None and nproc > 1 and not distributed.launched():
        sys.exit(distributed.launch(nproc, _without_nproc(_ARGV)))
    distributed.init_from_env()  # a no-op unless torchrun started this process
    _JOINED.append(distributed)
    from squeeze.cli.report import print_compress_report
    from squeeze.memory import LARGE_MODEL_BYTES, unmap_freed_tensors, weight_bytes

    if model_dir is not None and weight_bytes(model_dir) >= LARGE_MODEL_BYTES:
        unmap_freed_tensors()  # before torch allocates anything (squeeze.memory)
    from squeeze.compressor import compress as compress_fn

    _quiet_transformers()
    if model_dir is None and out is None:
        from pathlib import Path

        what = Path(recipe).stem.replace(":", "of").replace("%", "pct") if recipe else None
        out = "squeezed/all-MiniLM-L6-v2-" + (what or (method or "sparsegpt") + "-" + (
            pattern.replace(":", "of") if pattern else (f"{sparsity:g}" if sparsity else "2of4")))

        Path(out).parent.mkdir(exist_ok=True)
    kwargs = dict(method=method, pattern=pattern, sparsity=sparsity, recipe=recipe, calib=calib,
                  nsamples=nsamples, seqlen=seqlen, seed=seed, packing=packing, targets=targets, ignore=ignore,
                  dtype=dtype, strict=strict, overwrite=overwrite, format=fmt, json_path=None,
                  eval_data=eval_data, eval_rows=eval_rows, trust_remote_code=trust_remote_code, **generate)
    for key, value in _parse_sets(sets).items():  # --set KEY=VALUE: a pass setting, or a flag's own value
        if kwargs.get(key) not in (None, False) and kwargs[key] != value:
            raise SqueezeError(f"--set {key}={value} and --{key.replace('_', '-')} {kwargs[key]} disagree: give it once")
        kwargs[key] = value
    if resume:  # a --set resume=FOLDER is dReLU recovery's own folder (such runs keep no sweep work folder)
        kwargs["resume"] = kwargs["resume"] if isinstance(kwargs.get("resume"), str) else True
    verify = verify if verify is not None else model_dir is None
    # without --verify nothing needs the compressed model afterwards: stream the blocks (less memory)
    kwargs.setdefault("keep_in_memory", None if verify else False)
    startup = _seconds_since_start()  # the interpreter, click and squeeze's imports, before any work
    try:
        result = compress_fn(model_dir, out, **kwargs)
    except KeyboardInterrupt as e:
        where = getattr(e, "resumable", None)
        if where is None:
            raise
        click.echo(f"interrupted; --out was not written. The finished blocks are in {where}: re-run with "
                   "--resume to continue", err=True)
        raise SystemExit(130) from None
    if not distributed.is_writer():  # rank 0 verifies, writes the JSON and prints the report
        return
    report = result.report
    if "seconds_by_phase" in report:
        report["seconds_by_phase"] = {"startup": round(startup, 3), **report["seconds_by_phase"]}
    if verify:
        from squeeze.cli.report import verify_export

        report["verify"] = verify_export(result)
    if json_path:
        write_json(json_path, report)
    print_compress_report(report, details)


@cli.command("eval", epilog=examples("eval"))
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
    """Measure quality: perplexity, KL to a reference, or cosine.

    Perplexity of MODEL_DIR on --data (causal LMs), KL of its next-token distribution to
    --reference's, or the cosine of its embeddings to --reference's (encoders).
    """
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


@cli.command(epilog=examples("info"))
@click.argument("model_dir")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--threads", type=int, help="torch threads the run-time plan is made for [default: torch's].")
def info(model_dir, as_json, threads):
    """Show a checkpoint's sparsity, sizes and what squeeze did.

    Per-linear sparsity and pattern validity, file sizes, and the squeeze.json record (passes,
    settings, versions) of MODEL_DIR; for run-times with a sparse and a dense path (TEAL/WINA,
    dReLU, 2:4 on CPU), which one squeeze.load picks on this machine and the measured speed-up.
    """
    from squeeze.inspection import info as info_fn

    _quiet_transformers()
    if threads is not None:
        if threads < 1:
            raise SqueezeError(f"--threads must be >= 1; got {threads}")
        import torch

        torch.set_num_threads(threads)
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
    cmd_recipes,  # noqa: F401  (registers `squeeze recipes`)
    cmd_bench,  # noqa: F401  (registers `squeeze bench`)
)


_ARGV: list[str] = []  # this command line, for --nproc to hand to the workers
_JOINED: list = []  # squeeze.distributed, once a command may have joined a process group


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise); known before any process group exists."""
    import os

    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def main(argv=None):
    """The `squeeze` program (``argv=None``: the command line), or one command run in-process."""
    if argv is not None:  # in-process callers (tests, notebooks) keep their interpreter
        return _run(argv)
    try:
        _run(None)
        code = 0
    except SystemExit as e:
        code = e.code
    _leave(code)


def _leave(code) -> None:
    """End the program without tearing the interpreter down: finalizing the thousands of modules
    torch and transformers import takes about 1.2 s here, after the work is done. What exit would
    still do that matters runs first: atexit handlers (weakref finalizers among them) and the
    streams' buffers."""
    import atexit
    import os

    if isinstance(code, str):  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    getattr(atexit, "_run_exitfuncs", lambda: None)()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else int(code))


def _run(argv):
    import os

    from squeeze.cli.progress import command_sink

    global _ARGV, _PROGRAM
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    _PROGRAM = argv is None
    if _PROGRAM:
        from squeeze.lean import skip_scipy

        skip_scipy()
    if _rank() > 0:  # one voice: rank 0 shows the progress, the report and the error line
        os.environ["SQUEEZE_PROGRESS"] = "off"
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _ARGV[:1] != ["compress"]:
            # every rank would write the same output: only compress knows how to share the work
            raise SqueezeError(f"only `squeeze compress` runs in several processes (torchrun / --nproc); run "
                               f"`squeeze {' '.join(_ARGV[:1])}` in one process")
        # the sink's context closes first, so its display is gone before an error line is printed
        with command_sink():
            cli.main(args=argv, standalone_mode=False)
    except SqueezeError as e:
        if _rank() == 0:
            click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        if _rank() == 0:
            e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    finally:
        if _JOINED:  # leave the process group cleanly (torch warns at exit otherwise)
            _JOINED[0].shutdown()


if __name__ == "__main__":
    main()
