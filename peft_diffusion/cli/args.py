"""What every command's flags share: TRL's parser with one-line errors, flags derived from a config class, the
registered names of registry-valued flags, the `--threshold` rule and `--dtype`.

Every command parses dataclasses with TRL's `TrlParser` (transformers' `HfArgumentParser` plus `--config
file.yaml`; flags override the file). A flag argparse cannot parse raises `UsageError` (exit code 2); bad input the
command finds itself raises `CommandError` (exit code 1); `main.py` prints either as one line.

A setting of the model is declared once, in its config class: `config_arguments` turns the class's own fields (type,
default, and the description from its docstring's `Args:`) into flags, and a command's recipe states where it departs
from those defaults as parser defaults (`defaults.CONVERT_DEFAULTS`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import typing


class CommandError(Exception):
    """Bad input found by the CLI itself: printed as one line, exit code 1."""


class UsageError(Exception):
    """A flag argparse could not parse: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Flags from a config class
# ----------------------------------------------------------------------------------------------------------------


def docstring_args(doc: str | None) -> dict[str, str]:
    """`{name: description}` from the `Args:` section of an HF-format docstring, each description on one line.

    Entries are `name (`type`, ...):` lines, one indent inside `Args:`, followed by their deeper-indented description;
    the section ends at the next line without indent (`Returns:`, `Example:`).
    """
    helps: dict[str, str] = {}
    name, in_args = None, False
    for line in inspect.cleandoc(doc or "").splitlines():
        if not line.startswith(" ") and line.strip():
            in_args, name = line.strip() == "Args:", None
            continue
        entry = re.match(r"^ {4}(\w+) \(.*\):\s*$", line)
        if in_args and entry:
            name = entry.group(1)
            helps[name] = ""
        elif in_args and name is not None and line.strip():
            helps[name] = f"{helps[name]} {line.strip()}".strip()
    return helps


def config_arguments(config_class: type, name: str, *, exclude: tuple[str, ...] = (), module: str = __name__) -> type:
    """A dataclass of flags for the fields `config_class` declares itself, with a `to_config()` that builds it.

    Each flag takes the field's type and default (`dataclasses.fields`; a transformers config is a dataclass) and, as
    its help, the field's description in the class docstring (`docstring_args`). Fields inherited from the base class
    are not flags; `exclude` leaves out declared fields that no flag can set.

    Args:
        config_class (`type`): a dataclass config, e.g. `DiffusionConfig`.
        name (`str`): the name of the new class.
        exclude (`tuple[str, ...]`, defaults to `()`): declared fields left out.
        module (`str`): the module the new class reports as its home (`__module__`).

    Returns:
        `type`: the dataclass, whose `to_config()` returns `config_class(**fields)` (validated by the config).
    """
    own = {key: value for key, value in config_class.__annotations__.items() if key not in exclude}
    # The annotations are strings (`from __future__ import annotations`): resolve them in the config's module.
    stand_in = type(name, (), {"__annotations__": own, "__module__": config_class.__module__})
    types = typing.get_type_hints(stand_in)
    declared = {item.name: item for item in dataclasses.fields(config_class)}
    helps = docstring_args(config_class.__doc__)
    specs = [
        (
            key,
            types[key],
            dataclasses.field(
                default=declared[key].default,
                default_factory=declared[key].default_factory,
                metadata={"help": helps.get(key, "").replace("%", "%%")},  # argparse formats help with %
            ),
        )
        for key in own
    ]

    def to_config(self):
        return config_class(**{item.name: getattr(self, item.name) for item in dataclasses.fields(self)})

    to_config.__doc__ = f"The `{config_class.__name__}` these flags describe (validated at construction)."
    cls = dataclasses.make_dataclass(name, specs, namespace={"to_config": to_config})
    cls.__module__ = module
    cls.__doc__ = f"The fields of `{config_class.__name__}` as flags (derived from the class: types, defaults, help)."
    return cls


# ----------------------------------------------------------------------------------------------------------------
# Registry-valued flags
# ----------------------------------------------------------------------------------------------------------------

