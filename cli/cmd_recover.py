"""``squeeze recover``: mask-preserving distillation of a pruned model toward its dense model."""

from __future__ import annotations

import click
from squeeze.cli.helptext import examples
from squeeze.cli.main import _quiet_transformers, cli

from squeeze.report import write_json


@cli.command(epilog=examples("recover"))
@click.argument("pruned_dir")
@click.option("--reference", required=True, type=click.Path(), help="The dense model the pruned one came from.")
@click.option("--out", "out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--calib", default="builtin", show_default=True, help="Training data (same forms as compress --calib).")
@click.option("--steps", type=int, default=100, show_default=True, help="Adam steps.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Learning rate.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per step.")
@click.option("--nsamples", type=int,
              help="Calibration sequences [default: 128; with --rows sentences: every sentence].")
@click.option("--seqlen", type=int, help="Tokens per sequence [default: 512, or the model's context if shorter]; "
              "with --rows sentences the cut-off of a sentence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the batch order.")
@click.option("--packing", type=click.Choice(["auto", "rows", "concat"]), default="auto", show_default=True,
              help="How --rows packed cuts the data into --nsamples x --seqlen.")
@click.option("--rows", "rows", type=click.Choice(["packed", "sentences"]), default="packed", show_default=True,
              help="Training rows: packed sequences (see --packing), or one sentence per row, padded and masked "
                   "(text data; suits sentence-embedding encoders).")
@click.option("--encoder-loss", default="last", show_default=True,
              help="Encoders: comma-separated loss terms, each NAME[:WEIGHT]: last (relative MSE of the last hidden "
                   "state), layers (of every block's output), pooled (1 - cosine of mean-pooled embeddings).")
@click.option("--augment", help="Comma-separated: pairs (with --rows sentences, also every two consecutive "
              "sentences as a row), drop:P (drop each inner token with probability P each time a row is drawn), replace:P "
              "(replace each inner token by a random vocabulary token with probability P).")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="Learning rate after the warm-up: constant, or cosine decay to 0 at --steps.")
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear learning-rate warm-up steps.")
@click.option("--checkpoint-every", type=int, default=50, show_default=True,
              help="Write a resumable checkpoint every M steps to .<out>.recover-work next to --out.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of an interrupted run.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON.")
@click.option("--eval-data", default="auto", show_default=True, metavar="SRC|auto|none",
              help="Held-out data to score the model on before and after recovery, against --reference (same forms "
                   "as --calib); auto: the built-in held-out text when the model has a tokenizer; none: skip.")
@click.option("--eval-rows", type=int, help="Score on the first N rows of --eval-data [default: the first rows up to "
              "32768 tokens].")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the checkpoint (off by default).")
def recover(pruned_dir, reference, out, calib, steps, lr, batch_size, nsamples, seqlen, seed, packing, rows,
            encoder_loss, augment, lr_schedule, warmup, checkpoint_every, resume, overwrite, json_path,
            eval_data, eval_rows, trust_remote_code):
    """Distil a pruned model toward its dense one; zeros stay zero.

    Fine-tune PRUNED_DIR toward --reference (KL on its logits; hidden-state MSE for encoders,
    see --encoder-loss), keeping every pruned weight exactly zero, and export to --out.
    """
    from squeeze.cli.report import print_kv

    from squeeze.recovery import recover as recover_fn
    from squeeze.recovery import work_dir

    _quiet_transformers()
    try:
        result = recover_fn(pruned_dir, out, reference=reference, calib=calib, steps=steps, lr=lr,
                            nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size,
                            checkpoint_every=checkpoint_every, packing=packing, resume=resume,
                            overwrite=overwrite, trust_remote_code=trust_remote_code,
                            rows=rows, encoder_loss=encoder_loss, augment=augment, lr_schedule=lr_schedule,
                            warmup=warmup, eval_data=eval_data, eval_rows=eval_rows)
    except KeyboardInterrupt:  # the training phase has ended (and its bar is gone) by now
        click.echo(f"interrupted; --out was not written. Checkpoints (every {checkpoint_every} steps) are in "
                   f"{work_dir(out)}: re-run with --resume to continue", err=True)
        raise SystemExit(130) from None
    report = result.report
    if json_path:
        write_json(json_path, report)
    print_kv(f"squeeze recover -> {report['out']}", {k: v for k, v in report.items() if k != "losses"})
    from squeeze.cli.report import console, recover_quality_lines

    for ln in recover_quality_lines(report):
        console.print(ln)
