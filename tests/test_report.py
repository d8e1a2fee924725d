"""squeeze.report: the one JSON writer (files) and printer (stdout)."""

import json
from pathlib import Path

import pytest
import torch

from squeeze.report import print_json, to_json, write_json


def test_format_is_indented_with_trailing_newline_and_str_fallback():
    text = to_json({"a": [1, 2], "p": Path("/x/y"), "dtype": torch.float16})
    assert text == '{\n  "a": [\n    1,\n    2\n  ],\n  "p": "/x/y",\n  "dtype": "torch.float16"\n}\n'


def test_write_json_replaces_atomically(tmp_path, monkeypatch):
    f = tmp_path / "report.json"
    write_json(f, {"v": 1})
    assert json.loads(f.read_text()) == {"v": 1}
    write_json(f, {"v": 2})
    assert json.loads(f.read_text()) == {"v": 2}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("squeeze.report.os.replace", boom)
    with pytest.raises(OSError):
        write_json(f, {"v": 3})
    assert json.loads(f.read_text()) == {"v": 2}  # the old report is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left


def test_print_json(capsys):
    print_json({"k": "v"})
    assert capsys.readouterr().out == '{\n  "k": "v"\n}\n'
