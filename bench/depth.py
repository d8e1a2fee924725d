"""Depth benchmarks (issue 6): early-exit quality before/after LayerSkip, self-speculative
decoding speed vs plain greedy (same layer runner and cache), LayerDrop KL vs layers removed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/depth.py all --out /tmp/depth-bench

Sections: ``exit`` (trains stories260k with the LayerSkip recipe, per-layer accuracy / KL),
``speed`` (self-speculative vs plain on the original and trained stories260k), ``big`` (a larger
random-init llama trained briefly with the recipe, then the same speed sweep), ``layerdrop``.
Prints markdown tables and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260k"
CALIB = SHARED / "data" / "stories260k-calib.jsonl"
EVAL = SHARED / "data" / "stories260k-eval.jsonl"


def rows(path, n=None, length=None):
    out = []
    with open(path) as f:
        for line in f:
            ids = json.loads(line)["input_ids"]
            out.append(torch.tensor(ids[:length] if length else ids))
    return out[:n] if n else out


def table(headers, data):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in data:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def train(src, out, steps, **kw):
    from squeeze.depth.layerskip import finetune

    if Path(out).exists():
        return json.loads((Path(out) / "squeeze.json").read_text())["training"]
    t0 = time.perf_counter()
    rep = finetune(src, out, calib=str(CALIB), steps=steps, **kw)
    print(f"trained {src} -> {out}: {steps} steps in {time.perf_counter() - t0:.0f}s, loss "
          f"{rep['first_loss']:.3f} -> {rep['final_loss']:.3f}", flush=True)
    return rep


def exit_section(work, steps):
    import squeeze
    from squeeze.runtime.early_exit import exit_quality

    trained = work / "stories-layerskip"
    train(STORIES, trained, steps, batch_size=8, seqlen=256, nsamples=256, lr=1e-3, p_max=0.2,
          distill_from=STORIES, distill_weight=1.0)
    ev = rows(EVAL, 64)
    before = exit_quality(squeeze.load(STORIES), ev)
    after = exit_quality(squeeze.load(trained), ev)
    data = [(b["layer"], b["accuracy"], a["accuracy"], b["kl_to_final"], a["kl_to_final"]) for b, a in zip(before, after)]
    final_kl = squeeze.evaluate(str(trained), str(EVAL), reference=str(STORIES), max_rows=64)
    print(table(["exit after layer", "acc before", "acc after", "KL to own final before", "KL to own final after"],
                data))
    print(f"\ntrained final layer vs original: KL {final_kl['kl']:.4f} nats/token; ppl {final_kl.get('ppl')}")
    return {"before": before, "after": after, "trained_vs_original": final_kl}


def speed_sweep(model, prompts, new_tokens, exit_layers, ks, repeats=3, do_sample=False):
    from squeeze.runtime.speculative import generate

    def run(**kw):
        best, res = None, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = [generate(model, p, new_tokens, return_stats=True, do_sample=do_sample, seed=i, **kw)
                    for i, p in enumerate(prompts)]
            t = time.perf_counter() - t0
            if best is None or t < best:
                best, res = t, outs
        return best, res

    out = []
    for E in exit_layers:
        for k in ks:
            # plain and speculative timed back to back for every row: the ratio is what counts
            t_plain, plain = run()
            t_spec, spec = run(self_speculative=True, exit_layer=E, num_speculations=k)
            drafted = sum(s["drafted"] for _, s in spec)
            ntok = sum(s["new_tokens"] for _, s in spec)
            out.append({"exit_layer": E, "k": k,
                        "acceptance": sum(s["accepted"] for _, s in spec) / max(drafted, 1),
                        "tokens_per_full_forward": ntok / sum(s["full_forwards"] for _, s in spec),
                        "plain_tok_s": ntok / t_plain, "spec_tok_s": ntok / t_spec, "speedup": t_plain / t_spec,
                        "identical": "n/a (sampling)" if do_sample else
                        all(torch.equal(a, b) for (a, _), (b, _) in zip(plain, spec))})
    return out


def print_speed(title, res):
    print(f"\n{title}\n")
    print(table(["E", "k", "acceptance", "tokens/full fwd", "plain tok/s", "spec tok/s", "speed-up", "identical"],
                [(r["exit_layer"], r["k"], r["acceptance"], r["tokens_per_full_forward"], r["plain_tok_s"],
                  r["spec_tok_s"], r["speedup"], r["identical"]) for r in res]))


def speed_section(work, new_tokens, nprompts):
    import squeeze

    prompts = [r[:16] for r in rows(EVAL, nprompts)]
    res = {}
    for name, path in (("stories260k (original)", STORIES), ("stories260k + LayerSkip", work / "stories-layerskip")):
        if not Path(path).exists():
            continue
        model = squeeze.load(path)
        for mode in ("greedy", "sampling"):
            r = speed_sweep(model, prompts, new_tokens, [1, 2, 3, 4], [2, 4, 6], do_sample=mode == "sampling")
            res[f"{name}, {mode}"] = r
            print_speed(f"self-speculative {mode}, {name}, {nprompts} prompts x {new_tokens} new tokens", r)
    return res


def big_section(work, steps, new_tokens, nprompts, hidden, layers):
    """A larger random-init llama, trained briefly (LayerSkip recipe) on the stories token data."""
    import transformers

    import squeeze

    src = work / f"llama-{hidden}x{layers}-init"
    if not src.exists():
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                       num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                       num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512,
                                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    trained = work / f"llama-{hidden}x{layers}-layerskip"
    rep = train(src, trained, steps, batch_size=8, seqlen=128, nsamples=256, lr=1e-3, p_max=0.2, e_scale=1.0)
    model = squeeze.load(trained)
    n_params = sum(p.numel() for p in model.parameters())
    from squeeze.runtime.early_exit import exit_quality

    q = exit_quality(model, rows(EVAL, 16))
    print(f"\n{trained.name}: {n_params / 1e6:.1f}M params; per-layer exit accuracy "
          + ", ".join(f"L{r['layer']} {r['accuracy']:.3f}" for r in q))
    prompts = [r[:32] for r in rows(EVAL, nprompts)]
    E_list = sorted({max(1, layers // 4), max(1, layers // 2), max(1, 3 * layers // 4)})
    res = {}
    for mode in ("greedy", "sampling"):
        res[mode] = speed_sweep(model, prompts, new_tokens, E_list, [2, 4, 6, 8], repeats=2,
                                do_sample=mode == "sampling")
        print_speed(f"self-speculative {mode}, {trained.name}, {nprompts} prompts x {new_tokens} new tokens",
                    res[mode])
    return {"params": n_params, "training": rep, "exit_quality": q, "speed": res}


def layerdrop_section(work):
    import squeeze
    from squeeze.depth.layerdrop import drop_layers

    data = []
    for remove in (1, 2, 3, 4):
        row = [remove]
        for by, score in (("importance", "cosine"), ("importance", "kl"), ("even", None)):
            out = work / f"drop-{remove}-{by}-{score}"
            if not out.exists():
                rep = drop_layers(STORIES, out, remove, by=by, calib=str(CALIB), nsamples=32, seqlen=256,
                                  score=score or "cosine")
            else:
                rep = {"removed": json.loads((out / "squeeze.json").read_text())["passes"][-1]["removed"]}
            ev = squeeze.evaluate(str(out), str(EVAL), reference=str(STORIES), max_rows=64)
            row += [str(rep["removed"]), ev["kl"]]
        data.append(row)
    print("\nLayerDrop on stories260k (5 layers), KL(original || pruned) nats/token on 64 eval rows\n")
    print(table(["removed", "importance (1-cos) layers", "KL", "importance (skip-KL) layers", "KL", "even layers",
                 "KL"], data))
    return data


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("sections", nargs="+", choices=["exit", "speed", "big", "layerdrop", "all"])
    ap.add_argument("--out", default="/tmp/depth-bench")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--nprompts", type=int, default=4)
    ap.add_argument("--big-hidden", type=int, default=256)
    ap.add_argument("--big-layers", type=int, default=8)
    ap.add_argument("--big-steps", type=int, default=150)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    secs = {"exit", "speed", "big", "layerdrop"} if "all" in a.sections else set(a.sections)
    res_path = work / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    if "exit" in secs:
        results["exit"] = exit_section(work, a.steps)
    if "speed" in secs:
        results["speed"] = speed_section(work, a.new_tokens, a.nprompts)
    if "big" in secs:
        results["big"] = big_section(work, a.big_steps, a.new_tokens, a.nprompts, a.big_hidden, a.big_layers)
    if "layerdrop" in secs:
        results["layerdrop"] = layerdrop_section(work)
    res_path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
