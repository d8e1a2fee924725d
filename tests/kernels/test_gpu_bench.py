"""bench/gpu.py's correctness part: on a CPU, under Triton's interpreter at its tiny shapes, every
kernel it checks is within tolerance of its torch reference, and its comparison rejects a wrong
output (so a GPU run that reports "ok" has been held to something)."""

import pytest
import torch

from tests.kernels.helpers import needs_triton

KERNELS = {"linear_24", "quant_linear int8", "quant_linear int8a", "quant_linear int4", "quant_linear int4a",
           "quant_linear fp8", "quant_linear_24", "chunk_sparse_ffn", "sparse_ffn_from_indices"}


@needs_triton
def test_gpu_checks_pass_under_the_interpreter():
    from bench.gpu import check

    rows = check("cpu", tiny=True, dtypes=("fp32", "fp16"))
    assert {r["check"] for r in rows} == KERNELS
    assert {r.get("path") for r in rows if r["check"].startswith(("linear_24", "quant"))} == {"decode", "prefill"}
    assert {r.get("act") for r in rows if r["check"] == "chunk_sparse_ffn"} == {"relu", "drelu", "swiglu"}
    assert {r["dtype"] for r in rows} == {"float32", "float16"}
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad


def test_gpu_compare_rejects_wrong_outputs():
    from bench.gpu import compare

    ref = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert compare("k", ref.clone(), ref, torch.float32)["ok"]
    off = ref.clone()
    off[0, 0] += 1e-3 * float(ref.abs().max())  # 25x the fp32 tolerance
    assert not compare("k", off, ref, torch.float32)["ok"]
    assert not compare("k", ref.half(), ref, torch.float32)["ok"]  # not the dtype the kernel promised
    nan = ref.clone()
    nan[1, 1] = float("nan")
    assert not compare("k", nan, ref, torch.float32)["ok"]
    assert not compare("k", ref[:, :4], ref[:, :4].T.contiguous(), torch.float32)["ok"]  # shapes differ


def test_gpu_threshold_sits_in_a_gap():
    from bench.gpu import gap_threshold

    scores = torch.tensor([0.1, 0.2, 0.3, 0.31, 0.9, 0.95, 1.0, 1.1])
    assert 0.31 < gap_threshold(scores) < 0.9  # the widest gap of the middle half, not an edge


def test_gpu_check_on_cpu_needs_the_interpreter(monkeypatch):
    from bench.gpu import check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        check("cpu", tiny=True)
