"""Vision-token dropping on random LLaVA models: prefill FLOPs, wall time, next-token KL.

No real VLM is available offline, so both models are random (tiny: the test model; large: a
576-image-token layout with a 1024-wide, few-layer Llama). The KL numbers say how far the
dropped model's next-token distribution moves on a random model and random image; they are
NOT accuracy results. Timings are single-threaded and taken side by side in one run
(interleaved repeats, median), so compare the ratios.

    OMP_NUM_THREADS=1 .venv/bin/python bench/vision_tokens.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(kind: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if kind == "tiny":
        from tests.llava_tiny import model

        return model(layers=4)
    # 336 / 14 = 24 x 24 = 576 image tokens (LLaVA-1.5's layout); a one-layer narrow vision tower
    # (its cost is the same with and without dropping), an 8-layer 1024-wide Llama.
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=31999, image_seq_length=576,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def policies(num_layers: int):
    from squeeze.runtime.mustdrop import MustDropPolicy
    from squeeze.runtime.pyramiddrop import PyramidDropPolicy

    return {"none": None, "pyramiddrop (defaults)": PyramidDropPolicy(),
            "mustdrop (defaults)": MustDropPolicy(),
            "mustdrop (merge 0.5, thr 0.011/0.01)": MustDropPolicy(None, 0.011, 0.01, merge_threshold=0.5)}


@torch.no_grad()
def run(kind: str, repeats: int, text_tokens: int, new_tokens: int) -> list[dict]:
    from squeeze.runtime.token_drop import install, uninstall
    from squeeze.vision.flops import flops_report, synthetic_prompt

    m = build(kind)
    L = m.config.text_config.num_hidden_layers
    ids, pv = synthetic_prompt(m.config, text_tokens, seed=1)
    pols = policies(L)
    rows, times, gen_times, logits = {}, {k: [] for k in pols}, {k: [] for k in pols}, {}
    for name, pol in pols.items():  # FLOPs + next-token distribution
        uninstall(m)
        if pol is not None:
            install(m, pol)
        rep = flops_report(m, text_tokens, seed=1)
        logits[name] = m(input_ids=ids, pixel_values=pv).logits[0, -1].double()
        rows[name] = rep
    for _ in range(repeats):  # interleaved timing
        for name, pol in pols.items():
            uninstall(m)
            if pol is not None:
                install(m, pol)
            t0 = time.perf_counter()
            m(input_ids=ids, pixel_values=pv, logits_to_keep=1)
            times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = m.generate(input_ids=ids, pixel_values=pv, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
            gen_times[name].append(time.perf_counter() - t0)
            assert out.shape[1] == ids.shape[1] + new_tokens
    uninstall(m)
    base_lp = torch.log_softmax(logits["none"], -1)
    out = []
    for name in pols:
        lp = torch.log_softmax(logits[name], -1)
        r = rows[name]
        out.append({
            "model": kind, "policy": name, "image_tokens": r["image_tokens"], "text_tokens": text_tokens,
            "stage_tokens": [s["tokens"] for s in r["prefill"]["stages"]],
            "prefill_gflops": r["prefill"]["total"] / 1e9, "prefill_flops_ratio": r["prefill_ratio"],
            "decode_step_flops_ratio": r["decode_ratio"],
            "prefill_s": statistics.median(times[name]),
            "prefill_time_ratio": statistics.median(times[name]) / statistics.median(times["none"]),
            "generate_s": statistics.median(gen_times[name]),
            "generate_time_ratio": statistics.median(gen_times[name]) / statistics.median(gen_times["none"]),
            "kl_next_token": float((base_lp.exp() * (base_lp - lp)).sum()),
            "same_argmax": bool(lp.argmax() == base_lp.argmax()),
        })
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--models", default="tiny,large")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for kind in a.models.split(","):
        rows += run(kind, a.repeats, a.text_tokens, a.new_tokens)
    hdr = ("model", "policy", "stage_tokens", "prefill_gflops", "prefill_flops_ratio", "decode_step_flops_ratio",
           "prefill_s", "prefill_time_ratio", "generate_s", "generate_time_ratio", "kl_next_token", "same_argmax")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        cells = [f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h]) for h in hdr]
        print("| " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
