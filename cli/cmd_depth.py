"""Depth commands: ``finetune --recipe layerskip``, ``tune-exit``, ``drop-layers``, ``generate``."""

from __future__ import annotations

import click
from squeeze.cli.helptext import examples
from squeeze.cli.main import _quiet_transformers, cli

from squeeze.errors import SqueezeError
from squeeze.report import write_json


@cli.command(epilog=examples("finetune"))
@click.argument("model_dir")
@click.option("--recipe", type=click.Choice(["layerskip"]), required=True,
              help="Training recipe: layerskip (layer dropout + early-exit loss, Elhoushi et al. 2024).")
@click.option("--calib", default="builtin", show_default=True, help="Training data (same forms as compress --calib).")
@click.option("--out", "out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--steps", type=int, default=100, show_default=True, help="Optimizer steps.")
@click.option("--p-max", type=float, default=0.2, show_default=True, help="Layer-dropout rate of the last layer.")
@click.option("--e-scale", type=float, default=1.0, show_default=True, help="Weight of the non-final exit losses.")
@click.option("--scale", type=click.Choice(["sum_l", "linear_l"]), default="sum_l", show_default=True,
              help="Early-exit loss scales across layers.")
@click.option("--curriculum", type=click.Choice(["none", "gradual", "rotational"]), default="none",
              show_default=True, help="Which exits are trained when.")
