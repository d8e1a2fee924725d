"""`generate --compare` sets an export beside the dense source its squeeze.json records (or
--reference), and says so when it can only compare a model with its own plain decoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import squeeze
from squeeze.cli.main import cli, main
from squeeze.loading import recorded_source
from squeeze.runtime.speculative import generate


def _run_main(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip()


def _generate(args, tmp_path) -> dict:
    js = tmp_path / "g.json"
    r = CliRunner().invoke(cli, ["generate", *args, "--prompt-ids", "5,6,7", "--max-new-tokens", "8", "--json",
                                 str(js)])
    assert r.exit_code == 0, r.output
    return json.loads(js.read_text())


def test_generate_compare_decodes_the_recorded_source(tiny_pruned, tmp_path):
    src, out = tiny_pruned
    g = _generate([str(out), "--compare"], tmp_path)
    assert g["compared_with"].startswith(f"source {Path(src).resolve()}")
    theirs = generate(squeeze.load(src), [5, 6, 7], 8)[0, 3:].tolist()
    same = [a == b for a, b in zip(g["new_ids"], theirs)]
    assert g["identical_to_reference"] == sum(same) / 8
    assert g["identical_prefix"] == (same.index(False) if False in same else 8)
    assert g["speedup"] == pytest.approx(g["tokens_per_s"] / g["reference_tokens_per_s"])
    assert "plain_tokens_per_s" not in g


def test_generate_compare_without_a_source_is_plain_decoding_of_itself(tiny_pruned, tmp_path):
    src, _ = tiny_pruned
    g = _generate([str(src), "--compare"], tmp_path)
    assert g["compared_with"] == "plain decoding of this model (no source recorded; pass --reference)"
    assert g["identical_to_plain"] is True and "reference_tokens_per_s" not in g
    # --reference (implies --compare): the dense model against itself agrees on every token
    g = _generate([str(src), "--reference", str(src)], tmp_path)
    assert g["compared_with"].startswith("--reference") and g["identical_to_reference"] == 1.0
    assert g["identical_prefix"] == 8


def test_generate_compare_bad_reference_is_one_line(tiny_pruned, tiny_dir, capsys):
    src, out = tiny_pruned
    code, err = _run_main(["generate", str(out), "--prompt-ids", "5,6", "--reference", str(tiny_dir("gpt2"))],
                          capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "gpt2" in err, err


def _folder(path: Path, source=None) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    if source is not None:
        (path / "squeeze.json").write_text(json.dumps({"source": source}))
    return path


def test_recorded_source_follows_exports_of_exports(tmp_path):
    dense = _folder(tmp_path / "dense")
    first = _folder(tmp_path / "first", {"path": str(dense), "model_type": "llama"})  # compress / recover
    second = _folder(tmp_path / "second", str(first))  # drop-layers / finetune record a plain path
    assert recorded_source(second) == (dense.resolve(), None)
    assert recorded_source(first) == (dense.resolve(), None)
    assert recorded_source(dense) == (None, "no source recorded")
    shutil.rmtree(dense)
    src, why = recorded_source(second)
    assert src is None and why == f"source {dense} recorded but not found"
