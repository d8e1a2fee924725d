"""What ``--help`` teaches: the method names each compress flag accepts (from the pass registry)
and each command's examples.

The examples are the README's "Command line" lines (tests/test_cli_help.py checks that each
one is there, and that each parses), written with the README's placeholders: MODEL_DIR (a
Hugging Face checkpoint folder), OUT / OUT2 (export folders), SRC (data, the forms of --calib).
"""

from __future__ import annotations

import click

EXAMPLES = {
    "compress": [
        "squeeze compress",
        "squeeze compress MODEL_DIR --out OUT --method wanda --pattern 2:4",
        "squeeze compress MODEL_DIR --out OUT --recipe best-2:4 --calib SRC",
        "squeeze compress MODEL_DIR --out OUT --quantize int8",
    ],
    "recipes": [
        "squeeze recipes",
        "squeeze recipes --show best-2:4",
        "squeeze compress MODEL_DIR --out OUT --recipe best-2:4 --calib SRC",
    ],
    "convert": [
        "squeeze compress MODEL_DIR --out OUT --quantize int8",
        "squeeze convert OUT --out OUT_CT",
    ],
    "recover": [
        "squeeze compress MODEL_DIR --out OUT --method wanda --pattern 2:4",
        "squeeze recover OUT --reference MODEL_DIR --out OUT2 --steps 100",
    ],
    "finetune": [
        "squeeze finetune MODEL_DIR --recipe layerskip --calib SRC --steps 100 --out OUT",
        "squeeze tune-exit OUT --calib SRC",
        "squeeze generate OUT --prompt-ids 1,2,3 --max-new-tokens 64 --self-speculative",
    ],
    "tune-exit": [
        "squeeze finetune MODEL_DIR --recipe layerskip --calib SRC --steps 100 --out OUT",
        "squeeze tune-exit OUT --calib SRC",
    ],
    "generate": [
        "squeeze generate OUT --prompt-ids 1,2,3 --max-new-tokens 64",
        "squeeze generate OUT --prompt-ids 1,2,3 --max-new-tokens 64 --self-speculative --compare",
        "squeeze generate OUT --prompt-ids 1,2,3 --compare --reference MODEL_DIR",
    ],
    "drop-layers": [
        "squeeze drop-layers MODEL_DIR --remove 2 --by importance --calib SRC --out OUT",
        "squeeze drop-layers MODEL_DIR --remove 2 --by even --out OUT",
    ],
    "eval": [
        "squeeze eval OUT --data SRC --reference MODEL_DIR",
        "squeeze eval OUT --data SRC --reference MODEL_DIR --activation-stats",
        "squeeze eval OUT --data SRC --reference MODEL_DIR --json F",
    ],
    "info": [
        "squeeze info OUT",
        "squeeze info OUT --json",
        "squeeze info OUT --threads 1",
    ],
    "bench": [
        "squeeze bench OUT OUT2 --reference MODEL_DIR",
        "squeeze bench OUT OUT2 --reference MODEL_DIR --rounds 5 --threads 1 --json F --png F.png",
        "squeeze bench OUT --reference MODEL_DIR --eval-data SRC --new-tokens 64 --prompt-len 32",
    ],
}


def examples(command: str) -> str:
    """The epilog of ``command``: its examples, one per line, kept as written (``\\b`` stops click
    from re-wrapping the paragraph)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[command])


class MethodName(click.ParamType):
    """A method name for one compress flag (``--method``, ``--repair``), checked against the pass
    registry. The registry imports torch, so it is read only when a command parses or shows the
    flag: ``squeeze --help`` and commands that never compress stay quick.

    A name compress does not take is a :class:`squeeze.SqueezeError`, not a click error: one line
    (the nearest name, or the command or flag to use instead) and exit code 2, like every other
    user mistake."""

    name = "method"

    def __init__(self, flag: str):
        self.flag = flag

    def names(self) -> list[str]:
        from squeeze.passes.base import compress_names

        return compress_names(self.flag)

    def get_metavar(self, param, ctx=None) -> str:
        return "NAME"  # the names go into the help text (MethodOption): a [a|b|...] list overflows 80 columns

    def convert(self, value, param, ctx):
        from squeeze.passes.base import check_compress_name

        return check_compress_name(str(value).strip(), self.flag)

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(n) for n in self.names() if n.startswith(incomplete)]


class MethodOption(click.Option):
    """An option of type :class:`MethodName` whose help lists the names it accepts (``{names}`` in
    its help text), read from the registry when the help is shown: a new method is listed without
    editing the CLI."""

    def get_help_record(self, ctx):
        stated = self.help or ""
        self.help = stated.replace("{names}", ", ".join(self.type.names()))
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = stated
