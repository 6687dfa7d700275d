"""One fsspec code path for local folders and ``s3://`` (and any other fsspec URI).

The S3 endpoint comes from ``endpoint_url`` or the ``AWS_ENDPOINT_URL`` environment variable (the
variable botocore itself reads), so S3-compatible stores work the same in the driver and in Ray
workers. Credentials come from the usual AWS environment / profile / instance role, never from here.
"""

from __future__ import annotations

import collections.abc
import contextlib
import ctypes
import errno
import functools
import os
import posixpath
import random
import re
import sys
import time
import uuid

import fsspec

TMP_MARK = ".imgxlate-tmp-"      # the start of every temporary's name (a fixed 46 bytes with its uuid)
JOB_DIR = "_manifest"           # DST's folder for the job's own files (imgxlate.io.manifest.MANIFEST_DIR): no
                                # output lands in it (keys under _manifest/ go to _manifest_/, imgxlate.io.keys)
TMP_DIR = "_tmp"                # DST/_manifest/_tmp: the outputs' temporaries, renamed from there into place
TRANSIENT_MARKERS = ("SlowDown", "503", "ServiceUnavailable", "Service Unavailable", "RequestTimeout", "500",
                     "InternalError", "Throttl", "reset by peer", "Connection reset", "timed out", "Broken pipe")
# A marker matches as a word (a "503" inside a file name such as IMG_5031.png is none)
_TRANSIENT = re.compile("|".join(rf"(?<![A-Za-z0-9]){re.escape(m)}" + (r"(?![0-9])" if m.isdigit() else "")
                                 for m in TRANSIENT_MARKERS))


# Storage settings (never credentials) that the driver passes on to Ray's workers and to submitted jobs:
# workers started elsewhere must reach the same store. Credentials come from each machine's own environment.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "IMGXLATE_DURABLE")


def forwarded_env() -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables that are set here."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or None


def _canon(uri: str) -> str:
    """file://localhost/PATH is file:///PATH (RFC 8089); fsspec reads it as ./localhost/PATH."""
    return "file://" + uri[len("file://localhost"):] if uri.startswith("file://localhost/") else uri


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    uri = _canon(uri)
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
    return os.path.normpath(local_path(uri)) if is_local(uri) else path.rstrip("/")


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
_DST_CODES = ("QuotaExceeded", "InsufficientStorage", "StorageFull", "XMinioStorageFull")


def dst_failure(e: BaseException) -> str | None:
    """A short reason when ``e`` (raised by a write to DST, after its retries) means DST itself is failing, so
    that every later write would fail too; None when it is about this one output (a bad name, for example)."""
    if isinstance(e, NameTooLong):              # this output's name, whatever its text says
        return None
    text = _text(e)
    if any(c in text for c in _DST_CODES):     # before errno: s3fs reports codes it does not know as EIO
        return "the store refused the write (quota or storage full)"
    chain = (e, e.__cause__, e.__context__)
    store = next((x for x in chain if hasattr(x, "response") and isinstance(x.response, dict)), None)
    if store is not None:                       # an object store's answer: its HTTP status says whose fault it is
        status = store.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return "the store kept failing after retries" if status >= 500 or is_transient(e) else None
    for x in chain:
        if isinstance(x, OSError) and x.errno in _DST_ERRNOS:
            return _DST_ERRNOS[x.errno]
    if is_transient(e):
        return "the store kept failing after retries"
    return None


def _text(e: BaseException) -> str:
    """An error as text without the file names an OSError carries (a name is no error code)."""
    if isinstance(e, OSError) and e.strerror is not None:
        return f"{type(e).__name__} {e.strerror}"
    return f"{type(e).__name__} {e}"


def is_transient(e: BaseException) -> bool:
    """Worth retrying: throttling (503 SlowDown), server errors, connection resets and timeouts.
    Missing objects and denied access are permanent."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, NameTooLong)):
        return False                    # (a name's "500 bytes" is no server error)
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return _TRANSIENT.search(_text(e)) is not None


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
    """An object's bytes. On an object store one GET (``start=0``: without it s3fs sends a HEAD first, to split a
    large object into concurrent ranges, doubling the requests per input; jobs/bench_requests.py counts them)."""
    fs, path = filesystem(uri, endpoint_url)
    return retry(fs.cat_file, path) if is_local(uri) else retry(fs.cat_file, path, start=0)


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint_url)
    return fs.exists(path)


def remove(uri: str) -> None:                # one file or object; one that is not there is fine
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write all or nothing, durably: a local file goes to a temporary beside it (:data:`TMP_MARK` and a uuid, a
    name of its own that is never longer than 46 bytes), is synced, renamed into place, and its folder synced
    before this returns (see :class:`LocalWrites`); an object-store write is a single PUT (or a completed
    multipart upload), never a partial object, and durable once it returns."""
    fs, path = filesystem(uri, endpoint_url)
    if not is_local(uri):
        retry(fs.pipe_file, path, data)
        return
    writes = LocalWrites(mode="off" if sync_mode() == "off" else "fsync")     # a few files: each one synced
    try:
        writes.write(os.path.abspath(path), data)
    finally:
        failed = writes.sync()
    if failed:
        raise next(iter(failed.values()))