# argparse checks these against the registry (exit code 2). `--sampler` lists the registered names in its help and is
# checked where decoding checks it, by `DiffusionGenerationConfig` (exit code 1, the message names the fix).
CHECKED_BY_ARGPARSE = ("attention", "noise_schedule", "masking")


def registered_names() -> dict[str, list[str]]:
    """The values each registry-valued flag accepts: the names registered when this is called.

    Parsers are built when a command runs, so an attention pattern, noise schedule, masking policy or sampler
    registered (`@register_attention_pattern`, ...) before `main` is called is a valid value.
    """
    from ..attention import selectable_patterns
    from ..corruption import MASKING_POLICIES
    from ..noise import NOISE_SCHEDULES
    from ..samplers import SAMPLERS

    return {
        "attention": selectable_patterns(),
        "noise_schedule": sorted(NOISE_SCHEDULES),
        "masking": sorted(MASKING_POLICIES),
        "sampler": sorted(SAMPLERS),
    }


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------


def build_parser(dataclass_types, prog: str, defaults: dict | None = None):
    """A `TrlParser` over `dataclass_types` whose errors raise `UsageError` instead of exiting.

    `defaults` replace the dataclasses' defaults (a command's recipe); a `--config` file and flags override both.
    Registry-valued flags get the names registered now (`registered_names`).
    """
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message):  # argparse prints usage and exits; one line is enough
            raise UsageError(message)

    parser = Parser(dataclass_types, prog=prog)
    if defaults:
        parser.set_defaults(**defaults)
    names = registered_names()
    for action in parser._actions:
        if action.dest in CHECKED_BY_ARGPARSE:
            action.choices = names[action.dest]
        elif action.dest in names:
            action.help = f"{action.help} One of: {', '.join(names[action.dest])}."
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
        _check_yaml_mapping(argv[index + 1])
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:
        message = str(error)
        if "not used by the HfArgumentParser" in message or "Unknown arguments" in message:
            raise UsageError(f"unrecognized arguments: {message.split(':', 1)[-1].strip()}") from error
        raise


def _check_yaml_mapping(path: str) -> None:
    """Raise `UsageError` naming the line and column when `path` is not YAML, and when it holds no `flag: value`
    mapping (TRL's parser would print a YAML traceback)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UsageError(f"--config {path!r} is not valid YAML: {problem}{where}.") from error
    except UnicodeDecodeError as error:
        raise UsageError(f"--config {path!r} is not a text file ({error}).") from error
    if not isinstance(content, dict):
        got = "an empty file" if content is None else f"a {type(content).__name__}"
        raise UsageError(f"--config {path!r} must hold a YAML mapping of `flag: value` lines, got {got}.")


# ----------------------------------------------------------------------------------------------------------------
# Values the flags spell differently from the library
# ----------------------------------------------------------------------------------------------------------------

THRESHOLD_HELP = (
    "Fast-dLLM confidence threshold in (0, 1]: each step commits every position at least this confident (at least "
    "one); 0 turns it off (a fixed number of tokens per step)."
)


def threshold_field(default: float, purpose: str = ""):
    """A `--threshold` flag (`decoding_threshold` turns its value into `DiffusionGenerationConfig.threshold`)."""
    return dataclasses.field(default=default, metadata={"help": f"{purpose}{THRESHOLD_HELP}"})


def decoding_threshold(flag: float | None) -> float | None:
    """`DiffusionGenerationConfig.threshold` for a `--threshold` flag value: 0 (or None) is off, i.e. None.

    The library spells "no threshold" None; a flag of type float cannot, so the CLI spells it 0 (never a valid
    threshold, which lies in (0, 1]). Other values pass through and the generation config validates them.
    """
    return flag if flag else None


def torch_dtype(name: str | None):
    """The `torch.dtype` named by a `--dtype` flag; None for "auto" or no flag."""
    import torch

    if name in (None, "auto"):
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise CommandError(f"--dtype {name!r} is not a torch dtype; use float32, bfloat16 or float16.")
    return value
