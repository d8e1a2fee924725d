"""``squeeze bench``: size, speed and quality of exports beside their dense reference, one table."""

from __future__ import annotations

import click
from squeeze.cli.helptext import examples
from squeeze.cli.main import _quiet_transformers, cli


@cli.command(epilog=examples("bench"))
@click.argument("models", nargs=-1, required=True)
@click.option("--reference", required=True, type=click.Path(), help="The dense checkpoint the models were made "
              "from: measured beside them, and what ratios and quality are against.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Alternating rounds (reference, each model, "
              "reference, ...), each case in a process of its own; medians and min-max are over these.")
@click.option("--new-tokens", type=int, help="Causal LMs: greedy tokens decoded per prompt at batch 1 and 8 "
              "[default: 128].")
@click.option("--prompt-len", type=int, default=128, show_default=True,
              help="Prompt tokens: the prefill latency's length, and the prompts decoding starts from.")
@click.option("--threads", type=int, help="torch threads in each measuring process [default: torch's].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the models run (quality is scored on the CPU, as `squeeze eval`).")
@click.option("--dtype", default="auto", show_default=True,
              help="Load dtype: auto (each checkpoint's own), float32, float16, bfloat16 (or fp32, fp16, bf16).")
@click.option("--eval-data", default="auto", show_default=True, metavar="SRC|auto|none",
              help="Held-out data for quality (same forms as compress --calib) and the prompts; auto: the built-in "
                   "held-out text when the reference has a tokenizer; none: skip quality (random prompt ids).")
@click.option("--eval-rows", type=int, help="Score quality on the first N rows of --eval-data [default: the first "
              "rows up to 32768 tokens].")
@click.option("--json", "json_path", type=click.Path(), help="Write every figure (each round too) as JSON.")
@click.option("--png", "png_path", type=click.Path(), help="Draw speed-up vs quality, marker area = bytes on disk "
              "(needs matplotlib: pip install 'squeeze[bench]').")
def bench(models, reference, rounds, new_tokens, prompt_len, threads, device, dtype, eval_data, eval_rows, json_path,
          png_path):
    """Measure exports' speed, size and quality beside their source.

    For --reference and each of MODELS: decode tokens/s at batch 1 and 8 (causal LMs), prefill
    latency, peak RSS, bytes on disk, and quality against the reference on held-out data (ppl and
    KL for LMs, embedding cosine for encoders), as medians of alternating rounds with their
    spread and ratios to the reference. For causal LMs, beside the batch-1 speed: the bytes one
    decode step reads (MB/token), the speed-up those bytes allow over the reference (bound x:
    measured read bandwidth / bytes per token, each over the reference's) and the share of its
    bound a model reaches (of bound).
    """
    from squeeze.benchmark import bench_models

    _quiet_transformers()
    report = bench_models(list(models), reference, rounds=rounds, new_tokens=new_tokens, prompt_len=prompt_len,
                          threads=threads, device=device, dtype=dtype, eval_data=eval_data, eval_rows=eval_rows,
                          json_path=json_path, png_path=png_path)
    print_bench(report)
    for flag, path in (("json", json_path), ("png", png_path)):
        if path:
            click.echo(f"{flag}: {path}")


def _cell(case: dict, metric: str, digits: str = ".4g") -> str:
    med, lo, hi = case["median"][metric], case["min"][metric], case["max"][metric]
    spread = f" [{lo:{digits}}-{hi:{digits}}]" if case["rounds"][1:] else ""
    return f"{med:{digits}}{spread} {case['ratio'][metric]:.2f}x"


