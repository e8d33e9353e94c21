"""The habits of the platform's command line (``ingest``), as of gateway.py's
(tests/test_cli_habits.py): help on every option, examples at the end of every command's
help, each of which parses."""

from __future__ import annotations

import argparse
import shlex

import pytest

from central.cli import build_parser
from central.examples import EXAMPLES, commands

PROG = "ingest"


def test_every_option_has_help() -> None:
    missing = [f"{PROG} {path}: {'/'.join(a.option_strings) or a.dest}"
               for path, parser in commands(build_parser(PROG)) for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction)
               and not (a.help and a.help.strip() and a.help != argparse.SUPPRESS)]
    assert missing == []


def test_every_command_has_examples_and_no_example_is_for_a_command_that_is_gone() -> None:
    paths = [path for path, _ in commands(build_parser(PROG))]
    assert [p for p in paths if p not in EXAMPLES] == []
    assert [p for p in EXAMPLES if p not in paths] == []


@pytest.mark.parametrize("path", sorted(EXAMPLES))
def test_each_example_parses_to_its_command(path: str) -> None:
    parser = build_parser(PROG)
    sub = dict(commands(parser))[path]
    assert sub.epilog is not None
    assert sub.epilog.startswith("examples:\n")
    assert f"examples:\n  {PROG} " in sub.format_help()  # kept as written
    for line in sub.epilog.splitlines()[1:]:
        argv = shlex.split(line.strip().removeprefix(f"{PROG} ").split("#")[0])
        words = path.split()
        if words and words[0] != "command":
            assert argv[:len(words)] == words, line
        args = parser.parse_args(argv)  # exits (a failure) when it does not parse
        assert args.command == argv[0], line