def _os_path(uri: str) -> str:
    """A local path or file:// / file: URI as the path os calls take, a leading ~ expanded as fsspec does (a quoted
    "~/x" reaches us unexpanded; some writes go through fsspec, others through os)."""
    return filesystem(uri)[1] if "://" in uri or uri.startswith("file:") else os.path.expanduser(uri)


def local_path(uri: str) -> str:
    """The absolute path of a local path or file:// / file: URI (see _os_path)."""
    return os.path.abspath(_os_path(uri))


def real(uri: str) -> str:
    """A local place as the OS resolves it (symlinks, then '..' after them: not '..' first, as normpath does), for
    telling whether two spellings are one folder."""
    return os.path.realpath(_os_path(uri))


def spelt_as_path(uri: str) -> bool:
    """A local place not spelt as a plain path (file://, file:, ~): what the job turns into one first."""
    return is_local(uri) and (uri.startswith(("file:", "~")) or "://" in uri)


def temporaries_dir(dst: str) -> str | None:
    """DST/_manifest/_tmp, where a local DST's outputs are written before they are renamed into place; None for an
    object store (a PUT is never seen half done)."""
    return join(dst, JOB_DIR, TMP_DIR) if is_local(dst) else None


def sync_mode() -> str:
    """How local writes are made durable before anything records them: 'syncfs' (Linux: one syncfs(2) per
    filesystem written, per block of outputs), 'fsync' (each file before its rename, then each folder written; where
    there is no syncfs, or with ``IMGXLATE_DURABLE=fsync``) or 'off' (``IMGXLATE_DURABLE=0``, for benchmarks only:
    after a crash, an output whose row says ok may be empty or missing)."""
    v = os.environ.get("IMGXLATE_DURABLE", "").strip().lower()
    if v in ("0", "off", "no", "false"):
        return "off"
    return "fsync" if v == "fsync" or _libc_syncfs() is None else "syncfs"


@functools.cache
def _libc_syncfs():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


