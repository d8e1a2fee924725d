"""squeeze.plain_llama computes what transformers' LlamaForCausalLM (SDPA) computes, to the bit, so
a compress sweep can run without importing transformers and export the very same bytes."""

from pathlib import Path

import pytest
import torch

import squeeze
import squeeze.plain_llama as plain
from squeeze.formats import open_dense
from squeeze.modeling import WeightMap, is_plain, sweep_skeleton
from tests.tiny import COMMON, token_rows, write_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260k"


def _llama(folder: Path, **overrides) -> Path:
    import transformers

    cfg = transformers.LlamaConfig(**{**COMMON, **overrides})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at exactly 1: perturb them so they matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def _both(folder: Path):
    """(transformers' model with SDPA, the plain skeleton filled from the same files), fp32."""
    from transformers import AutoModelForCausalLM

    ckpt = open_dense(folder)
    config, ours = sweep_skeleton(ckpt)
    assert is_plain(ours), "this config should take the plain forward"
    WeightMap(ours, ckpt).materialize(ours, "", torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    return theirs, ours


def _block_outputs(model, ids):
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for b in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return outs, logits


CASES = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "tied, rope 5e5, head_dim 32": {"tie_word_embeddings": True, "rope_theta": 500000.0, "head_dim": 32},
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_block_and_the_logits_are_transformers_bits(tmp_path, case):
    theirs, ours = _both(_llama(tmp_path, **CASES[case]))
    g = torch.Generator().manual_seed(1)
    for batch, length in ((1, 1), (3, 7), (2, 40)):
        ids = torch.randint(3, 128, (batch, length), generator=g)
        want, want_logits = _block_outputs(theirs, ids)
        got, got_logits = _block_outputs(ours, ids)
        assert len(got) == len(want) == 2
        for a, b in zip(got, want):
            assert torch.equal(a, b), (case, batch, length)
        assert torch.equal(got_logits, want_logits)


@pytest.mark.shared
def test_stories260k_is_transformers_bits():
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} is missing")
    theirs, ours = _both(STORIES)
    ids = torch.randint(3, 512, (2, 400), generator=torch.Generator().manual_seed(0))
    want, want_logits = _block_outputs(theirs, ids)
    got, got_logits = _block_outputs(ours, ids)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(got_logits, want_logits)


def test_defaults_are_llamaconfigs():
    from transformers import LlamaConfig

    ref = LlamaConfig()
    ours = plain.plain_config({"model_type": "llama", **{k: getattr(ref, k) for k in plain.REQUIRED}})
    for k in (*plain.DEFAULTS, "num_key_value_heads", "head_dim"):
        if k == "rope_theta":
            assert ours.rope_theta == ref.rope_parameters["rope_theta"]
        else:
            assert getattr(ours, k) == getattr(ref, k), k


BASE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128}


@pytest.mark.parametrize("change", [
    {"model_type": "mistral"}, {"architectures": ["LlamaForSequenceClassification"]},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, {"rope_parameters": {"rope_type": "linear"}},
    {"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"}, {"pretraining_tp": 2},
    {"auto_map": {"AutoModelForCausalLM": "x.Y"}}, {"num_key_value_heads": 3}, {"hidden_size": None},
])
def test_anything_else_takes_transformers(change):
    assert plain.plain_config({**BASE, **change}) is None


@pytest.mark.parametrize("rope", [{}, {"rope_scaling": None}, {"rope_scaling": {"type": "default"}},
                                  {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}])
def test_plain_rope_spellings_are_accepted(rope):
    cfg = plain.plain_config({**BASE, **rope})
    assert cfg is not None
    assert cfg.rope_theta == (5e5 if "rope_parameters" in rope else 10000.0)


def _grid():
    from squeeze.passes import REGISTRY
    from tests.test_conformance import example_id, examples_of, recipe_of

    from squeeze.adapters import Adapter

    # the methods that run on a Llama at all (not LLaVA's token dropping), asked of a plain skeleton
    adapter = Adapter(plain.LlamaForCausalLM.skeleton(plain.plain_config({"model_type": "llama", **COMMON})))
    out = [pytest.param(recipe_of(n, e), id=f"{n}-{example_id(n, e)}") for n in sorted(REGISTRY)
           for e in examples_of(n) if not REGISTRY[n].unsupported(adapter)]
    return out + [pytest.param([{"pass": "sparsegpt", "sparsity": 0.5}, {"pass": "quantize", "bits": "int4"}],
                               id="sparsegpt-50%+int4-gptq")]


@pytest.mark.parametrize("recipe", _grid())
def test_exports_are_the_same_bytes_either_way(tiny_dir, tiny_calib, tmp_path, monkeypatch, recipe):
    """Every method's conformance examples on the tiny Llama: the export of a plain sweep is the
    export of a transformers sweep, byte for byte."""
    src = tiny_dir("llama")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kw = dict(recipe=recipe, calib=str(tiny_calib), nsamples=4, seqlen=32, eval_data="none", keep_in_memory=False)
    squeeze.compress(src, tmp_path / "plain", **kw)
    monkeypatch.setattr(plain, "plain_config", lambda config: None)  # transformers' classes
    squeeze.compress(src, tmp_path / "hf", **kw)
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "hf").iterdir())
    for name in files:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name


def test_a_kept_model_is_transformers(tmp_path):
    """A caller who keeps the compressed model in memory gets transformers' class: that sweep runs
    on it (the plain forward serves sweeps whose model nobody keeps, e.g. the CLI's)."""
    from transformers import LlamaForCausalLM

    src = _llama(tmp_path / "src", tie_word_embeddings=True)
    calib = write_jsonl(token_rows(4, 16), tmp_path / "calib.jsonl")
    r = squeeze.compress(src, tmp_path / "out", method="wanda", pattern="2:4", calib=str(calib), nsamples=4,
                         seqlen=16, eval_data="none", keep_in_memory=True)
    assert type(r.model) is LlamaForCausalLM
    assert r.model.lm_head.weight is r.model.model.embed_tokens.weight
    loaded = squeeze.load(tmp_path / "out", dtype="float32")
    ids = torch.tensor([token_rows(1, 16, seed=3)[0]])
    with torch.no_grad():
        assert torch.equal(r.model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_a_model_stage_builds_transformers_classes(tmp_path, monkeypatch):
    """dReLU's recovery trains the whole model: that sweep runs on transformers' classes (and a
    sweep that keeps no model and has no such stage never builds them)."""
    import squeeze.modeling as modeling

    built = []
    real = modeling.build_skeleton
    monkeypatch.setattr(modeling, "build_skeleton", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    src = _llama(tmp_path / "src")
    calib = write_jsonl(token_rows(4, 16), tmp_path / "calib.jsonl")
    kw = dict(calib=str(calib), nsamples=4, seqlen=16, eval_data="none", keep_in_memory=False)
    squeeze.compress(src, tmp_path / "w", method="wanda", pattern="2:4", **kw)
    assert not built
    squeeze.compress(src, tmp_path / "d", method="drelu", recover_steps=1, **kw)
    assert len(built) == 1 and not is_plain(built[0])