@click.option("--distill-from", type=click.Path(), help="Also match this model's next-token distribution at each exit.")
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Learning rate.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per step.")
@click.option("--seqlen", type=int, default=256, show_default=True, help="Tokens per training sequence.")
@click.option("--nsamples", type=int, default=256, show_default=True, help="Training sequences drawn from --calib.")
@click.option("--save-every", type=int, default=50, show_default=True,
              help="Save a resumable state every M steps (next to --out).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the batches and layer-dropout masks.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its saved state.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
def finetune(model_dir, recipe, calib, out, steps, p_max, e_scale, scale, curriculum, distill_from, lr, batch_size,
             seqlen, nsamples, save_every, seed, resume, overwrite, json_path):
    """Train LayerSkip early exits for self-speculative decoding.

    Continue training MODEL_DIR with the LayerSkip recipe (layer dropout + early-exit loss), so
    its first layers can draft tokens that the rest verify (`squeeze generate --self-speculative`).
    """
    from squeeze.cli.report import print_kv

    from squeeze.depth.layerskip import finetune as finetune_fn
    from squeeze.depth.layerskip import state_dir
    from squeeze.train.state import has_state

    _quiet_transformers()
    try:
        report = finetune_fn(model_dir, out, calib=calib, distill_from=distill_from, resume=resume,
                             overwrite=overwrite, steps=steps, p_max=p_max, e_scale=e_scale,
                             scale=scale, curriculum=curriculum, lr=lr, batch_size=batch_size, seqlen=seqlen,
                             nsamples=nsamples, save_every=save_every, seed=seed)
    except KeyboardInterrupt:  # as recover: say where the saved state is and how to go on from it
        sdir = state_dir(out)
        if has_state(sdir):
            click.echo(f"interrupted; --out was not written. The state saved every {save_every} steps is in {sdir}: "
                       "re-run the same command with --resume to continue", err=True)
        else:
            click.echo(f"interrupted before the first saved state (every {save_every} steps); --out was not "
                       "written: re-run the command to start again (a lower --save-every saves sooner)", err=True)
        raise SystemExit(130) from None
    if json_path:
        write_json(json_path, report)
    print_kv("finetune", {k: v for k, v in report.items() if k != "losses"})


@cli.command("tune-exit", epilog=examples("tune-exit"))
@click.argument("model_dir")
@click.option("--calib", default="builtin", show_default=True, help="Prompts for the sweep.")
@click.option("--out", "out", type=click.Path(),
              help="Write a new export here (required unless MODEL_DIR is a squeeze export, whose squeeze.json "
                   "is then updated atomically).")
@click.option("--exit-layers", help="Comma-separated exit layers to try [default: all 1..L-1].")
@click.option("--ks", default="1,2,3,4,6,8", show_default=True, help="Comma-separated draft lengths to try.")
@click.option("--nprompts", type=int, default=4, show_default=True, help="Prompts drawn from --calib.")
@click.option("--prompt-len", type=int, default=32, show_default=True, help="Tokens per prompt.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True,
              help="Tokens generated per prompt and trial.")
@click.option("--repeats", type=int, default=1, show_default=True, help="Timing repeats (best is kept).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Write the sweep as JSON.")
def tune_exit(model_dir, calib, out, exit_layers, ks, nprompts, prompt_len, max_new_tokens, repeats, overwrite,
              json_path):
    """Time exit layers and draft lengths; save the fastest pair.

    Choose the self-speculative exit layer and draft length of MODEL_DIR by a timed sweep of
    generation on --calib prompts, and save them in squeeze.json, where `squeeze generate` finds
    them.
    """
    from squeeze.cli.report import print_kv

    from squeeze.depth.tune import tune_exit as tune_fn

    _quiet_transformers()
    report = tune_fn(model_dir, calib=calib, out=out, exit_layers=_ints(exit_layers, "--exit-layers"),
                     ks=_ints(ks, "--ks"), nprompts=nprompts, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                     repeats=repeats, overwrite=overwrite)
    if json_path:
        write_json(json_path, report)
    print_kv("tune-exit", {k: v for k, v in report.items() if k != "sweep"})


@cli.command("drop-layers", epilog=examples("drop-layers"))
@click.argument("model_dir")
@click.option("--remove", type=int, required=True, help="Number of layers to remove.")
@click.option("--by", type=click.Choice(["importance", "even"]), default="importance", show_default=True,
              help="importance: remove the lowest-scoring layers (see --score); even: keep evenly spaced "
                   "layers (no data).")
@click.option("--score", type=click.Choice(["cosine", "kl"]), default="kl", show_default=True,
              help="Importance score of a layer: kl = KL(full || layer skipped), cosine = 1 - cos(its input, "
                   "its output).")
@click.option("--calib", default="builtin", show_default=True, help="Scoring data (importance only).")
@click.option("--nsamples", type=int, default=32, show_default=True, help="Scoring sequences.")
@click.option("--seqlen", type=int, default=256, show_default=True, help="Tokens per scoring sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the choice of scoring windows.")
@click.option("--out", "out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
@click.option("--eval-data", default="auto", show_default=True, metavar="SRC|auto|none",
              help="Held-out data to score the export against MODEL_DIR on (same forms as --calib); auto: the "
                   "built-in held-out text when the model has a tokenizer; none: skip.")
@click.option("--eval-rows", type=int, help="Score on the first N rows of --eval-data [default: the first rows up to "
              "32768 tokens].")
def drop_layers(model_dir, remove, by, score, calib, nsamples, seqlen, seed, out, overwrite, json_path, eval_data,
                eval_rows):
    """Remove whole layers, chosen by importance or evenly.

    The export is a smaller plain checkpoint that transformers loads as it is.
    """
    from squeeze.cli.report import print_kv

    from squeeze.depth.layerdrop import drop_layers as drop_fn

    _quiet_transformers()
    report = drop_fn(model_dir, out, remove, by=by, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                     score=score, overwrite=overwrite, eval_data=eval_data, eval_rows=eval_rows)
    if json_path:
        write_json(json_path, report)
    print_kv("drop-layers", {**report, "removed_layers": ",".join(map(str, report["removed"])),
                             "kept_layers": ",".join(map(str, report["kept"]))})
    from squeeze.cli.report import console, layer_scores_lines, quality_lines

    for ln in layer_scores_lines(report) + quality_lines(report.get("quality")):
        console.print(ln)


@cli.command(epilog=examples("generate"))
@click.argument("model_dir")
@click.option("--prompt", help="Prompt text (needs the model's tokenizer).")
@click.option("--prompt-ids", help="Prompt token ids, comma-separated.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Tokens to generate.")
@click.option("--self-speculative", is_flag=True, help="Draft with the first layers, verify with the rest.")
@click.option("--exit-layer", type=int, help="Draft exit layer E [default: squeeze.json, else L//2].")
@click.option("--num-speculations", type=int, help="Draft length k [default: squeeze.json, else 4].")
@click.option("--early-exit", is_flag=True, help="Lossy early exit instead: stop at --exit-layer, or per token "
              "when the exit confidence reaches --exit-threshold.")
@click.option("--exit-threshold", type=float, help="Early exit: confidence needed to stop (top-1 prob or margin).")
@click.option("--exit-measure", type=click.Choice(["top1", "margin"]), default="top1", show_default=True,
              help="Early exit confidence: top-1 probability, or its margin over the second.")
@click.option("--min-exit-layer", type=int, default=1, show_default=True, help="Early exit: earliest exit layer.")
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy (rejection sampling when speculative).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="With --do-sample.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --do-sample.")
@click.option("--compare", is_flag=True, help="Also decode the dense source (plain decoding of the checkpoint "
              "squeeze.json records as the source, or of --reference) and report its tokens/s, the speed-up and the "
              "share of new tokens identical to its greedy output; with no source recorded, plain decoding of "
              "MODEL_DIR itself.")
@click.option("--reference", type=click.Path(), help="The dense checkpoint --compare decodes (implies --compare) "
              "[default: the source squeeze.json records].")
@click.option("--json", "json_path", type=click.Path(), help="Write tokens and stats as JSON.")
def generate(model_dir, prompt, prompt_ids, max_new_tokens, self_speculative, exit_layer, num_speculations,
             early_exit, exit_threshold, exit_measure, min_exit_layer, do_sample, temperature, seed, compare, reference,
             json_path):
    """Generate tokens: plain, self-speculative or early exit.

    Greedy (or --do-sample) decoding from MODEL_DIR; prints the new tokens, tokens/s and, when
    self-speculative, the acceptance rate. --compare sets it beside the dense source.
    """
    from pathlib import Path

    from squeeze.cli.report import print_kv

    from squeeze.calib.build import load_tokenizer
    from squeeze.runtime.speculative import generate as gen, saved_settings
    from squeeze.loading import load

    _quiet_transformers()
    if (prompt is None) == (prompt_ids is None):
        raise SqueezeError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    tok = load_tokenizer(Path(model_dir)) if Path(model_dir).is_dir() else None
    if prompt is not None:
        if tok is None:
            raise SqueezeError(f"{model_dir} has no tokenizer; pass --prompt-ids instead")
        ids = tok(prompt)["input_ids"]
    else:
        ids = _ints(prompt_ids, "--prompt-ids")
    compare = compare or reference is not None
    ref_dir, compared_with = _compare_target(model_dir, reference) if compare else (None, None)
    model = load(model_dir)
    kw = {"do_sample": do_sample, "temperature": temperature, "seed": seed, "return_stats": True}
    if early_exit:
        if self_speculative or do_sample:
            raise SqueezeError("--early-exit is greedy and cannot be combined with --self-speculative/--do-sample")
        from squeeze.runtime.early_exit import generate_early_exit

        out, stats = generate_early_exit(model, ids, max_new_tokens, exit_layer=exit_layer, threshold=exit_threshold,
                                         measure=exit_measure, min_layer=min_exit_layer)
        stats.pop("exit_histogram", None)
        new = out[0, len(ids):].tolist()
        report = {"new_ids": new, "ids": " ".join(map(str, new)), "mode": "early_exit", **stats}
        if compare:
            report.update(_compared(model, ref_dir, compared_with, ids, new, stats, max_new_tokens, kw, "matches_plain"))
        if json_path:
            write_json(json_path, report)
        print_kv("generate", report)
        return
    out, stats = gen(model, ids, max_new_tokens, self_speculative=self_speculative, exit_layer=exit_layer,
                     num_speculations=num_speculations, **kw)
    new = out[0, len(ids):].tolist()
    report = {"new_ids": new, "ids": " ".join(map(str, new)), **stats}
    recorded = saved_settings(model).get("speedup")
    if recorded is not None and float(recorded) < 1.0:  # plain is the default; say why when it is asked for
        report["note"] = (f"tune-exit measured its self-speculative settings at {float(recorded):.2f}x plain "
                          "decoding" + ("" if self_speculative else "; decoding plain (pass --self-speculative to try)"))
    if tok is not None:
        report["text"] = tok.decode(new)
    if compare:
        report.update(_compared(model, ref_dir, compared_with, ids, new, stats, max_new_tokens, kw,
                                "identical_to_plain"))
    if json_path:
        write_json(json_path, report)
    print_kv("generate", report)


def _compare_target(model_dir, reference) -> tuple:
    """(the dense checkpoint --compare decodes, or None for MODEL_DIR itself; the report's line
    saying which), settled before any model is loaded so a bad --reference costs nothing."""
    from pathlib import Path

    from squeeze.loading import recorded_source

    if reference is not None:
        from squeeze.evaluation import check_reference

        check_reference(model_dir, reference)  # a missing folder or another architecture / vocabulary
        return Path(reference), f"--reference {reference} (plain decoding)"
    src, why = recorded_source(model_dir)
    if src is not None:
        return src, f"source {src} (plain decoding; recorded in squeeze.json)"
    return None, f"plain decoding of this model ({why}; pass --reference)"


def _compared(model, ref_dir, compared_with, ids, new, stats, max_new_tokens, kw, same_key) -> dict:
    """What --compare adds: the other run's tokens/s, the speed-up over it and how many of the new
    tokens agree. Against a reference (the dense source): ``reference_tokens_per_s`` and, when
    greedy, ``identical_to_reference`` (the share of new tokens equal position by position to its
    greedy output) and ``identical_prefix`` (new tokens before the first difference). Against this
    model's own plain decoding (nothing recorded): ``plain_tokens_per_s`` and ``same_key``, the
    check that a lossless mode (self-speculative) reproduces plain decoding, or an early exit's
    share of matching tokens."""
    from squeeze.loading import load
    from squeeze.runtime.speculative import generate as gen

    other = model if ref_dir is None else load(ref_dir)
    ref, ref_stats = gen(other, ids, max_new_tokens, **kw)
    theirs = ref[0, len(ids):].tolist()
    same = [a == b for a, b in zip(new, theirs)]
    share = sum(same) / max(len(new), len(theirs))
    out = {"compared_with": compared_with, "speedup": stats["tokens_per_s"] / max(ref_stats["tokens_per_s"], 1e-9)}
    if ref_dir is None:
        out["plain_tokens_per_s"] = ref_stats["tokens_per_s"]
        if same_key == "matches_plain":
            out[same_key] = share
        elif not kw["do_sample"]:  # sampled outputs agree in distribution only, not token for token
            out[same_key] = new == theirs
        return out
    out["reference_tokens_per_s"] = ref_stats["tokens_per_s"]
    if not kw["do_sample"]:
        out["identical_to_reference"] = share
        out["identical_prefix"] = same.index(False) if False in same else len(same)
    return out


def _ints(text, flag):
    if text is None:
        return None
    try:
        return [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise SqueezeError(f"{flag} must be comma-separated integers, e.g. 1,2,3; got {text!r}") from None
