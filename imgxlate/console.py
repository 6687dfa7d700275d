"""What a person sees: imgxlate's own lines on the console, Ray's internals in a named log file.

Ray's C++ core worker writes some lines straight to the driver's stderr (file descriptor 2) whatever its
Python logging is set to (e.g. ``core_worker.cc ... constructor arguments in the object store``), and the
processes Ray starts inherit that descriptor. :func:`ray_lines_to_log` points descriptor 2 at a pipe for
the duration of a command: lines that start with ``[imgxlate]`` (and Python tracebacks of the command
itself, printed after it ends) reach the console, every other line goes to the log file, whose name is
printed at the start.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading

PREFIX = b"[imgxlate]"


def log_path(name: str) -> str:
    folder = os.path.join(tempfile.gettempdir(), "imgxlate-logs")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}.log")


@contextlib.contextmanager
def ray_lines_to_log(name: str):
    """Within the block, descriptor 2 lines not from imgxlate go to ``log_path(name)``."""
    path = log_path(name)
    sys.stderr.flush()
    console = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    log = open(path, "ab", buffering=0)
    routed = {"console": True}

    def pump():
        # Runs until every holder of the write end (Ray processes started meanwhile included) closes it;
        # after the block, everything goes to the log.
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                if routed["console"] and line.startswith(PREFIX):
                    os.write(console, line)
                else:
                    log.write(line)

    thread = threading.Thread(target=pump, name="imgxlate-stderr", daemon=True)
    thread.start()
    os.write(console, f"[imgxlate] Ray's own messages go to {path}\n".encode())
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)                   # the command's own descriptor 2 is the console again
        thread.join(timeout=1.0)              # drain what is in the pipe (ends here unless Ray processes hold it)
        routed["console"] = False
        if not thread.is_alive():
            os.close(console)
