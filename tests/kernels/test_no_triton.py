"""squeeze.kernels has no hard Triton dependency (that it imports nothing of the rest of squeeze is
checked with the whole import layering in tests/test_layering.py)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import squeeze.kernels

KERNELS_DIR = Path(squeeze.kernels.__file__).parent


def test_only_private_modules_import_triton_at_top_level():
    for path in KERNELS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        imports_triton = any(
            (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "triton" for a in n.names))
            or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "triton")
            for n in top
        )
        if imports_triton:
            assert path.name.startswith("_") and path.name.endswith("_triton.py") or path.name == "_triton_common.py", path


_NO_TRITON = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton' (blocked for this test)")
sys.meta_path.insert(0, Block())
import torch
import squeeze.kernels as K
assert not K.triton_available()
w = torch.zeros(8, 16); w[:, ::4] = 1.0; w[:, 1::4] = 2.0
v, m = K.pack_24(w)
x = torch.randn(3, 16)
assert torch.equal(K.linear_24(x, v, m), torch.nn.functional.linear(x, w))
wg, wu, wd = torch.randn(20, 16), torch.randn(20, 16), torch.randn(20, 16)
y = K.chunk_sparse_ffn(x, wg, wu, wd, "relu")
assert torch.allclose(y, K.chunk_sparse_ffn_reference(x, wg, wu, wd, "relu"), atol=1e-5)
y = K.sparse_ffn_from_indices(x, wg, wu, wd, torch.tensor([1, 4, 9]), "swiglu")
codes, scale = K.pack_int4(torch.randint(1, 16, (8, 16))), torch.rand(8, 1)
wq = K.dequantize_reference(codes, scale, bits=4, symmetric=True, group_size=16, K=16)
assert torch.equal(K.quant_linear(x, codes, scale, bits=4, symmetric=True, group_size=16), torch.nn.functional.linear(x, wq))
assert "triton" not in sys.modules
print("ok")
"""


@pytest.mark.slow  # a subprocess pays the full import
def test_cpu_paths_work_without_triton(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
