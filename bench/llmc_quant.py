"""llm-compressor oneshot with settings ../shared/anchors/llmcompressor_run.py does not expose (the
weight observer, GPTQ's actorder) and for encoders; run it in llm-compressor's own venv
(../shared/anchors/README.md), never in squeeze's. The saved compressed-tensors checkpoint is scored
by the bench case in squeeze's venv, with squeeze's KL / cosine code.

usage: OMP_NUM_THREADS=1 python bench/llmc_quant.py MODEL CALIB_JSONL RECIPE OUT
           [--nsamples N] [--seqlen L] [--observer minmax|mse] [--actorder static|none] [--encoder]
           [--file-order]

RECIPE is '+'-joined steps applied in order in ONE oneshot call, as in the anchor script:
  sgpt24 (SparseGPT 2:4) | gptq:SCHEME:ch | rtn:SCHEME:ch with SCHEME W8A16 | W4A16 (per-channel
  symmetric int weights). Without --observer / --actorder, llm-compressor's defaults apply.
--file-order calibrates on the rows in file order, as squeeze does; by default llm-compressor draws them
in a random order (``shuffle_calibration_samples``), which changes its float32 Hessian sums and so a
few rounding decisions from run to run.
Prints one line ``LLMC {...}`` with oneshot_s and save_s.
"""

from __future__ import annotations

import argparse
import json
import time

# squeeze compresses the linears inside the transformer blocks: never the LM head, nor BERT's pooler
# (which mean-pooled embeddings do not use)
IGNORE = ["lm_head", "re:.*pooler.*"]


def build(recipe: str, observer: str | None, actorder: str | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    mods = []
    for step in recipe.split("+"):
        if step == "sgpt24":
            mods.append(SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"],
                                          ignore=["re:.*lm_head", "re:.*pooler.*"]))
            continue
        kind, scheme, group = step.split(":")
        if group != "ch":
            raise SystemExit(f"only per-channel steps here (got {step}); the anchor script has the presets")
        bits = {"W8A16": 8, "W4A16": 4}[scheme]
        extra = {} if observer is None else {"observer": {"minmax": "memoryless_minmax"}.get(observer, observer)}
        w = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel", **extra)
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=w)}
        if kind == "gptq":
            kw = {} if actorder is None else {"actorder": None if actorder == "none" else actorder}
            mods.append(GPTQModifier(config_groups=groups, ignore=IGNORE, **kw))
        else:
            mods.append(QuantizationModifier(config_groups=groups, ignore=IGNORE))
    return mods


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("recipe")
    ap.add_argument("out")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=400)
    ap.add_argument("--observer")
    ap.add_argument("--actorder")
    ap.add_argument("--encoder", action="store_true", help="AutoModel (e.g. BERT) instead of a causal LM")
    ap.add_argument("--file-order", action="store_true", help="no shuffling of the calibration rows")
    a = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    rows = [json.loads(line)["input_ids"][:a.seqlen] for line in open(a.calib)][:a.nsamples]
    data = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
    if a.encoder:
        data["token_type_ids"] = [[0] * len(r) for r in rows]
    ds = Dataset.from_dict(data)
    cls = AutoModel if a.encoder else AutoModelForCausalLM
    model = cls.from_pretrained(a.model, dtype=torch.float32)
    kw = {}
    if a.encoder:
        kw["processor"] = AutoTokenizer.from_pretrained(a.model)
    else:  # token-id data: the anchor's stand-in tokenizer
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "anchors"))
        from llmcompressor_run import id_tokenizer

        kw["processor"] = id_tokenizer()
    t = time.perf_counter()
    model = oneshot(model=model, dataset=ds, recipe=build(a.recipe, a.observer, a.actorder),
                    num_calibration_samples=a.nsamples, max_seq_length=a.seqlen,
                    shuffle_calibration_samples=not a.file_order, **kw)
    secs = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(a.out, save_compressed=True)
    save = time.perf_counter() - t
    print("LLMC " + json.dumps({"recipe": a.recipe, "observer": a.observer, "actorder": a.actorder,
                                "file_order": a.file_order,
                                "nsamples": a.nsamples, "seqlen": a.seqlen, "oneshot_s": round(secs, 2),
                                "save_s": round(save, 2), "out": a.out}))


if __name__ == "__main__":
    main()
