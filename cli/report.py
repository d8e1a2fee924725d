"""Rendering of reports for the CLI (rich); progress is squeeze.cli.progress."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)


def verify_export(result) -> dict:
    """Reload the export with squeeze.load, check it reproduces the in-memory model, and score it
    against the source on held-out data (the embedded corpus' eval sentences when the model has a
    tokenizer)."""
    import torch

    from squeeze.calib.build import load_tokenizer
    from squeeze.evaluation import evaluate
    from squeeze.loading import load

    reloaded = load(result.out)
    out = {}
    if result.model is not None:
        cal = result.report.get("calibration") or {}
        ids = torch.arange(2, 2 + min(32, cal.get("seqlen", 32)))[None] % reloaded.config.vocab_size
        # both in fp32 from the export's rounding (a bf16 export of an fp32 model): an exact check
        exported = load(result.out, dtype=torch.float32)
        with torch.no_grad():
            a, b = exported(input_ids=ids), result.model.to(reloaded.dtype).float()(input_ids=ids)
        key = "logits" if hasattr(a, "logits") and a.logits is not None else "last_hidden_state"
        out["reload_max_abs_diff"] = float((getattr(a, key).float() - getattr(b, key).float()).abs().max())
    if load_tokenizer(result.out) is not None:
        r = evaluate(reloaded, "builtin-eval", reference=load(result.report["model_path"]))
        out.update({k: r[k] for k in ("data", "rows", "kl", "ppl", "cosine_mean", "cosine_min") if k in r})
    return out


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_kv(title: str, report: dict) -> None:
    t = Table(title=title, show_header=False)
    for k, v in report.items():
        if not isinstance(v, (dict, list)) and k != "loads_with":
            t.add_row(k, _fmt(v))
    console.print(t)
    if "size_bytes" in report:  # a command that wrote an export
        console.print(_size_line(report))
        console.print(_loads_line(report))


def print_compress_report(r: dict, details: bool = False) -> None:
    """One row per block (per linear with ``details``), then the summary lines."""
    import re

    rows: dict[str, list] = {}
    for name, rec in r["linears"].items():
        key = name if details else re.sub(r"^(.*?\.\d+)\..*$", r"\1", name)
        rows.setdefault(key, []).append((name, rec))
    t = Table(title=f"squeeze compress -> {r['out']}")
    for col, just in (("linear" if details else "layer", "left"), ("linears", "right"), ("params", "right"),
                      ("sparsity", "right"), ("pattern", "left")):
        t.add_column(col, justify=just)
    for key, recs in rows.items():
        params = sum(rec["shape"][0] * rec["shape"][1] for _, rec in recs)
        zeros = sum(rec["sparsity"] * rec["shape"][0] * rec["shape"][1] for _, rec in recs)
        pats = sorted({str(rec.get("pattern") or f"{rec['sparsity_target' if 'sparsity_target' in rec else 'sparsity']:.0%}")
                       for _, rec in recs})
        bad = [n for n, rec in recs if rec.get("pattern_ok") is False]
        ok = "" if not any("pattern_ok" in rec for _, rec in recs) else (" valid" if not bad else f" VIOLATED: {bad}")
        tails = sum(1 for _, rec in recs if rec.get("dense_tail_columns") or rec.get("dense_tail_rows"))
        tail = f" ({tails} with a dense partial group)" if tails else ""
        t.add_row(key, str(len(recs)), f"{params:,}", f"{zeros / max(params, 1):.3f}", ",".join(pats) + ok + tail)
    console.print(t)
    s = r["summary"]
    cal = r.get("calibration") or {}
    lines = [
        f"passes: {', '.join(p['pass'] for p in r['passes'])}",
        f"calibration: {cal.get('source')} ({cal.get('nsamples')} x {cal.get('seqlen')} tokens, {cal.get('packing')})"
        + (f", {cal['prompt_tokens']} prompt + {cal['generated_tokens']} generated tokens"
           if "generated_tokens" in cal else "")
        if cal else "calibration: none",
        f"targeted linears: {s.get('targeted_linears')}, overall sparsity {s.get('sparsity', 0):.3f}"
        + (f", pattern valid on all: {s['pattern_ok']}" if "pattern_ok" in s else ""),
        _size_line(r),
        _loads_line(r),
        f"time: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
    ]
    v = r.get("verify")
    if v:
        if "reload_max_abs_diff" in v:
            lines.append(f"reload: max |diff| vs in-memory model {v['reload_max_abs_diff']:.2e}")
        if "cosine_mean" in v:
            lines.append(f"embedding cosine vs dense on {v['rows']} held-out sentences: mean {v['cosine_mean']:.4f}, "
                         f"min {v['cosine_min']:.4f}")
        if "kl" in v:
            lines.append(f"KL(dense||compressed) on {v['rows']} held-out rows: {v['kl']:.4f} nats/token")
    for ln in lines:
        console.print(ln)


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
        t.add_column(c)
    for name, rec in r["linears"].items():
        t.add_row(name, rec["role"], "x".join(map(str, rec["shape"])), f"{rec['sparsity']:.3f}",
                  "yes" if rec["fits_2_4"] else "no", str(rec.get("promised") or "-"),
                  {True: "yes", False: "NO", None: "-"}[rec.get("promise_ok")])
    console.print(t)
    for k in ("model_type", "architecture", "parameters", "linear_parameters", "zero_fraction_linears",
              "file_bytes"):
        if k in r:
            console.print(f"{k}: {r[k]}")
    sq = r.get("squeeze")
    if sq:
        console.print(f"squeeze passes: {sq['passes']}")
        console.print(f"calibration: {sq['calibration']}")
        made = sq.get("made_with") or {}
        console.print("made with: " + ", ".join(f"{k.removesuffix('_version')} {made.get(k) or '?'}" for k in made))
