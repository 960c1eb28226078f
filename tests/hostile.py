"""Running the real ``distiller`` command line on hostile input, and what a refusal must look like.

Used by the ``test_hostile_*`` modules. Commands run in-process through ``distiller.cli.main``
(the same code as the console script, without an interpreter start per case), with an alarm
so that a hang fails the case instead of the session.
"""

from __future__ import annotations

import contextlib
import io
import signal
from dataclasses import dataclass

from distiller.cli import main

UNEXPECTED = "rerun with --debug"


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("distiller ")]


class Hang(Exception):
    pass


def run(argv: list[str], timeout_s: float = 20.0) -> Outcome:
    """``distiller ARGV`` in this process; a run longer than ``timeout_s`` raises ``Hang``."""

    def alarm(signum, frame):
        raise Hang(f"distiller {' '.join(argv)} ran past {timeout_s} s")

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return Outcome(code, out.getvalue(), err.getvalue())


def refused(argv: list[str], *fragments: str, timeout_s: float = 20.0) -> str:
    """Assert ``distiller ARGV`` refuses its input the way users are promised: a non-zero exit,
    no traceback, exactly one error line, reported where the input entered (not by the CLI's
    last line of defence), containing every fragment (the file, the key or line, what was
    expected). Returns the error line."""
    outcome = run(argv, timeout_s)
    where = f"distiller {' '.join(argv)}"
    assert outcome.code != 0, f"{where}: accepted (exit 0)\n{outcome.stdout}\n{outcome.stderr}"
    assert "Traceback" not in outcome.stderr, f"{where}: traceback\n{outcome.stderr}"
    argparse_usage = outcome.code == 2 and "usage:" in outcome.stderr
    if argparse_usage:
        lines = [line for line in outcome.stderr.splitlines() if ": error: " in line]
    else:
        lines = outcome.error_lines
    assert len(lines) == 1, f"{where}: expected one error line, got\n{outcome.stderr}"
    line = lines[0]
    assert UNEXPECTED not in line, f"{where}: reached the last line of defence: {line}"
    for fragment in fragments:
        assert fragment in line, f"{where}: {fragment!r} not in the message: {line}"
    return line
