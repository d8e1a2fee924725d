"""Help that teaches: full one-line summaries in `squeeze --help`, every method a flag accepts
(from the registry) and examples that parse and match the README in each command's `--help`,
one-line errors for a method compress does not take, and no warnings from our own calls."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from squeeze.cli.helptext import EXAMPLES
from squeeze.cli.main import cli, main
from squeeze.passes.base import COMMANDS, PRESETS, REGISTRY, compress_names

README = Path(__file__).resolve().parents[1] / "README.md"


def help_text(*args, width=80):
    r = CliRunner().invoke(cli, [*args, "--help"], terminal_width=width)
    assert r.exit_code == 0, r.output
    return r.output


def flat(text):
    return " ".join(text.split())  # help text wraps anywhere: compare with whitespace collapsed


def test_group_help_fits_80_columns():
    out = help_text()
    rows = out.split("Commands:\n", 1)[1].rstrip("\n").split("\n")
    assert sorted(r.split()[0] for r in rows) == sorted(cli.commands), rows  # one line per command
    for row in rows:
        assert not row.rstrip().endswith("..."), f"cut off: {row!r}"
        assert len(row) <= 80, f"wider than 80 columns: {row!r}"
    # ("[ARGS]..." in the usage line is click's notation for "more arguments", not a cut)
    assert not any(line.rstrip().endswith("...") for line in out.splitlines()
                   if not line.startswith("Usage:"))


@pytest.mark.parametrize("width", [80, 200])
def test_short_help_is_whole_first_line(width):
    """What `squeeze --help` shows is the docstring's first line, word for word (nothing cut)."""
    out = help_text(width=width)
    for name, cmd in cli.commands.items():
        first = cmd.help.strip().splitlines()[0]
        assert f"{name}  " in out and first in out, (name, first)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_command_help_has_examples(name):
    assert name in cli.commands
    out = help_text(name)
    assert "Examples:" in out
    for line in EXAMPLES[name]:
        assert f"    {line}\n" in out, line  # kept whole, not re-wrapped


def test_every_command_has_examples():
    assert set(EXAMPLES) == set(cli.commands)
    assert all(2 <= len(v) <= 4 for v in EXAMPLES.values())


def test_compress_help_lists_every_method_it_accepts():
    import squeeze.passes  # noqa: F401

    methods = compress_names("--method")
    repairs = compress_names("--repair")
    # every registered method and preset is reachable from compress by exactly one flag
    for name, cls in REGISTRY.items():
        assert cls.flag in ("--method", "--repair", "--quantize"), name
    assert set(methods) == {n for n, c in REGISTRY.items() if c.flag == "--method"} | set(PRESETS)
    assert {"wanda", "sparsegpt", "magnitude", "dass", "teal", "wina", "drelu"} <= set(methods)
    assert "quantize" not in methods and "dsnot" not in methods and "layerskip" not in methods
    assert repairs == ["dsnot"]
    out = flat(help_text("compress"))
    assert f"The method to run: {', '.join(methods)} (" in out
    assert f"pattern: {', '.join(repairs)} (DSnoT)" in out
    assert "squeeze finetune" in out and "--quantize" in out


def _readme_commands():
    """The README's "Command line" block: one command per line, comments dropped."""
    text = README.read_text()
    block = text.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("squeeze ")]


def _forms(line):
    """The commands a README line stands for: its `[...]` parts each present or not."""
    parts = re.split(r"(\[[^\]]*\])", line)
    forms = [""]
    for p in parts:
        if p.startswith("["):
            forms = [f + alt for f in forms for alt in ("", " " + p[1:-1] + " ")]
        else:
            forms = [f + p for f in forms]
    return {" ".join(f.split()) for f in forms}


def test_examples_are_readme_commands():
    forms = set().union(*map(_forms, _readme_commands()))
    for name, lines in EXAMPLES.items():
        for line in lines:
            words = line.split()
            # the line itself, or its start (README lines may set more flags than an example)
            assert any(f == line or f.split()[:len(words)] == words for f in forms), (name, line)


