"""One fsspec code path for local folders and ``s3://`` (and any other fsspec URI).

The S3 endpoint comes from ``endpoint_url`` or the ``AWS_ENDPOINT_URL`` environment variable (the
variable botocore itself reads), so S3-compatible stores work the same in the driver and in Ray
workers. Credentials come from the usual AWS environment / profile / instance role, never from here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import random
import time
import uuid

import fsspec

TMP_MARK = ".imgxlate-tmp-"
TRANSIENT_MARKERS = ("SlowDown", "503", "ServiceUnavailable", "Service Unavailable", "RequestTimeout", "500 ",
                     "InternalError", "Throttl", "reset by peer", "Connection reset", "timed out", "Broken pipe")


# Storage settings (never credentials) that the driver passes on to Ray's workers and to submitted jobs:
# workers started elsewhere must reach the same store. Credentials come from each machine's own environment.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


def forwarded_env() -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables that are set here."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    protocol, _ = fsspec.core.split_protocol(uri)
    options: dict = {}
    if protocol in ("s3", "s3a"):
        endpoint_url = endpoint_url or endpoint_from_env()
        if endpoint_url:
            options["endpoint_url"] = endpoint_url
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def is_local(uri: str) -> bool:
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol in (None, "file", "local")


def location(uri: str) -> str:
    """Comparable form of a path or URI: an absolute normalised local path, or bucket/key without a
    trailing '/' (on an object store '.' and '//' are part of a key, so they are kept)."""
    _, path = filesystem(uri)
    return os.path.normpath(os.path.abspath(path)) if is_local(uri) else path.rstrip("/")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the storage."""
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


# The start of a row's error when DST itself failed (full, over quota, read-only, an I/O error, a store that kept
# failing after retries), not the input: the driver drains the run on such a row (imgxlate.infer).
DST_FAILURE = "DST storage failure: "
_DST_ERRNOS = {errno.ENOSPC: "no space left on DST", errno.EDQUOT: "disk quota exceeded on DST",
               errno.EIO: "I/O error on DST", errno.EROFS: "DST is read-only"}
_DST_CODES = ("QuotaExceeded", "InsufficientStorage", "507", "StorageFull", "XMinioStorageFull")


def dst_failure(e: BaseException) -> str | None:
    """A short reason when ``e`` (raised by a write to DST, after its retries) means DST itself is failing, so
    that every later write would fail too; None when it is about this one output (a bad name, for example)."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.errno in _DST_ERRNOS:
            return _DST_ERRNOS[x.errno]
    text = f"{type(e).__name__} {e}"
    if any(c in text for c in _DST_CODES):
        return "the store refused the write (quota or storage full)"
    if is_transient(e):
        return "the store kept failing after retries"
    return None


def is_transient(e: BaseException) -> bool:
    """Worth retrying: throttling (503 SlowDown), server errors, connection resets and timeouts.
    Missing objects and denied access are permanent."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__} {e}"
    return any(m in text for m in TRANSIENT_MARKERS)


def retry(fn, *args, attempts: int = 6, base_delay: float = 0.2, max_delay: float = 5.0, **kwargs):
    """fn(*args, **kwargs), retried with exponential backoff and jitter on transient errors."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if i == attempts - 1 or not is_transient(e):
                raise
            time.sleep(min(max_delay, base_delay * 2**i) * (0.5 + random.random()))


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint_url)
    return retry(fs.cat_file, path)


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint_url)
    return fs.exists(path)


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write all or nothing: a local file goes to a temporary name and is renamed into place; an
    object-store write is a single PUT (or a completed multipart upload), never a partial object."""
    fs, path = filesystem(uri, endpoint_url)
    if is_local(uri):
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        retry(fs.pipe_file, path, data)


def remove_stale_temporaries(uri: str) -> int:
    """Delete temporary files that a killed local writer left under ``uri``; returns how many."""
    if not is_local(uri) or not os.path.isdir(uri):
        return 0
    n = 0
    for root, _, files in os.walk(uri):
        for f in files:
            if TMP_MARK in f:
                os.remove(os.path.join(root, f))
                n += 1
    return n


def remove_empty_tree(path: str) -> None:
    """Remove a local folder that holds nothing but folders (the batch job: a DST it created and left without a
    file, after a dry run or on an empty SRC). The scan stops at the first entry that is not a folder: a DST with
    outputs is kept as it is, and its outputs' names are never listed at once (they were, at the end of every
    run: +40 MB at a million outputs)."""
    if not os.path.isdir(path):
        return
    folders = _only_folders(path)
    for root in reversed(folders or []):        # a folder's subfolders before it
        with contextlib.suppress(OSError):
            os.rmdir(root)                      # only succeeds on an empty folder


def _only_folders(path: str) -> list[str] | None:
    """``path`` and the folders under it, top-down, if there is nothing else under it (links are not followed);
    None at the first file or link."""
    out = [path]
    try:
        with os.scandir(path) as entries:
            for e in entries:
                if not e.is_dir(follow_symlinks=False) or (sub := _only_folders(e.path)) is None:
                    return None
                out += sub
    except OSError:
        return None
    return out
