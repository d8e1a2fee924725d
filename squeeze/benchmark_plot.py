"""The picture of a ``squeeze bench`` report: speed-up against quality, one marker per case, its
area the bytes on disk, so the model that is fast, good and small stands out at a glance.

matplotlib is the optional ``bench`` extra; :func:`check_matplotlib` says so in one line before
any measuring starts. Drawn on a bare ``Figure`` (no pyplot: no global state, no GUI backend).
"""

from __future__ import annotations

import os
from pathlib import Path

from squeeze.errors import SqueezeError


def check_matplotlib() -> str:
    """matplotlib's version, or one line saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise SqueezeError("--png needs matplotlib, which is not installed: pip install 'squeeze[bench]' "
                           "(or pip install matplotlib)") from None
    return matplotlib.__version__


def _quality_axis(report: dict) -> tuple[str, list]:
    """The horizontal axis: KL(reference || model) for LMs, mean embedding cosine for encoders;
    None for a case whose quality was not measured."""
    key, label = (("kl", "KL(reference || model), nats/token (lower is better)") if report["kind"] == "causal"
                  else ("cosine_mean", "embedding cosine to the reference, mean (higher is better)"))
    return label, [c["quality"].get(key) if c["quality"].get("measured") else None for c in report["cases"]]


def plot(report: dict, path) -> Path:
    """Draw ``report`` (:func:`squeeze.bench_models`) as a PNG at ``path``, written atomically."""
    check_matplotlib()
    from matplotlib.figure import Figure

    cases = report["cases"]
    metric = report["headline"]["metric"]
    label, xs = _quality_axis(report)
    measured = all(x is not None for x in xs)
    if not measured:  # still a useful picture of speed and size: cases side by side
        xs, label = list(range(len(cases))), "case (quality not measured: pass --eval-data)"
    ref = cases[0]
    fig = Figure(figsize=(7.5, 4.8), dpi=150)
    ax = fig.subplots()
    ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
    for x, c in zip(xs, cases):
        lo, hi = c["min"][metric] / ref["median"][metric], c["max"][metric] / ref["median"][metric]
        if not metric.startswith("decode_tps"):  # a latency: its speed-up is the inverse ratio
            lo, hi = 1 / hi, 1 / lo
        y = c["speedup"]
        area = 400 * c["ratio"]["bytes_on_disk"]  # the reference's marker is 400 pt^2
        colour = "0.35" if c["role"] == "reference" else "tab:blue"
        ax.scatter([x], [y], s=area, color=colour, alpha=0.45, edgecolors=colour, zorder=3)
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="none", ecolor=colour, lw=1, capsize=3, zorder=4)
        ax.annotate(f"{c['name']}\n{c['method']}, {c['bytes_on_disk'] / 1e6:.3g} MB", (x, y),
                    textcoords="offset points", xytext=(8, 6), fontsize=7)
    ax.ticklabel_format(axis="x", useOffset=False)  # cosines near 1 read as 0.9999, not "+1" offsets
    ax.set_xlabel(label)
    ax.set_ylabel(f"speed-up vs reference ({report['headline']['what']})")
    rounds = report["settings"]["rounds"]
    what = f"median of {rounds} rounds (bars: min-max)" if rounds > 1 else "one round"
    ax.set_title(f"squeeze bench: {what}, marker area = bytes on disk", fontsize=9)
    ax.margins(x=0.25, y=0.2)  # room for the labels right of and above the markers
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
