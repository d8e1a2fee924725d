"""Vision-token dropping (PyramidDrop, MustDrop) on random LLaVA models: prefill FLOPs, wall time,
next-token KL against no dropping. No real VLM is available offline, so both models are random and
the KL says only how far a random model's distribution moves: NOT an accuracy result. Every policy
of one model is timed in one process, interleaved; rows are ratios to the no-drop row.

The token-drop runtime (policies, install, FLOP count) has no public API yet: this module is the one
place in bench/ that imports the token-drop runtime and squeeze.vision.
"""

from __future__ import annotations

import statistics
import time

from bench.harness import Case, latest, md_table


def build(kind: str):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if kind == "tiny":
        from tests.llava_tiny import model

        return model(layers=4)
    # 336 / 14 = 24 x 24 = 576 image tokens (LLaVA-1.5's layout); a narrow vision tower (its cost
    # is the same with and without dropping), an 8-layer 1024-wide Llama.
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=31999, image_seq_length=576,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def drop(model: str, repeats: int, text_tokens: int, new_tokens: int) -> list[dict]:
    import torch

    from squeeze.runtime.token_drop import install, uninstall
    from squeeze.vision.flops import flops_report, synthetic_prompt
    from squeeze.runtime.mustdrop import MustDropPolicy
    from squeeze.runtime.pyramiddrop import PyramidDropPolicy

    m = build(model)
    ids, pv = synthetic_prompt(m.config, text_tokens, seed=1)
    pols = {"none": None, "pyramiddrop (defaults)": PyramidDropPolicy(), "mustdrop (defaults)": MustDropPolicy(),
            "mustdrop (merge 0.5, thr 0.011/0.01)": MustDropPolicy(None, 0.011, 0.01, merge_threshold=0.5)}

    def use(pol):
        uninstall(m)
        if pol is not None:
            install(m, pol)

    reps, logits = {}, {}
    times, gen_times = {k: [] for k in pols}, {k: [] for k in pols}
    with torch.no_grad():
        for name, pol in pols.items():  # FLOPs + next-token distribution
            use(pol)
            reps[name] = flops_report(m, text_tokens, seed=1)
            logits[name] = m(input_ids=ids, pixel_values=pv).logits[0, -1].double()
        for _ in range(repeats):  # interleaved timing
            for name, pol in pols.items():
                use(pol)
                t0 = time.perf_counter()
                m(input_ids=ids, pixel_values=pv, logits_to_keep=1)
                times[name].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                out = m.generate(input_ids=ids, pixel_values=pv, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)
                gen_times[name].append(time.perf_counter() - t0)
                assert out.shape[1] == ids.shape[1] + new_tokens
    uninstall(m)
    base = torch.log_softmax(logits["none"], -1)
    rows = []
    for name in pols:
        lp, r = torch.log_softmax(logits[name], -1), reps[name]
        rows.append({"row": name, "params": {"policy": name}, "ratio_to": None if name == "none" else "none",
                     "metrics": {"image_tokens": r["image_tokens"],
                                 "stage_tokens": [s["tokens"] for s in r["prefill"]["stages"]],
                                 "prefill_gflops": r["prefill"]["total"] / 1e9,
                                 "decode_step_flops_ratio": r["decode_ratio"],
                                 "prefill_s": statistics.median(times[name]),
                                 "generate_s": statistics.median(gen_times[name]),
                                 "kl_next_token": float((base.exp() * (base - lp)).sum()),
                                 "same_argmax": bool(lp.argmax() == base.argmax())}})
    return rows


CASES = [Case("vision_tokens", kind, "bench.cases.vision_tokens:drop",
              {"model": kind, "repeats": 3, "text_tokens": 64, "new_tokens": 16},
              quick={"repeats": 1} if kind == "tiny" else None) for kind in ("tiny", "large")]


def table(records) -> str:
    def g(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = []
    for kind in ("tiny", "large"):
        for r in latest(records, "vision_tokens", kind):
            m, ratio = r["metrics"], (r["ratio_to"] or {}).get("metrics", {})
            rows.append([kind, r["row"], m["stage_tokens"], g(m["prefill_gflops"]), g(ratio.get("prefill_gflops", 1)),
                         g(m["decode_step_flops_ratio"]), g(m["prefill_s"]), g(ratio.get("prefill_s", 1)),
                         g(m["generate_s"]), g(ratio.get("generate_s", 1)), g(m["kl_next_token"]), m["same_argmax"]])
    return md_table(["model", "policy", "stage_tokens", "prefill_gflops", "prefill_flops_ratio",
                     "decode_step_flops_ratio", "prefill_s", "prefill_time_ratio", "generate_s", "generate_time_ratio",
                     "kl_next_token", "same_argmax"], rows)


TABLES = {"vision-tokens": table}
