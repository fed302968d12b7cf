"""Every command's ``--help`` renders, with its help texts intact.

typer's rich markup mode used to parse ``[...]`` in help texts as style tags and drop them ("Fine-tune
LoRA + projector on [soft tokens + prompt] -> target" printed as "on  -> target"); the root app now renders
help as plain text. The commands are found by walking the click group that typer builds from the app, so a
new command is checked without touching this file.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from oncofm.cli import app

BRACKETED = re.compile(r"\[[^\[\]\n]*\]")


def _walk(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, command) of ``command`` and every command below it (typer ships its own copy of click, so
    groups are recognised by their ``commands``, not by ``isinstance(click.Group)``)."""
    found = [(path, command)]
    if isinstance(getattr(command, "commands", None), dict):
        for name, sub in command.commands.items():
            found += _walk(sub, (*path, name))
    return found


COMMANDS = _walk(typer.main.get_command(app))


def _bracketed(command: Any) -> list[str]:
    """The ``[...]`` spans of a command's own help texts (docstring up to ``\\f``, option/argument help)."""
    texts = [(command.help or "").split("\f")[0]]
    texts += [getattr(p, "help", None) or "" for p in command.params if not getattr(p, "hidden", False)]
    return [m for t in texts for m in BRACKETED.findall(t)]


def _squash(text: str) -> str:
    return "".join(text.split())  # help is re-wrapped (at spaces and hyphens): compare without whitespace


def test_commands_are_found() -> None:
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"", "train", "train fusion", "train omics", "train slide", "demo"} <= names
    # the texts this test protects exist in the sources (otherwise it would pass vacuously)
    by_name = {" ".join(p): c for p, c in COMMANDS}
    assert "[soft tokens + prompt]" in _bracketed(by_name["train fusion"])


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "oncofm")
def test_help_renders_with_its_bracketed_words(path: tuple[str, ...]) -> None:
    command = dict(COMMANDS)[path]
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    out = _squash(result.output)
    missing = [b for b in _bracketed(command) if _squash(b) not in out]
    assert not missing, f"`oncofm {' '.join(path)} --help` lost {missing}:\n{result.output}"


def test_usage_error_is_a_message_not_a_traceback() -> None:
    """A missing option prints click's usage message and exits 2 (typer bundles its own click)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "oncofm", "train", "slide"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert "Missing option '--run'" in res.stderr and "Traceback" not in res.stderr
