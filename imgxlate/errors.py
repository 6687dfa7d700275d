"""The two kinds of failure every command reports the same way (imgxlate.guard): a command that could not run
(exit 2, one line) and a run stopped by a signal (exit 128 + the signal). Each error class lives beside the
concept that raises it and says which kind it is by subclassing one of these."""

from __future__ import annotations


class CannotRun(Exception):
    """The command could not run as asked (bad source, unusable destination, bad model, no data): nothing was
    done, and the message says what to change."""


class Stopped(Exception):
    """A SIGTERM / SIGINT stopped the run after recording what it did; ``signum`` is the signal and
    ``not_started`` how many inputs a rerun still has to do."""

    def __init__(self, message: str, signum: int, not_started: int):
        super().__init__(message)
        self.signum, self.not_started = signum, not_started
