"""The one error mask of every ``imgxlate`` command: what it prints on failure and its exit status.

    0      the command ran
    1      an unexpected error (its traceback, redacted), or translate --fail-on-error with failed inputs
    2      the command could not run (one line: ``imgxlate COMMAND: error: ...``)
    75     translate stopped because DST failed (full, over quota, read-only, an I/O error, a store failing
           after retries; EX_TEMPFAIL): what was done is recorded; fix DST and rerun to finish
    128+n  stopped by signal n (130 SIGINT, 143 SIGTERM): what was done is recorded; rerun to finish (translate:
           a second signal stops without draining, in one line: a rerun does every input that has no row)
"""

from __future__ import annotations

import argparse
import signal

from imgxlate.errors import CannotRun, Stopped
from imgxlate.log import line

# Commands whose unexpected errors reach their caller as raised: an in-process caller of `eval` gets the
# library's exception itself. What the user can change (a CannotRun: a model, scale or image that cannot be
# used) is one line and exit 2 here too.
RAISES = ("eval",)


def _secrets(args: argparse.Namespace) -> set[str]:
    """Credentials given inside any URI argument (the commands refuse them), whole and as user / password."""
    from imgxlate.io.listing import userinfo

    values = [v for x in vars(args).values() for v in (x if isinstance(x, list) else [x]) if isinstance(v, str)]
    return {part for v in values for part in (userinfo(v), *userinfo(v).split(":", 1)) if len(part) >= 4}


def guarded(command: str, func, args: argparse.Namespace) -> int:
    """``func(args)``'s exit status, through the mask every command shares. Whatever it prints goes through
    redaction: URLs lose their user info and signed query strings, and credentials given inside any URI
    argument are masked wherever they appear. An error that means the command could not run prints
    ``imgxlate COMMAND: error: ...`` (exit 2); a run stopped by a signal or by DST failing, what is left and what
    to do (exit 128 + the signal, or 75); any other exception, its traceback (exit 1)."""
    import traceback

    from imgxlate.io.listing import redact_text

    secrets = _secrets(args)

    def clean(text: str) -> str:
        text = redact_text(text)
        for part in sorted(secrets, key=len, reverse=True):
            text = text.replace(part, "***")
        return text

    try:
        return func(args)
    except KeyboardInterrupt as e:              # translate: a second signal (SignalDrain), or one before it drains
        if command != "translate":
            raise
        line(clean(f"imgxlate {command}: {str(e) or 'interrupted'}; a rerun does every input that has no row"))
        return 128 + getattr(e, "signum", signal.SIGINT)   # SecondSignal carries its signal; a bare Ctrl-C: SIGINT
    except Exception as e:
        if isinstance(e, CannotRun):
            line(clean(f"imgxlate {command}: error: {e}"))
            return 2
        if isinstance(e, Stopped):
            line(clean(f"imgxlate {command}: {e}; {e.advice}"))
            return e.exit_code              # 130 for SIGINT, 143 for SIGTERM, 75 when DST failed
        if command in RAISES:
            raise
        line(clean(traceback.format_exc()).rstrip("\n"))
        return 1
