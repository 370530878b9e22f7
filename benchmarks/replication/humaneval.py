"""HumanEval infilling (DiffuLLaMA, Gong et al., arXiv 2410.17891, Table 1): test programs, their execution, pass@1.

Replication code, not library code, imported as `humaneval` with `benchmarks/replication/` on `sys.path` (as
`metrics.py` is). `run_program` executes generated code in a subprocess: read its docstring before running it on
model output.

| symbol    | meaning                                                                                       |
|-----------|-----------------------------------------------------------------------------------------------|
| `pass@1`  | #{programs passing their tests} / #{problems}, one sampled completion per problem             |
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_HUMANEVAL_INFILLING_KEYS = ("prompt", "suffix", "test", "entry_point")


# ---------------------------------------------------------------------------------------------------------------------
# Code infilling (HumanEval-infilling): program execution and pass@1
# ---------------------------------------------------------------------------------------------------------------------


def humaneval_infilling_program(problem: dict[str, Any], completion: str) -> str:
    """Build the test program of a HumanEval-infilling record with `completion` as the missing middle.

    The program is `prompt + completion + suffix`, then the record's `test` (which defines `check`), then
    `check(entry_point)`, the layout of openai/human-eval-infilling.

    Args:
        problem (`dict`):
            A record with the keys `prompt` (the prefix), `suffix`, `test` and `entry_point` (`canonical_solution`,
            the gold middle, is not read).
        completion (`str`):
            The infilled middle, including its trailing newline.

    Returns:
        `str`: Python source that exits with status 0 iff the tests pass.

    Raises:
        `ValueError`: a required key is missing.

    Example:

    ```python
    >>> from humaneval import humaneval_infilling_program, run_program
    >>> problem = {"prompt": "def inc(x):\\n", "suffix": "", "entry_point": "inc",
    ...            "test": "def check(f):\\n    assert f(1) == 2\\n"}
    >>> run_program(humaneval_infilling_program(problem, "    return x + 1\\n"), timeout=5.0)
    True

    ```
    """
    missing = [key for key in _HUMANEVAL_INFILLING_KEYS if key not in problem]
    if missing:
        raise ValueError(
            f"`problem` must be a HumanEval-infilling record with keys {list(_HUMANEVAL_INFILLING_KEYS)}, "
            f"missing {missing}."
        )
    return (
        problem["prompt"]
        + completion
        + problem["suffix"]
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})\n"
    )


def run_program(code: str, timeout: float = 5.0) -> bool:
    """Run Python source in a fresh interpreter and report whether it exits cleanly.

    The program runs as `sys.executable -I program.py` (isolated mode: no user site-packages, no `PYTHON*`
    environment variables, the script's directory not on `sys.path` before the standard library) inside a temporary
    directory that is deleted afterwards, with stdin closed and its output discarded. It runs in its own process
    session; on timeout the whole session is killed, so a program that forks cannot outlive it (POSIX).

    This is not a sandbox: the code can still read and write the file system and the network. Only run model
    generations on a machine you are ready to lose, as openai/human-eval warns.

    Args:
        code (`str`):
            The Python source.
        timeout (`float`, defaults to 5.0):
            Seconds of wall time before the program is killed and counted as failed; positive.

    Returns:
        `bool`: True iff the program exited with status 0 within `timeout`.

    Raises:
        `ValueError`: `timeout` is not positive.

    Example:

    ```python
    >>> from humaneval import run_program
    >>> run_program("assert 1 + 1 == 2", timeout=5.0), run_program("assert 1 + 1 == 3", timeout=5.0)
    (True, False)

    ```
    """
    if timeout <= 0:
        raise ValueError(f"`timeout` must be a positive number of seconds, got timeout={timeout}.")
    with tempfile.TemporaryDirectory(prefix="peft_diffusion_exec_") as workdir:
        program = Path(workdir) / "program.py"
        program.write_text(code, encoding="utf-8")
        process = subprocess.Popen(
            [sys.executable, "-I", str(program)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return process.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            _kill_session(process)
            return False


def _kill_session(process: subprocess.Popen) -> None:
    """Kill a timed-out program and everything it started, then reap it."""
    if os.name == "posix":
        try:
            os.killpg(process.pid, signal.SIGKILL)  # start_new_session made the pid the process-group id
        except ProcessLookupError:
            pass
    else:
        process.kill()
    process.wait()


def pass_at_1(programs: Sequence[str], *, timeout: float = 5.0) -> tuple[float, list[bool]]:
    """pass@1 = #{programs passing their tests} / #{problems}, with one sampled completion per problem.

    Each program (e.g. from `humaneval_infilling_program`) runs with `run_program`, one after another.

    Args:
        programs (`Sequence[str]`):
            One complete test program per problem.
        timeout (`float`, defaults to 5.0):
            Seconds allowed per program.

    Returns:
        `tuple[float, list[bool]]`: The pass rate and the per-program outcomes, in order.

    Raises:
        `ValueError`: `programs` is empty or `timeout` is not positive.

    Example:

    ```python
    >>> from humaneval import pass_at_1
    >>> pass_at_1(["assert True", "raise SystemExit(1)"], timeout=5.0)
    (0.5, [True, False])

    ```
    """
    if isinstance(programs, str):
        raise TypeError("`programs` must be a list of programs, got a single string; wrap it in a list.")
    if not programs:
        raise ValueError("`programs` must hold at least one program, got none.")
    if timeout <= 0:
        raise ValueError(f"`timeout` must be a positive number of seconds, got timeout={timeout}.")
    passed = [run_program(program, timeout=timeout) for program in programs]
    return sum(passed) / len(passed), passed
