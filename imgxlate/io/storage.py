"""One fsspec code path for local folders and ``s3://`` (and any other fsspec URI).

The S3 endpoint comes from ``endpoint_url`` or the ``AWS_ENDPOINT_URL`` environment variable (the
variable botocore itself reads), so S3-compatible stores work the same in the driver and in Ray
workers. Credentials come from the usual AWS environment / profile / instance role, never from here.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import fsspec


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


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the storage."""
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint_url)
    return fs.cat_file(path)


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
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)