def print_bench(r: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from squeeze.cli.report import console

    def say(line: str) -> None:  # "[min-max]" and paths are text, not rich markup
        console.print(line, markup=False)

    causal = r["kind"] == "causal"
    bound = r.get("bandwidth") is not None  # causal LMs: the decode bound beside the batch-1 speed
    s = r["settings"]
    speed = ([("decode_tps_b1", "decode tok/s b1"), ("decode_tps_b8", f"decode tok/s b{s['batch']}")] if causal
             else [("prefill_ms_b8", f"forward ms b{s['batch']}")])
    t = Table(title=f"squeeze bench (reference {r['cases'][0]['name']})")
    # names stay whole however narrow the terminal; the figures fold instead
    whole = {"case": max(len(c["name"]) for c in r["cases"]), "method": max(len(c["method"]) for c in r["cases"])}
    for col in ["case", "method", speed[0][1], *(["bound x", "of bound", "MB/token"] if bound else []),
                *(label for _, label in speed[1:]), f"prefill ms ({s['prompt_len']} tok)",
                "peak RSS MB", "disk MB", *(["ppl", "KL(ref||model)", "greedy match"] if causal
                                            else ["cosine mean", "cosine min"])]:
        t.add_column(col, justify="left" if col in whole else "right", overflow="fold", min_width=whole.get(col))
    for c in r["cases"]:
        q = c["quality"] if c["quality"].get("measured") else {}
        quality = ([_num(q.get("ppl")), _num(q.get("kl"), ".4f"), _num(c.get("greedy_match"), ".2f")] if causal
                   else [_num(q.get("cosine_mean"), ".4f"), _num(q.get("cosine_min"), ".4f")])
        bounds = ([f"{c['bound_speedup']:.2f}x", f"{100 * c['of_bound']:.0f}%",
                   f"{c['bytes_per_token']['total'] / 1e6:.4g}"] if bound else [])
        cells = [c["name"], c["method"], _cell(c, speed[0][0]), *bounds, *(_cell(c, m) for m, _ in speed[1:]),
                 _cell(c, "prefill_ms"), _cell(c, "peak_rss_mb", ".0f"),
                 f"{c['bytes_on_disk'] / 1e6:.3g} {c['ratio']['bytes_on_disk']:.2f}x", *quality]
        t.add_row(*map(escape, cells))
    console.print(t)
    rounds = f"median of {s['rounds']} alternating rounds [min-max]" if s["rounds"] > 1 else "one round"
    say(f"{rounds}, each case in its own process; Nx = median / the reference's (tokens/s: above 1 is "
        "faster; ms and MB: below 1 is faster / smaller)")
    what = f"{s['new_tokens']} new tokens after " if causal else ""
    say(f"prompts: {what}{s['prompts']}")
    if bound:
        bw, ref = r["bandwidth"], r["cases"][0]
        say(f"bound: memory read bandwidth {bw['bytes_per_s'] / 1e9:.3g} GB/s ({bw['how']}, threads {bw['threads']}) "
            "/ MB/token, the bytes one batch-1 decode step reads (weights as the loaded run-times hold them, "
            "activation-sparse linears their kept rows, one embedding row, the LM head, the KV cache at "
            f"{ref['bytes_per_token']['context']} tokens); bound x = bound / the reference's bound, of bound = "
            f"measured / bound; the reference's bound {ref['bound_tps']:.4g} tok/s")
    ref_q = r["cases"][0]["quality"]
    if ref_q.get("measured"):
        say(f"quality: {ref_q['rows']} rows of {ref_q['data']} ({ref_q['tokens']} tokens) against the reference"
            + (", greedy match: share of batch-1 new tokens equal to the reference's" if causal else ""))
    else:
        say(f"quality: {ref_q.get('reason')}")
    from squeeze.cli.report import runtime_lines

    for c in r["cases"]:
        for line in runtime_lines(c.get("runtime") or {}):
            say(f"{c['name']} run-time: {line}")
        if c.get("decode_mode", "plain") != "plain":
            say(f"{c['name']} decodes {c['decode_mode']} at batch 1")
        sparsity = (c["quality"].get("act_sparsity") or {}).get("mean")
        if sparsity is not None:
            say(f"{c['name']}: activation sparsity reached {sparsity:.3f} on the quality rows")
    m = r["machine"]
    say(f"machine: {m['cpu']}, {m['cores']} cores, load average {m['load_avg_1min'][0]} before, "
        f"{m['load_avg_1min'][1]} after; {r['cases'][0]['threads']} "
        f"threads, {s['device']}, {', '.join(sorted({c['dtype'] for c in r['cases']}))}; {r['seconds']} s")
    say(f"speed-up ({r['headline']['what']}): " + ", ".join(
        f"{c['name']} {c['speedup']:.2f}x" for c in r["cases"][1:]))


def _num(v, digits: str = ".4g") -> str:
    return "-" if v is None else f"{v:{digits}}"
