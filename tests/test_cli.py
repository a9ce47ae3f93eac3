"""The command line's own surface: `--help` of the program and of every command renders (argparse formats help
strings with %, so a stray "95%" in one of them crashed `jepa4rec --help` for everyone)."""

from __future__ import annotations

import argparse

import pytest

from jepa4rec_dist.cli import build_parser


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in _commands()])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jepa4rec") and len(out) > 100
