"""Rendering of reports for the CLI (rich); progress is squeeze.cli.progress."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

def _report_console() -> Console:
    """Reports never cut a name: lines are not wrapped (soft_wrap), and when stdout is not a terminal
    (a file, a pipe, a test) tables get a wide page instead of rich's 80 columns."""
    import os
    import sys

    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=False, soft_wrap=True, width=240 if wide else None)


console = _report_console()


def verify_export(result) -> dict:
    """Reload the export with squeeze.load and check it reproduces the in-memory model (the largest
    |difference| of the outputs on a few token ids). Quality against the source is the report's
    ``quality`` (``--eval-data``), not this."""
    import torch

    from squeeze.loading import load

    out = {}
    if result.model is not None:
        cal = result.report.get("calibration") or {}
        # both in fp32 from the export's rounding (a bf16 export of an fp32 model): an exact check
        exported = load(result.out, dtype=torch.float32)
        ids = torch.arange(2, 2 + min(32, cal.get("seqlen", 32)))[None] % exported.config.vocab_size
        dtype = load(result.out).dtype
        with torch.no_grad():
            a, b = exported(input_ids=ids), result.model.to(dtype).float()(input_ids=ids)
        key = "logits" if hasattr(a, "logits") and a.logits is not None else "last_hidden_state"
        out["reload_max_abs_diff"] = float((getattr(a, key).float() - getattr(b, key).float()).abs().max())
    return out


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _values(vals: list) -> str:
    """One per-layer list on one line; numbers get their mean (what the per-layer choice averages to)."""
    nums = [v for v in vals if isinstance(v, (int, float))]
    text = " ".join("-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in vals)
    return text + (f"  (mean {sum(nums) / len(nums):.4g})" if nums and len(nums) == len(vals) else "")


def done_lines(done: list[dict]) -> list[str]:
    """Every pass from its own ``chosen()`` (squeeze.passes.base.Method.chosen): settings, outcomes,
    and per-layer choices, in one generic shape."""
    lines = []
    for d in done:
        settings = ", ".join(f"{k} {_fmt(v)}" for k, v in d.get("settings", {}).items())
        lines.append(f"pass {d['pass']}" + (f": {settings}" if settings else ""))
        if d.get("results"):
            lines.append("  result: " + ", ".join(f"{k} {_fmt(v)}" for k, v in d["results"].items()))
        for label, vals in (d.get("per_layer") or {}).items():
            if vals:
                lines.append(f"  {label} per layer: {_values(vals)}")
    return lines


def quality_lines(q: dict | None, what: str = "export") -> list[str]:
    """How good: the export against its source on held-out rows, or why that was not measured."""
    if not q:
        return []
    lines = []
    if not q.get("measured", True):
        lines.append(f"quality: {q['reason']}")
    else:
        where = f"{q['rows']} rows of {q['data']} ({q['tokens']} tokens)"
        if "ppl" in q and "ppl_reference" in q:
            lines.append(f"quality on {where}: ppl {q['ppl']:.4g} ({what}) vs {q['ppl_reference']:.4g} (source), "
                         f"KL(source||{what}) {q['kl']:.4f} nats/token")
        elif "ppl" in q:
            lines.append(f"quality on {where}: ppl {q['ppl']:.4g}")
        if "cosine_mean" in q:
            lines.append(f"quality on {where}: embedding cosine vs source mean {q['cosine_mean']:.4f}, "
                         f"min {q['cosine_min']:.4f}")
    sp = q.get("act_sparsity")
    if sp:
        lines += act_sparsity_lines(sp, sp.get("measured_on") or f"{q['rows']} held-out rows")
    return lines


def act_sparsity_lines(sp: dict, on: str) -> list[str]:
    """The activation sparsity a run-time sparse model reached (squeeze.evaluation.ActCounter)."""
    return [f"activation sparsity reached on {on}: {sp['mean']:.3f} (inputs of the sparsified linears, "
            "weighted by weight size)", f"  per layer: {_values(list(sp['layers'].values()))}"]


def print_kv(title: str, report: dict) -> None:
    t = Table(title=title, show_header=False)
    for k, v in report.items():
        if not isinstance(v, (dict, list)) and k != "loads_with":
            t.add_row(k, _fmt(v))
    console.print(t)
    if "act_sparsity" in report:  # an eval of a run-time activation-sparse model
        for ln in act_sparsity_lines(report["act_sparsity"], f"{report['rows']} rows of {report['data']}"):
            console.print(ln)
    if "size_bytes" in report:  # a command that wrote an export
        console.print(_size_line(report))
        console.print(_loads_line(report))


def summary_line(s: dict) -> str | None:
    """Weights changed: how many, how sparse; N:M validity only over N:M linears, and for
    unstructured linears the sparsity asked beside the sparsity reached."""
    if not s.get("targeted_linears"):
        return None
    line = f"targeted linears: {s['targeted_linears']}, overall sparsity {s.get('sparsity', 0):.3f}"
    if "pattern_ok" in s:
        line += (f", N:M pattern valid on all {s['pattern_linears']} N:M linears" if s["pattern_ok"]
                 else f", N:M pattern VIOLATED on some of {s['pattern_linears']} N:M linears")
    u = s.get("unstructured")
    if u:
        line += f", unstructured ({u['linears']} linears): target {u['target']:.4f}, achieved {u['achieved']:.4f}"
    return line


def print_compress_report(r: dict, details: bool = False) -> None:
    """One row per block (per linear with ``details``), then what each pass did, size, quality, time."""
    import re

    rows: dict[str, list] = {}
    for name, rec in r["linears"].items():
        key = name if details else re.sub(r"^(.*?\.\d+)\..*$", r"\1", name)
        rows.setdefault(key, []).append((name, rec))
    if rows:  # run-time-only methods (teal, wina, ...) change no weights: no table of nothing
        t = Table(title=f"squeeze compress -> {r['out']}")
        for col, just in (("linear" if details else "layer", "left"), ("linears", "right"), ("params", "right"),
                          ("sparsity", "right"), ("pattern", "left")):
            t.add_column(col, justify=just, overflow="fold")
        for key, recs in rows.items():
            params = sum(rec["shape"][0] * rec["shape"][1] for _, rec in recs)
            zeros = sum(rec.get("measured_sparsity", rec["sparsity"]) * rec["shape"][0] * rec["shape"][1]
                        for _, rec in recs)
            pats = sorted({str(rec.get("pattern") or f"{rec['sparsity_target' if 'sparsity_target' in rec else 'sparsity']:.0%}")
                           for _, rec in recs})
            bad = [n for n, rec in recs if rec.get("pattern_ok") is False]
            ok = "" if not any("pattern_ok" in rec for _, rec in recs) else (" valid" if not bad else f" VIOLATED: {bad}")
            tails = sum(1 for _, rec in recs if rec.get("dense_tail_columns") or rec.get("dense_tail_rows"))
            tail = f" ({tails} with a dense partial group)" if tails else ""
            t.add_row(key, str(len(recs)), f"{params:,}", f"{zeros / max(params, 1):.3f}", ",".join(pats) + ok + tail)
        console.print(t)
    else:
        console.print(f"squeeze compress -> {r['out']}")
    cal = r.get("calibration") or {}
    lines = done_lines(r.get("done") or [{"pass": p["pass"]} for p in r["passes"]])
    lines += [
        f"calibration: {cal.get('source')} ({cal.get('nsamples')} x {cal.get('seqlen')} tokens, {cal.get('packing')})"
        + (f", {cal['prompt_tokens']} prompt + {cal['generated_tokens']} generated tokens"
           if "generated_tokens" in cal else "")
        + (f", split over {r['distributed']['processes']} processes ({r['distributed']['backend']})"
           if r.get("distributed") else "")
        if cal else "calibration: none",
        summary_line(r["summary"]),
        _size_line(r),
        _loads_line(r),
        *quality_lines(_measured((r.get("recover") or {}).get("quality_before")), "one-shot"),
        *quality_lines(r.get("quality")),
        time_line(r),
        phases_line(r),
    ]
    v = r.get("verify")
    if v and "reload_max_abs_diff" in v:
        lines.append(f"reload: max |diff| vs in-memory model {v['reload_max_abs_diff']:.2e}")
    nxt = r.get("next")
    if nxt:
        lines.append(f"further: {nxt['command']}  ({nxt['summary']}: {nxt['reaches']})")
    for ln in lines:
        if ln:
            console.print(ln)


def _measured(q: dict | None) -> dict | None:
    return q if q and q.get("measured") else None


def phases_line(r: dict) -> str:
    phases = r.get("seconds_by_phase")
    return ("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())) if phases else ""


def time_line(r: dict) -> str:
    q = r.get("quality") or {}
    extra = f" (+ {q['seconds']:.1f} s scoring quality)" if q.get("measured") and "seconds" in q else ""
    b = r.get("memory_bound")
    bound = (f" (streamed: bound {b['total_mb']:.0f} MB = interpreter {b['interpreter_mb']:.0f} + 2 x block "
             f"{b['block_fp32_mb']:.0f} + stored block {b['block_stored_mb']:.0f} + 2 x activations "
             f"{b['activations_mb']:.0f} + forward {b['forward_mb']:.0f}"
             + (f" + Hessians {b['hessians_mb']:.0f}" if b.get("hessians_mb") else "") + ")") if b else ""
    return f"time: {r['seconds']:.1f} s{extra}, peak RSS {r['peak_rss_mb']:.0f} MB{bound}"


def _size_line(r: dict) -> str:
    b = r["size_bytes"]
    line = f"size: source {b['source'] / 1e6:.2f} MB -> export {b['export'] / 1e6:.2f} MB ({b['ratio']:.2f}x)"
    fmt = r.get("format")
    if fmt and fmt.get("stored_dense"):
        line += (f"; {len(fmt['stored_dense'])} of the compressed linears stored dense (no compact layout is smaller "
                 f"for them), e.g. {fmt['stored_dense'][0]}")
    elif not fmt and any(rec.get("pattern") == "2:4" and rec.get("pattern_axis") != "out"
                         for rec in r.get("linears", {}).values()):
        line += "; the zeros are stored (--format dense): --format auto keeps 2:4 linears at ~0.56x of 16-bit weights"
    if fmt:
        line += f", stored as {fmt['kind']}"
    return line


def _loads_line(r: dict) -> str:
    if r.get("loads_with") == "squeeze":
        return ("loads with: squeeze.load, or transformers' auto classes after `import squeeze` (config.json is "
                "marked: transformers alone refuses it)")
    if r.get("loads_with") == "transformers + compressed-tensors":
        return ("loads with: transformers + compressed-tensors (plain from_pretrained, no squeeze; vLLM and SGLang "
                "read the layout), and squeeze.load")
    return "loads with: any transformers (plain from_pretrained), and squeeze.load"


def print_info(r: dict) -> None:
    t = Table(title=f"squeeze info {r['path']}")
    for c in ("linear", "role", "shape", "sparsity", "2:4", "promised", "ok"):
        t.add_column(c, overflow="fold", no_wrap=c == "linear")
    for name, rec in r["linears"].items():
        t.add_row(name, rec["role"], "x".join(map(str, rec["shape"])), f"{rec['sparsity']:.3f}",
                  "yes" if rec["fits_2_4"] else "no", str(rec.get("promised") or "-"),
                  {True: "yes", False: "NO", None: "-"}[rec.get("promise_ok")])
    console.print(t)
    for k in ("model_type", "architecture", "format", "parameters", "linear_parameters", "zero_fraction_linears"):
        if k in r:
            console.print(f"{k}: {_fmt(r[k])}")
    files = r.get("file_bytes") or {}
    console.print(f"files: {sum(files.values()):,} bytes in {len(files)} files")
    for name, n in files.items():
        console.print(f"  {name}: {n:,}")
    sq = r.get("squeeze")
    if sq:
        console.print("squeeze passes:")
        for p in sq.get("passes") or []:
            console.print("  " + _entry_line(p))
        cal = sq.get("calibration")
        console.print("calibration: " + (_entry_line(cal) if cal else "none"))
        made = sq.get("made_with") or {}
        console.print("made with: " + ", ".join(f"{k.removesuffix('_version')} {made.get(k) or '?'}" for k in made))
    rt = r.get("runtime")
    if rt:
        console.print(f"run-time paths on this machine ({rt.get('threads')} threads, runtime {rt.get('mode')}):")
        for line in runtime_lines(rt):
            console.print("  " + line)


def runtime_lines(rt: dict) -> list[str]:
    """One line per run-time kind: the path squeeze.load chose and the measured ratio."""
    from squeeze.runtime.plan import summary_line

    if rt.get("note"):
        return [rt["note"]]
    return [summary_line(kind, s) for kind, s in (rt.get("summary") or {}).items()]


def _entry_line(entry: dict) -> str:
    """A recorded pass or calibration as one readable line: "name: key value, ..." (nested values
    short: lists and dicts by their size, long text cut at its first clause)."""
    d = dict(entry)
    head = d.pop("pass", None) or d.pop("source", None) or ""

    def short(v):
        if isinstance(v, dict):
            return f"{{{len(v)} entries}}"
        if isinstance(v, list):
            return ",".join(map(_fmt, v)) if len(v) <= 8 and all(not isinstance(x, (dict, list)) for x in v) \
                else f"[{len(v)} values]"
        text = _fmt(v)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"{head}: " + ", ".join(f"{k} {short(v)}" for k, v in d.items())


def layer_scores_lines(r: dict) -> list[str]:
    """drop-layers: every layer, removed or kept, with its importance score (when scored)."""
    scores = r.get("scores")
    if not scores:
        return [f"removed layers: {', '.join(map(str, r['removed']))} (by {r['by']}, no scores)"]
    what = {"kl": "KL(full || layer skipped), nats/token", "cosine": "1 - cos(layer input, output)"}.get(
        r.get("score"), r.get("score"))
    lines = [f"importance ({what}; the lowest are removed):"]
    for i, sc in enumerate(scores):
        lines.append(f"  layer {i}: {sc:.4g}  {'removed' if i in r['removed'] else 'kept'}")
    return lines


def recover_quality_lines(r: dict) -> list[str]:
    """recover: held-out quality of the pruned input and of the recovered export, side by side."""
    before, after = r.get("quality_before") or {}, r.get("quality_after") or {}
    if not before.get("measured") or not after.get("measured"):
        return quality_lines(before)
    lines = [f"held-out quality vs --reference on {after['rows']} rows of {after['data']} ({after['tokens']} tokens):"]
    if "kl" in after:
        lines.append(f"  KL(reference||model): {before['kl']:.4f} before -> {after['kl']:.4f} after recovery "
                     "(nats/token)")
        lines.append(f"  ppl: {before['ppl']:.4g} before -> {after['ppl']:.4g} after (reference "
                     f"{after['ppl_reference']:.4g})")
    if "cosine_mean" in after:
        lines.append(f"  embedding cosine mean: {before['cosine_mean']:.4f} before -> {after['cosine_mean']:.4f} after"
                     f" (min {before['cosine_min']:.4f} -> {after['cosine_min']:.4f})")
    lines.append(f"time: {r['seconds']:.1f} s ({r['train_seconds']:.1f} s training, {r.get('quality_seconds', 0):.1f} s "
                 f"scoring), peak RSS {r['peak_rss_mb']:.0f} MB")
    return lines
