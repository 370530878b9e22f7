"""The `peft-diffusion` command: dispatch to `convert`, `generate`, `eval`; one-line errors; quiet libraries.

    peft-diffusion convert                       # SmolLM2-135M-Instruct on the standard library, LoRA, ~10 min on CPU
    peft-diffusion generate --model SmolLM2-135M-Instruct-diffusion --chat "What is the capital of France?"
    peft-diffusion eval --model SmolLM2-135M-Instruct-diffusion

Bad input ends with one line on stderr and a non-zero exit (`--debug` or `PEFT_DIFFUSION_DEBUG=1` shows the
traceback and the libraries' warnings).
"""

from __future__ import annotations

import os
import sys

from .args import CommandError, UsageError
from .convert import convert
from .eval import evaluate
from .generate import generate

DEBUG_ENV = "PEFT_DIFFUSION_DEBUG"

EXIT_USAGE = 2
EXIT_ERROR = 1
# Libraries that log through the standard `logging` module without a handler of their own, so Python prints their
# warnings on stderr (TRL's packing notes, PEFT's and bitsandbytes' notices).
QUIETED_LOGGERS = ("accelerate", "bitsandbytes", "peft", "trl")
# Errors that are the input's fault and say so themselves: printed as they are. Anything else is printed with its
# type and a pointer to `--debug`.
INPUT_ERRORS = (CommandError, ValueError, TypeError, FileNotFoundError, OSError, ImportError, KeyError)

COMMANDS = {
    "convert": (convert, "convert a causal checkpoint into a diffusion LM (train + save + demo)"),
    "generate": (generate, "generate from a converted model, with a live view of the denoising"),
    "eval": (evaluate, "held-out NLL bound beside the AR base, or lm-eval tasks (--tasks)"),
}


def _usage() -> str:
    lines = ["usage: peft-diffusion {convert,generate,eval} [flags] [--config file.yaml] [--debug]", ""]
    lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`peft-diffusion <command> --help` lists the flags of a command."]
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Keep the terminal for our output: no library warnings (`--debug` shows everything).

    Warnings only: every progress bar stays (loading and GGUF conversion, dataset preparation, training,
    evaluation). `transformers.utils.logging.disable_progress_bar()` and `datasets.disable_progress_bars()` are not
    called: they hide the bars of transformers (weights, GGUF dequantization), datasets and huggingface_hub.
    """
    import logging
    import warnings

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    # datasets also logs a parser's failure before raising it, and the command prints that error in its own line
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _one_line_error(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0, 1 for bad input or a failed run, 2 for unparsable flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"peft-diffusion: error: unknown command {command!r}; use one of {sorted(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:
        _quiet_libraries()
    try:
        return COMMANDS[command][0](rest)
    except UsageError as error:
        if debug:
            raise
        print(f"peft-diffusion {command}: error: {_one_line_error(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as error:
        # DiffusionTrainer names the checkpoint it saved on the first Ctrl-C (and how to resume) in the message
        detail = f": {error}" if str(error) else ""
        print(f"\npeft-diffusion {command}: interrupted{detail}", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        message = _one_line_error(error)
        if not isinstance(error, INPUT_ERRORS):
            message = f"{type(error).__name__}: {message} (--debug shows the traceback)"
        print(f"peft-diffusion {command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def entry_point() -> None:
    """The `peft-diffusion` console script."""
    sys.exit(main())
