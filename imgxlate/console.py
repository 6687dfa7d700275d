"""What a person sees: imgxlate's own lines on the console, Ray's internals in a named log file.

Ray's C++ core worker writes some lines straight to the driver's stderr (file descriptor 2) whatever its
Python logging is set to (e.g. ``core_worker.cc ... constructor arguments in the object store``), and the
processes Ray starts inherit that descriptor. :func:`ray_lines_to_log` points descriptor 2 at a pipe for
the duration of a command: lines that start with ``[imgxlate]`` reach the console, every other line goes
to the log file, whose name is printed first. The command prints its errors after the block, on the
console. If anything about the diversion fails, the block runs with stderr untouched.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading

PREFIX = b"[imgxlate]"


def log_path(name: str) -> str:
    folder = os.path.join(tempfile.gettempdir(), f"imgxlate-logs-{os.getuid()}")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}.log")


def _pump(read_end: int, console: int, log, routed: dict) -> None:
    """Route lines until every holder of the pipe's write end (Ray processes included) has closed it.
    Never stops early: a writer to a pipe nobody reads would block or get SIGPIPE."""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        for line in iter(pipe.readline, b""):
            try:
                if routed["console"] and line.startswith(PREFIX):
                    os.write(console, line)
                else:
                    log.write(line)
            except OSError:                     # console closed, log disk full: drop the line, keep reading
                pass


@contextlib.contextmanager
def ray_lines_to_log(name: str):
    """Within the block, descriptor 2 lines not from imgxlate go to ``log_path(name)``; yields that path
    (None when stderr is left as it is)."""
    try:
        if sys.stderr is None:
            raise OSError("no stderr")
        sys.stderr.flush()
        path = log_path(name)
        log = open(path, "ab", buffering=0)
        console = os.dup(2)
        read_end, write_end = os.pipe()
    except (OSError, ValueError):
        yield None
        return
    routed = {"console": True}
    thread = threading.Thread(target=_pump, args=(read_end, console, log, routed), name="imgxlate-stderr",
                              daemon=True)
    thread.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        try:
            os.write(console, f"[imgxlate] Ray's own messages go to {path}\n".encode())
        except OSError:
            pass
        yield path
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(console, 2)                     # the command's own descriptor 2 is the console again
        thread.join(timeout=1.0)                # drain the pipe (it ends here unless Ray processes hold it)
        routed["console"] = False
        if not thread.is_alive():
            os.close(console)