def syncfs(fd: int) -> None:
    """syncfs(2): write out every file and folder of the filesystem that holds ``fd`` (Linux; the kernel reports
    write-back errors since the descriptor was opened, on Linux 5.8 and later)."""
    if _libc_syncfs()(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syncfs failed: {os.strerror(code)}")


def fsync_folder(folder: str) -> None:
    """Make ``folder``'s entries (a rename into it, a file or folder made in it) durable."""
    if os.name == "nt":                 # a folder cannot be opened there; NTFS journals its entries
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NameTooLong(OSError):
    """An output path the filesystem cannot hold (ENAMETOOLONG): a name over its limit, or the whole path."""

    @classmethod
    def of(cls, path: str) -> NameTooLong:
        parts = [p for p in path.split(os.sep) if p]
        longest = max(parts, key=lambda p: len(os.fsencode(p)))
        n, limit = len(os.fsencode(longest)), _name_max(path)
        if n > limit:
            what = "the output's file name" if longest == parts[-1] else f"the folder name {longest[:20]!r}... in it"
            return cls(errno.ENAMETOOLONG, f"{what} is {n} bytes, over the filesystem's limit of {limit} bytes "
                                           f"(ENAMETOOLONG): give the input a shorter name (or a shorter --suffix)")
        return cls(errno.ENAMETOOLONG, f"the output's path is {len(os.fsencode(path))} bytes, over the filesystem's "
                                       f"limit (ENAMETOOLONG): use a shorter DST or shorter folder names")


def _name_max(path: str) -> int:
    """NAME_MAX of the filesystem of ``path``'s nearest existing folder (255 where it cannot be asked)."""
    folder = os.path.dirname(path)
    while folder and not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder or ".", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


class LocalWrites:
    """All-or-nothing writes of local files (a block's outputs), made durable by :meth:`sync` (see
    :func:`sync_mode`), which must return before anything records them (a manifest row, a marker).

    Each file is written to a temporary named :data:`TMP_MARK` + uuid in ``tmp_dir`` (the job's DST/_manifest/_tmp:
    such a name is never a user's, and never makes a legal output name too long), then renamed into place. Where
    ``tmp_dir`` is None, or on another filesystem than the output's folder (a mount inside DST: EXDEV), the
    temporary is made in the output's folder instead; the run-start cleanup never looks there (it would have to list
    every output), so a writer killed in that moment can leave one such file behind, never read as an output."""

    def __init__(self, tmp_dir: str | None = None, mode: str | None = None):
        self.tmp_dir, self.mode = tmp_dir and local_path(tmp_dir), mode or sync_mode()
        self.tmp_dev: int | None = None
        self.folders: dict[str, int] = {}       # output folder -> its filesystem (st_dev)
        self.beside: set[str] = set()           # output folders whose temporaries are made in them
        self.fds: dict[int, int] = {}           # st_dev -> a folder of it opened before the first write (syncfs)
        self.made: set[str] = set()             # folders holding a folder made here (fsync mode)

    def write(self, path: str, data) -> None:
        """Write ``data`` (bytes, or an iterator of byte chunks: a shard's object streamed) as the file ``path``."""
        folder = os.path.dirname(path)
        try:
            self._folder(folder)
            self._put(path, data, folder if folder in self.beside else self.tmp_dir)
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG and not isinstance(e, NameTooLong):
                raise NameTooLong.of(path) from e
            raise

    def _put(self, path: str, data, tmp_dir: str) -> None:
        tmp, renamed = os.path.join(tmp_dir, TMP_MARK + uuid.uuid4().hex), False
        try:
            self._file(tmp, data if isinstance(data, collections.abc.Iterator) else iter((data,)))
            try:
                os.replace(tmp, path)
                renamed = True
            except OSError as e:
                folder = os.path.dirname(path)
                if e.errno != errno.EXDEV or tmp_dir == folder:
                    raise
                self.beside.add(folder)         # a bind mount: same device, still no rename across it
                with open(tmp, "rb") as f:      # (data may be a stream, read once: the temporary is copied)
                    self._put(path, iter(lambda: f.read(1 << 20), b""), folder)
        finally:
            if not renamed:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)

    def _file(self, path: str, chunks) -> None:
        with open(path, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            if self.mode == "fsync":
                f.flush()
                os.fsync(f.fileno())

    def _folder(self, folder: str) -> None:
        """Make ``folder`` (recording the folders that gain an entry) and note its filesystem, once."""
        if folder in self.folders:
            return
        missing, f = [], folder
        while not os.path.isdir(f) and os.path.dirname(f) != f:
            missing.append(f)
            f = os.path.dirname(f)
        os.makedirs(folder, exist_ok=True)
        self.made.update(os.path.dirname(m) for m in missing)
        dev = os.stat(folder).st_dev
        if self.mode == "syncfs" and dev not in self.fds:
            self.fds[dev] = os.open(folder, os.O_RDONLY)
        if self.tmp_dir is None:
            self.beside.add(folder)
        else:
            if self.tmp_dev is None:
                os.makedirs(self.tmp_dir, exist_ok=True)
                self.tmp_dev = os.stat(self.tmp_dir).st_dev
            if self.tmp_dev != dev:
                self.beside.add(folder)
        self.folders[folder] = dev

    def _up_to_dst(self) -> set[str]:
        """The folders between each output folder and DST (from ``tmp_dir``, DST/_manifest/_tmp): another writer
        (a thread, an actor) may have made one and not yet synced its entry; fsync mode syncs them all."""
        if not self.tmp_dir:
            return set()
        dst, up = os.path.dirname(os.path.dirname(self.tmp_dir)), set()
        for f in self.folders:
            while f.startswith(dst + os.sep):
                f = os.path.dirname(f)
                up.add(f)
        return up

    def sync(self) -> dict[str, OSError]:
        """Make every write so far durable; returns the output folders that could not be synced, with why (their
        files may not survive a crash: record them as failed)."""
        failed: dict[str, OSError] = {}
        try:
            if self.mode == "syncfs":
                for dev, fd in self.fds.items():
                    try:
                        syncfs(fd)
                    except OSError as e:
                        failed.update({f: e for f, d in self.folders.items() if d == dev})
            elif self.mode == "fsync":
                for folder in sorted(set(self.folders) | self.made | self._up_to_dst(), key=len, reverse=True):
                    try:
                        fsync_folder(folder)
                    except OSError as e:
                        failed.update({f: e for f in self.folders if f == folder or f.startswith(folder + os.sep)})
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds, self.folders, self.made = {}, {}, set()
        return failed


def remove_stale_temporaries(dst: str) -> int:
    """Delete the temporaries that killed writers left in a local DST; returns how many. Only the job's own folder
    is looked at: every file in DST/_manifest/_tmp, and names starting with :data:`TMP_MARK` in DST/_manifest, its
    _shards folder and the folders of runs with no summary (a run that was killed). The outputs' folders are never
    listed (a million names on a rerun) and a user's file is never touched, whatever its name."""
    root = os.path.join(local_path(dst), JOB_DIR) if is_local(dst) else None
    if root is None or not os.path.isdir(root):
        return 0
    n = _remove(os.path.join(root, TMP_DIR), every=True) + _remove(root)
    with os.scandir(root) as entries:
        folders = [e.path for e in entries if e.is_dir(follow_symlinks=False) and e.name != TMP_DIR]
    for folder in folders:              # _shards (imgxlate.io.manifest.SHARD_DIR) and killed runs' folders
        if os.path.basename(folder) == "_shards" or not os.path.exists(os.path.join(folder, "summary.json")):
            n += _remove(folder)
    return n


def _remove(folder: str, every: bool = False) -> int:
    """Delete the files (not folders) in ``folder`` whose names start with :data:`TMP_MARK` (``every``: all of
    them); how many."""
    n = 0
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if (every or e.name.startswith(TMP_MARK)) and not e.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(e.path)
                        n += 1
    except FileNotFoundError:
        pass
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