@pytest.mark.parametrize("line", sorted({x for v in EXAMPLES.values() for x in v}))
def test_examples_parse(line, tmp_path):
    """Each example names real options with valid values (click parses it; nothing runs)."""
    words = shlex.split(line)[1:]
    cmd = cli.commands[words[0]]
    subst = {"MODEL_DIR": str(tmp_path / "m"), "OUT": str(tmp_path / "o"), "OUT2": str(tmp_path / "o2"),
             "OUT_CT": str(tmp_path / "ct"), "SRC": str(tmp_path / "d.jsonl"), "F": str(tmp_path / "f.json")}
    ctx = cmd.make_context(words[0], [subst.get(w, w) for w in words[1:]])
    assert ctx.params


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("flag,value,needles", [
    ("--method", "wand", ["unknown method 'wand': did you mean 'wanda'?", "--method accepts: "]),
    ("--method", "sparsegtp", ["did you mean 'sparsegpt'?"]),
    ("--method", "frobnicate", ["unknown method 'frobnicate': --method accepts: "]),
    ("--method", "layerskip", ["run `squeeze finetune --help`"]),
    ("--method", "recover", ["run `squeeze recover --help`"]),
    ("--method", "quantize", ["compress runs it with --quantize"]),
    ("--method", "dsnot", ["compress runs it with --repair"]),
    ("--method", "owl", ["--sparsity-profile owl"]),
    ("--repair", "dsnt", ["did you mean 'dsnot'?", "--repair accepts: dsnot"]),
    ("--repair", "wanda", ["compress runs it with --method"]),
])
def test_method_not_accepted_is_one_line(flag, value, needles, tmp_path, capsys):
    args = ["compress", str(tmp_path / "model"), "--out", str(tmp_path / "o"), flag, value,
            "--pattern", "2:4"]
    if flag == "--repair":
        args += ["--method", "wanda"]
    code, err = run_cli(args, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    if "accepts: " in err:  # the list is exactly what the flag takes
        assert err.split("accepts: ", 1)[1].split(", ") == compress_names(flag)
    assert not (tmp_path / "o").exists()


def test_python_api_unknown_method_suggests():
    from squeeze.errors import SqueezeError
    from squeeze.passes.base import get_pass

    with pytest.raises(SqueezeError, match="unknown method 'wnda': did you mean 'wanda'"):
        get_pass("wnda")
    for name in COMMANDS:
        if name not in REGISTRY:
            with pytest.raises(SqueezeError, match="its own command"):
                get_pass(name)


def test_accepted_method_names_parse():
    cmd = cli.commands["compress"]
    for name in compress_names("--method"):
        assert cmd.make_context("compress", ["--method", name]).params["method"] == name


# -- no warnings from our own calls --------------------------------------------------------------
def _squeeze(args, tmp_path):
    exe = shutil.which("squeeze") or str(Path(sys.executable).parent / "squeeze")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # what a user's shell has
    # show every warning once per place, DeprecationWarnings included (Python hides those by default)
    env.update(PYTHONWARNINGS="default", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.slow  # subprocesses pay the full import
def test_generate_and_tune_exit_print_no_warnings(tiny_dir, tiny_calib, tmp_path):
    src = str(tiny_dir("llama"))
    for args in (["generate", src, "--prompt-ids", "1,2,3", "--max-new-tokens", "8"],
                 ["generate", src, "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--self-speculative",
                  "--compare"],
                 ["tune-exit", src, "--calib", str(tiny_calib), "--out", str(tmp_path / "te"),
                  "--nprompts", "1", "--prompt-len", "8", "--max-new-tokens", "4", "--ks", "1,2"]):
        r = _squeeze(args, tmp_path)
        assert "warn" not in r.stderr.lower(), (args[0], r.stderr[-2000:])
