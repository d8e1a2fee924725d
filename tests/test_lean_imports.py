"""Import only what a command uses (issue 15 item 5): `import squeeze` and `squeeze --help` import
no torch at all, and a CPU-only `squeeze info` keeps Triton and SciPy out (transformers' modeling
code would pull Triton in through torch._dynamo, ~80 MB of RSS for nothing on a machine without
CUDA, and SciPy for object-detection losses, ~35 MB)."""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "triton", "numpy")


def _loaded_after(code: str, env=None) -> dict:
    names = list(HEAVY) + ["torch._dynamo", "scipy"]
    # printed at exit: the `squeeze` program ends in main() (atexit handlers still run)
    probe = ("import atexit, json, sys\natexit.register(lambda: print(json.dumps("
             f"{{m: sys.modules.get(m) is not None for m in {names!r}}})))\n" + code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("TRITON_INTERPRET", None)  # set by the kernel tests' conftest; it keeps Triton (CPU test mode)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_squeeze_and_help_import_no_torch():
    for code in ("import squeeze",
                 "from squeeze.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"):
        loaded = _loaded_after(code)
        assert not any(loaded.values()), (code, loaded)


@pytest.mark.slow  # a subprocess pays the full torch + transformers import
def test_cpu_info_keeps_triton_out(tiny_dir):
    pytest.importorskip("triton", reason="triton not installed: nothing to keep out")
    # main() with no argv is the program itself (sys.argv), as the console script runs it
    code = ("import sys\nfrom squeeze.cli.main import main\n"
            f"sys.argv = ['squeeze', 'info', {str(tiny_dir('llama'))!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "import torch\nassert not torch.cuda.is_available()")
    loaded = _loaded_after(code, {"CUDA_VISIBLE_DEVICES": ""})
    assert loaded["torch._dynamo"], "transformers no longer imports dynamo: tighten this test"
    assert not loaded["triton"] and not loaded["scipy"]
    # in-process callers (tests, notebooks) keep Triton: they may run its kernels later
    loaded = _loaded_after(code.replace("main()", f"main(['info', {str(tiny_dir('llama'))!r}])"),
                           {"CUDA_VISIBLE_DEVICES": ""})
    assert loaded["triton"]


@pytest.mark.slow  # a subprocess pays the full torch import
def test_a_llama_compress_never_imports_transformers(tiny_dir, tiny_calib, tmp_path):
    """squeeze.plain_llama runs the sweep: transformers and torch._dynamo stay out of the process
    (~3 s and ~120 MB on a small model's `squeeze compress`; bench/README.md section 1c)."""
    out = tmp_path / "out"
    code = ("import sys\nfrom squeeze.cli.main import main\n"
            f"sys.argv = ['squeeze', 'compress', {str(tiny_dir('llama'))!r}, '--method', 'sparsegpt', '--pattern', "
            f"'2:4', '--quantize', 'int8', '--calib', {str(tiny_calib)!r}, '--nsamples', '4', '--seqlen', '32', "
            f"'--eval-data', 'none', '--out', {str(out)!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n")
    loaded = _loaded_after(code)
    assert (out / "squeeze.json").is_file()
    assert loaded["torch"] and not loaded["transformers"] and not loaded["torch._dynamo"], loaded
