"""The two kinds of failure every command reports the same way (imgxlate.guard): a command that could not run
(exit 2, one line) and a run stopped before its end, by a signal (exit 128 + the signal) or because DST failed
(exit 75). Each error class lives beside the concept that raises it and says which kind it is by subclassing
one of these."""

from __future__ import annotations


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (whitespace runs made one space), cut at ``limit`` characters."""
    return " ".join(str(e).split())[:limit]


class CannotRun(Exception):
    """The command could not run as asked (bad source, unusable destination, bad model, no data): nothing was
    done, and the message says what to change."""


class Stopped(Exception):
    """The run stopped before its end after recording what it did: a SIGTERM / SIGINT, or DST failing (full, over
    quota, read-only, ...). The message says what was done and what is left; ``not_started``: how many inputs a
    rerun still has to do; ``exit_code``: the command's exit status; ``advice``: what to do, ending the command's
    one line."""

    def __init__(self, message: str, not_started: int, exit_code: int,
                 advice: str = "rerun the same command to finish"):
        super().__init__(message)
        self.not_started, self.exit_code, self.advice = not_started, exit_code, advice


class SecondSignal(KeyboardInterrupt):
    """A second SIGTERM / SIGINT during a drain: the run stops without draining; exit 128 + ``signum``."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"second {signal.Signals(signum).name}: stopping without draining")
        self.signum = int(signum)
