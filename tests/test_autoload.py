"""Exports whose numbers need squeeze are never loaded silently wrong by transformers: without
squeeze it refuses them; with ``import squeeze`` (before or after transformers) its auto classes
give exactly ``squeeze.load``. Weights-only exports stay plain checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import squeeze
from squeeze.autoload import mark, needs_squeeze, unmark
from squeeze.checkpoint import Checkpoint
from squeeze.errors import SqueezeError

KINDS = {  # name -> (arch, compress settings)
    "teal": ("llama", {"method": "teal", "act_sparsity": 0.5}),
    "compressed-2:4": ("llama", {"method": "wanda", "pattern": "2:4"}),  # the default format packs it
    "drelu": ("llama", {"method": "drelu"}),
    "wina-transform": ("bert", {"method": "wina", "act_sparsity": 0.5, "transform": True}),
}
AUTO = {"llama": "AutoModelForCausalLM", "bert": "AutoModel"}


@pytest.fixture(scope="module")
def exports(tiny_dir, tiny_calib, tmp_path_factory):
    root = tmp_path_factory.mktemp("marked")
    out = {}
    for name, (arch, kw) in KINDS.items():
        out[name] = squeeze.compress(tiny_dir(arch), root / name.replace(":", ""), calib=str(tiny_calib),
                                     nsamples=4, seqlen=32, **kw).out
    from tests import llava_tiny  # a composite config: no layer count of its own

    out["pyramiddrop"] = squeeze.compress(llava_tiny.build(root / "llava-src"), root / "pyramiddrop",
                                          method="pyramiddrop").out
    out["wanda"] = squeeze.compress(tiny_dir("llama"), root / "wanda", method="wanda", pattern="2:4",
                                    calib=str(tiny_calib), nsamples=4, seqlen=32, format="dense").out
    return out


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow  # subprocesses pay the full import
def test_transformers_without_squeeze_refuses_every_marked_export(exports):
    cases = [(str(exports[n]), AUTO[KINDS[n][0]], "LlamaForCausalLM" if KINDS[n][0] == "llama" else "BertModel")
             for n in KINDS] + [(str(exports["pyramiddrop"]), "AutoModelForImageTextToText",
                                 "LlavaForConditionalGeneration")]
    code = f"""
import sys, transformers
for path, auto, direct in {cases!r}:
    for cls in (getattr(transformers, auto), getattr(transformers, direct)):
        for kwargs in ({{}}, {{"attn_implementation": "sdpa"}}):  # no keyword gets past the mark
            try:
                cls.from_pretrained(path, **kwargs)
                print("LOADED", cls.__name__, path)
            except Exception as e:  # a direct class stops in huggingface_hub's config validation
                print("REFUSED", cls.__name__, "squeeze" in str(e))
plain = transformers.AutoModelForCausalLM.from_pretrained({str(exports["wanda"])!r})
print("PLAIN", type(plain).__name__)
print("IMPORTED", "squeeze" in sys.modules)
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    refused = [ln for ln in lines if ln.startswith("REFUSED")]
    assert len(refused) == 4 * len(cases) and all(ln.endswith("True") for ln in refused), lines
    assert "PLAIN LlamaForCausalLM" in lines and "IMPORTED False" in lines


@pytest.mark.slow
@pytest.mark.parametrize("order", ["squeeze first", "transformers first"])
def test_import_order_does_not_matter(exports, order):
    first, second = ("squeeze", "transformers") if order == "squeeze first" else ("transformers", "squeeze")
    code = f"""
import {first}, {second}
import torch
ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
m = transformers.AutoModelForCausalLM.from_pretrained({str(exports["teal"])!r})
ref = squeeze.load({str(exports["teal"])!r})
print("EQUAL", torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits))
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "EQUAL True" in res.stdout.splitlines()


def test_auto_classes_give_squeeze_load(exports):
    import transformers

    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    for name, (arch, _) in KINDS.items():
        ref = squeeze.load(exports[name])
        got = getattr(transformers, AUTO[arch]).from_pretrained(exports[name])
        with torch.no_grad():
            a, b = ref(input_ids=ids), got(input_ids=ids)
        key = "logits" if arch == "llama" else "last_hidden_state"
        assert torch.equal(getattr(a, key), getattr(b, key)), name
    base = transformers.AutoModel.from_pretrained(exports["teal"])  # the base model, as transformers gives
    assert type(base).__name__ == "LlamaModel"
    with pytest.raises(SqueezeError, match="AutoModelForSequenceClassification cannot load it"):
        transformers.AutoModelForSequenceClassification.from_pretrained(exports["teal"])


def test_only_exports_that_need_squeeze_are_marked(exports):
    for name in KINDS:
        assert json.loads((exports[name] / "config.json").read_text())["model_type"] == "squeeze", name
        assert Checkpoint(exports[name]).config_dict["model_type"] == KINDS[name][0]
    assert json.loads((exports["wanda"] / "config.json").read_text())["model_type"] == "llama"


def test_mark_unmark():
    config = {"model_type": "llama", "hidden_size": 8, "architectures": ["LlamaForCausalLM"],
              "text_config": {"model_type": "x"}}
    runtime = {"passes": [{"pass": "teal"}]}
    weights = {"passes": [{"pass": "wanda"}, {"pass": "dsnot"}]}
    assert needs_squeeze(runtime) and not needs_squeeze(weights)
    assert needs_squeeze({"passes": [{"pass": "wanda"}], "format": {"linears": {"a.weight": {}}}})
    marked = mark(config, runtime)
    assert marked["model_type"] == "squeeze" and unmark(marked) == config
    # no top-level dict carries the model's type (a model class would pick it up and load the skeleton)
    assert not any(isinstance(v, dict) and v.get("model_type") == "llama" for v in marked.values())
    assert mark(config, weights) == config and mark(marked, weights) == config and unmark(config) is config
    with pytest.raises(SqueezeError, match="broken export"):
        unmark({"model_type": "squeeze"})
