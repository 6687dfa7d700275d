"""One fsspec code path for local folders and ``s3://`` (and any other fsspec URI).

The S3 endpoint comes from ``endpoint_url`` or the ``AWS_ENDPOINT_URL`` environment variable (the
variable botocore itself reads), so S3-compatible stores work the same in the driver and in Ray
workers. Credentials come from the usual AWS environment / profile / instance role, never from here.
"""

from __future__ import annotations

import os
import posixpath
import random
import time
import uuid

import fsspec

TMP_MARK = ".imgxlate-tmp-"
TRANSIENT_MARKERS = ("SlowDown", "503", "ServiceUnavailable", "Service Unavailable", "RequestTimeout", "500 ",
                     "InternalError", "Throttl", "reset by peer", "Connection reset", "timed out", "Broken pipe")


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
