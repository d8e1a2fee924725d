"""The conformance grid: every registered method x each of its example settings x every tiny
architecture it applies to, one test id per case, all through one common tester:

    compress (``--format auto``: packed where it pays) -> the promise holds (``squeeze.info``
    re-measures the exported weights against what ``squeeze.json`` promised) -> reload with
    ``squeeze.load``, and with transformers: plain ``from_pretrained`` when nothing needs squeeze,
    else the export is marked ``model_type: squeeze`` and transformers' auto class (squeeze
    imported) loads it -> the same outputs as the in-memory compressed model. When something was
    packed, the ``--format dense`` export is bigger and reloads to the same outputs too. (That
    transformers *without* squeeze refuses marked exports is tests/test_autoload.py's job.)

A new method is tested by registering it and declaring its examples.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers

import squeeze
from squeeze.adapters import Adapter
from squeeze.autoload import needs_squeeze
from squeeze.loading import read_record
from squeeze.modeling import model_class
from squeeze.passes import REGISTRY
from squeeze.recipe import build_passes
from squeeze.runtime.spec import RUNTIMES
from tests import llava_tiny
from tests.tiny import ARCHS

def examples_of(name: str) -> list:
    return list(REGISTRY[name].examples)


def unsupported_reason(name: str, adapter: Adapter) -> str | None:
    return REGISTRY[name].unsupported(adapter)


def recipe_of(name: str, example) -> list[dict]:
    return [dict(e) for e in example] if isinstance(example, list) else [{"pass": name, **example}]


def example_id(name: str, example) -> str:
    """e.g. ``pattern=2of4``, ``wanda(sparsity=0.5)+dsnot`` (":" spelled "of" and no brackets, so the
    node id can be pasted on the command line; select groups with ``-k "wanda and llama"``)."""
    entries = recipe_of(name, example)

    def one(entry):
        settings = ",".join(f"{k}={v}" for k, v in entry.items() if k != "pass")
        if len(entries) == 1:
            return settings
        return f"{entry['pass']}({settings})" if settings else entry["pass"]

    text = "+".join(map(one, entries)).replace(":", "of")
    return "".join(c for c in text if c not in " []") or "defaults"


def _case(name: str, example, arch: str):
    return pytest.param(name, example, arch, id=f"{name}-{example_id(name, example)}-{arch}")


AUTO_CLASS = {"bert": "AutoModel", "llava": "AutoModelForImageTextToText"}


METHODS = sorted(REGISTRY)
ALL_ARCHS = [*ARCHS, "llava"]
CASES = [_case(name, example, arch)
         for name in METHODS for example in examples_of(name) for arch in ALL_ARCHS]


def test_every_method_declares_examples():
    missing = [n for n in METHODS if not examples_of(n)]
    assert not missing, f"registered methods without example settings (declare `examples`): {missing}"
    unknown = [n for n in METHODS if n not in RUNTIMES]
    assert not unknown, f"methods squeeze.load would refuse (add them to squeeze/runtime/spec.py): {unknown}"
    for name in METHODS:  # every example is valid settings, and runs the method it is filed under
        for example in examples_of(name):
            assert name in [p.name for p in build_passes(recipe_of(name, example))]


@pytest.fixture(scope="module")
def source(tiny_dir, tmp_path_factory):
    """source(arch) -> (checkpoint folder, model inputs, its Adapter, dense outputs), built once per arch."""
    @functools.cache
    def get(arch):
        if arch == "llava":
            src = llava_tiny.build(tmp_path_factory.mktemp("llava") / "tiny-llava")
            ids, pixels = llava_tiny.inputs(batch=2)
            inputs = {"input_ids": ids, "pixel_values": pixels}
        else:
            src = tiny_dir(arch)
            inputs = {"input_ids": torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))}
        dense = squeeze.load(src)
        return src, inputs, Adapter(dense), _outputs(dense, inputs)

    return get


def _outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _check_promise(out, recipe: list[dict], adapter: Adapter) -> dict:
    """``squeeze info`` re-measures every linear of the export; each one squeeze.json promised a
    pattern or sparsity for must keep it, a pass that promises one must record it, and nothing
    outside the blocks may be promised."""
    info = squeeze.info(out)
    promised = set(read_record(out).get("linears", {}))
    assert promised or not any(getattr(p, "promise", dict)() for p in build_passes(recipe)), "the promise was not recorded"
    in_blocks = {n for i in range(len(adapter)) for n in adapter.block(i).linears}
    assert promised <= in_blocks, sorted(promised - in_blocks)
    checked = {n for n, rec in info["linears"].items() if "promise_ok" in rec}
    assert checked == promised
    assert all(info["linears"][n]["promise_ok"] for n in promised), \
        sorted(n for n in promised if not info["linears"][n]["promise_ok"])
    return info


# Same dtype (fp32 in, fp32 exported: the weights round-trip bit for bit), same modules, same CPU
# kernels, same inputs: every reload must reproduce the in-memory model exactly, so any difference
# is a real export/load bug rather than rounding.
EXACT = dict(rtol=0, atol=0)


@pytest.mark.parametrize("name,example,arch", CASES)
def test_conformance(name, example, arch, source, tiny_calib, tmp_path, monkeypatch):
    src, inputs, dense_adapter, dense = source(arch)
    reason = unsupported_reason(name, dense_adapter)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # resume files (drelu) stay in tmp
    # every load keeps the in-memory model's paths (TEAL/WINA masks), transformers' auto class too
    monkeypatch.setenv("SQUEEZE_RUNTIME", "sparse")
    recipe = recipe_of(name, example)
    kw = dict(recipe=recipe, calib=str(tiny_calib), nsamples=4, seqlen=32, keep_in_memory=True)
    res = squeeze.compress(src, tmp_path / "auto", format="auto", **kw)  # packed where it pays
    record = read_record(res.out)
    assert [e["pass"] for e in record["passes"]] == [e["pass"] for e in recipe]
    info = _check_promise(res.out, recipe, dense_adapter)

    want = _outputs(res.model, inputs)
    loaded = squeeze.load(res.out, runtime="sparse")  # the in-memory model's paths (the plan's: test_runtime_plan)
    torch.testing.assert_close(_outputs(loaded, inputs), want, **EXACT)
    if arch != "llava":  # one token, as in decoding: the run-times' input-sparse paths agree too
        one = {"input_ids": inputs["input_ids"][:1, :1]}
        torch.testing.assert_close(_outputs(loaded, one), _outputs(res.model, one), **EXACT)
    _check_transformers(res.out, record, src, arch, inputs, want)
    assert want.shape != dense.shape or not torch.equal(want, dense), "the method changed nothing"

    if record.get("format"):  # packed: the dense format is one flag away, bigger, and loads the same
        assert info["format"].startswith("compressed-")
        plain = squeeze.compress(src, tmp_path / "dense", format="dense", **kw).out
        plain_info = _check_promise(plain, recipe, dense_adapter)
        assert plain_info["format"] == "dense"
        assert sum(info["file_bytes"].values()) < sum(plain_info["file_bytes"].values())
        torch.testing.assert_close(_outputs(squeeze.load(plain), inputs), want, **EXACT)
        _check_transformers(plain, read_record(plain), src, arch, inputs, want)
    else:
        assert not any({"quant", "pattern", "sparsity"} & set(p) for p in record["linears"].values()), \
            "a promised linear was stored dense"


def _check_transformers(out, record, src, arch, inputs, want) -> None:
    """Weights-only exports load in any transformers; the rest are marked for squeeze, and with
    squeeze imported transformers' auto class gives squeeze.load's model."""
    config = json.loads((out / "config.json").read_text())
    if not needs_squeeze(record):
        assert config["model_type"] == json.loads((src / "config.json").read_text())["model_type"]
        plain = model_class(squeeze.load(out).config).from_pretrained(out)
        torch.testing.assert_close(_outputs(plain, inputs), want, **EXACT)
    else:
        assert config["model_type"] == "squeeze"
        auto = getattr(transformers, AUTO_CLASS.get(arch, "AutoModelForCausalLM")).from_pretrained(out)
        torch.testing.assert_close(_outputs(auto, inputs), want, **EXACT)


def _first_supported_arch(name: str) -> str:
    """The architecture of ``name``'s determinism cases in the fast loop."""
    first = {"pyramiddrop": "llava", "mustdrop": "llava"}  # vision-token methods need a VLM
    return first.get(name, ALL_ARCHS[0])


