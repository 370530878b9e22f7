"""What every command's flags share: TRL's parser with one-line errors, `--config` checks, `--dtype`.

Every command parses dataclasses with TRL's `TrlParser` (transformers' `HfArgumentParser` plus `--config
file.yaml`; flags override the file). A flag argparse cannot parse raises `UsageError` (exit code 2); bad input the
command finds itself raises `CommandError` (exit code 1); `main.py` prints either as one line.
"""

from __future__ import annotations

import os


class CommandError(Exception):
    """Bad input found by the CLI itself: printed as one line, exit code 1."""


class UsageError(Exception):
    """A flag argparse could not parse: printed as one line, exit code 2."""


def build_parser(dataclass_types, prog: str, defaults: dict | None = None):
    """A `TrlParser` over `dataclass_types` whose errors raise `UsageError` instead of exiting."""
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message):  # argparse prints usage and exits; one line is enough
            raise UsageError(message)

    parser = Parser(dataclass_types, prog=prog)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def add_alias(parser, dest: str, alias: str) -> None:
    """Give an existing option a second spelling (e.g. `--model` for TRL's `--model_name_or_path`)."""
    for action in parser._actions:
        if action.dest == dest:
            action.option_strings.append(alias)
            parser._option_string_actions[alias] = action
            return


def parse(parser, argv: list[str]) -> tuple:
    """Parse flags (and `--config file.yaml`): unknown flags and unreadable configs become one-line errors."""
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UsageError("--config needs a YAML file path")
        if not os.path.isfile(argv[index + 1]):
            raise UsageError(f"--config {argv[index + 1]!r}: no such file")
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:
        message = str(error)
        if "not used by the HfArgumentParser" in message or "Unknown arguments" in message:
            raise UsageError(f"unrecognized arguments: {message.split(':', 1)[-1].strip()}") from error
        raise


def torch_dtype(name: str | None):
    """The `torch.dtype` named by a `--dtype` flag; None for "auto" or no flag."""
    import torch

    if name in (None, "auto"):
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise CommandError(f"--dtype {name!r} is not a torch dtype; use float32, bfloat16 or float16.")
    return value
