"""``squeeze tune-exit``: choose the self-speculative exit layer E and draft length k by a sweep.

Every (E, k) pair decodes the same calibration prompts greedily, side by side with plain decoding
(same layer runner and cache); the pair with the best measured speed-up wins (ties broken by
tokens per full forward). The choice and the whole sweep go into ``squeeze.json`` under
``self_speculative``, which ``squeeze.generate`` reads from models loaded with ``squeeze.load``.

Input checkpoints are never modified: a squeeze export's ``squeeze.json`` is rewritten in place
atomically only when no ``out`` is given; for a plain checkpoint ``out`` is required and a new
export (the same tensors plus ``squeeze.json``) is written there.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from squeeze import progress
from squeeze.errors import SqueezeError


def sweep(model, prompts: list[torch.Tensor], max_new_tokens: int, exit_layers, ks, repeats: int = 1,
          sample: bool = False) -> list[dict]:
    """Plain and self-speculative decoding of ``prompts``, back to back for every (E, k): the ratio
    is what counts. Each side keeps its fastest of ``repeats`` rounds. ``sample=True`` samples
    (prompt i with seed i) instead of greedy decoding; then ``identical`` is None."""
    from squeeze.runtime.speculative import generate

    def timed(**kw):
        best, outs = None, []
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs_r = [generate(model, p, max_new_tokens, return_stats=True, do_sample=sample, seed=i, **kw)
                      for i, p in enumerate(prompts)]
            t = time.perf_counter() - t0
            if best is None or t < best:
                best, outs = t, outs_r
        return best, outs

    rows = []
    with progress.phase("tune-exit sweep", total=len(exit_layers) * len(ks), unit="setting") as shown:
        for E in exit_layers:
            for k in ks:
                t_plain, plain = timed()
                t_spec, spec = timed(self_speculative=True, exit_layer=E, num_speculations=k)
                drafted = sum(s["drafted"] for _, s in spec)
                new_tokens = sum(s["new_tokens"] for _, s in spec)
                rows.append({
                    "exit_layer": E, "num_speculations": k, "speedup": t_plain / max(t_spec, 1e-9),
                    "acceptance_rate": sum(s["accepted"] for _, s in spec) / max(drafted, 1),
                    "tokens_per_forward": new_tokens / sum(s["full_forwards"] for _, s in spec),
                    "plain_tok_s": new_tokens / max(t_plain, 1e-9), "spec_tok_s": new_tokens / max(t_spec, 1e-9),
                    "identical": None if sample else all(torch.equal(a, b) for (a, _), (b, _) in zip(plain, spec)),
                })
                best = max(rows, key=lambda r: r["speedup"])
                shown.advance(best=f"E={best['exit_layer']} k={best['num_speculations']} {best['speedup']:.2f}x")
    return rows


def tune_exit(model_dir, calib: str = "builtin", out=None, exit_layers=None, ks=(1, 2, 3, 4, 6, 8), nprompts: int = 4,
              prompt_len: int = 32, max_new_tokens: int = 32, seed: int = 0, repeats: int = 1,
              overwrite: bool = False) -> dict:
    from squeeze.calib.build import build_calibration
    from squeeze.formats import open_dense
    from squeeze.export import RECORD, check_output_dir, commit, size_report, staging_dir, write_checkpoint
    from squeeze.loading import load, read_record
    from squeeze.report import write_json
    from squeeze.runtime.speculative import RECORD_KEY
    from squeeze.runtime.stack import Stack
    from squeeze.versions import without_versions

    import time

    from squeeze.report import peak_rss_mb

    t0 = time.perf_counter()
    ckpt = open_dense(model_dir)
    record = read_record(ckpt.path)
    if out is None and not record:
        raise SqueezeError(f"{ckpt.path} is not a squeeze export (no squeeze.json); tune-exit never modifies an "
                           "input checkpoint: pass --out DIR to write a new export with the chosen settings")
    if out is not None:
        check_output_dir(Path(out), ckpt.path, overwrite)
    model = load(ckpt.path)
    L = Stack(model).num_layers
    if L < 2:
        raise SqueezeError("self-speculative decoding needs at least 2 layers")
    exit_layers = list(exit_layers or range(1, L))
    bad = [e for e in exit_layers if not 1 <= e < L]
    if bad:
        raise SqueezeError(f"exit layers must be in [1, {L - 1}]; got {bad}")
    cal = build_calibration(ckpt, model.config, calib, nprompts, prompt_len, seed)
    samples, calib_info = cal.samples, cal.describe()
    rows = sweep(model, samples, max_new_tokens, exit_layers, list(ks), repeats)
    best = max(rows, key=lambda r: (r["speedup"], r["tokens_per_forward"]))
    chosen = {"exit_layer": best["exit_layer"], "num_speculations": best["num_speculations"],
              "speedup": best["speedup"], "acceptance_rate": best["acceptance_rate"],
              "calibration": calib_info, "max_new_tokens": max_new_tokens, "sweep": rows}
    if out is None:
        record[RECORD_KEY] = chosen
        write_json(ckpt.path / RECORD, record)
        where = str(ckpt.path)
    else:
        new_record = {**without_versions(record),
                      "source": record.get("source", str(ckpt.path)), "passes": record.get("passes", []),
                      RECORD_KEY: chosen}
        sidecar = None
        if (ckpt.path / "squeeze.safetensors").is_file():
            from safetensors.torch import load_file

            sidecar = load_file(str(ckpt.path / "squeeze.safetensors"))
        with staging_dir(Path(out)) as tmp:
            sizes = write_checkpoint(ckpt, tmp, None, {}, new_record, sidecar=sidecar)
            commit(tmp, Path(out))
        where = str(out)
    written = size_report(ckpt, sizes, new_record) if out is not None else {}
    return {"written_to": where, **{k: v for k, v in chosen.items() if k != "calibration"}, **written,
            "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