# one architecture per method and example: the grid's every method, at a tenth of its cost
DETERMINISM = [p for p in CASES if p.values[2] == _first_supported_arch(p.values[0])]


def _all_files(folder) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("name,example,arch", DETERMINISM)
def test_deterministic(name, example, arch, source, tiny_calib, tmp_path, monkeypatch):
    """Same inputs, seed and thread count: two runs write byte-identical exports, every file
    (squeeze.json too: it holds no time and no output path). One architecture per example (the
    architectures differ in the adapter, which the rest of the grid tests, not in the sweep's order)."""
    src, _, dense_adapter, _ = source(arch)
    reason = unsupported_reason(name, dense_adapter)
    if reason:
        pytest.skip(reason)
    kw = dict(recipe=recipe_of(name, example), calib=str(tiny_calib), nsamples=4, seqlen=32, keep_in_memory=False)
    runs = []
    for run in ("one", "two"):  # each its own resume cache (drelu), so neither can reuse the other's work
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"cache-{run}"))
        runs.append(_all_files(squeeze.compress(src, tmp_path / run, **kw).out))
    assert sorted(runs[0]) == sorted(runs[1])
    assert [f for f in runs[0] if runs[0][f] != runs[1][f]] == []
    record = json.loads(runs[0]["squeeze.json"])
    assert record["threads"] == torch.get_num_threads() and record["seed"] == 0
    assert {"squeeze_version", "torch", "transformers", "safetensors"} <= set(record)
