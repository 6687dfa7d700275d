"""What to process: list a source (folder, s3:// prefix or manifest file) as a stream of inputs in key order.
The one lister of imgxlate: the batch job streams it (:func:`iter_inputs`), training and eval take it whole
(:func:`list_inputs`). Output keys are :mod:`imgxlate.io.keys`."""

from __future__ import annotations

import csv
import io
import os
import posixpath
import queue
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from imgxlate.errors import CannotRun
from imgxlate.io import storage
from imgxlate.log import log

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_EXTS = (".parquet", ".csv", ".txt", ".lst")
URI_COLUMNS = ("source_uri", "uri", "url", "path", "key")


class SourceError(CannotRun, RuntimeError):
    """A source that cannot be listed or read at all: a command stops with its one line and exit 2."""


@dataclass(slots=True)
class Item:
    source_uri: str      # where to read (full URI, credentials never embedded)
    key: str             # relative key under SRC, e.g. "scans/1901/page 3.jpg"
    size: int = -1       # bytes, when the listing knows
    offset: int = -1     # a WebDataset member: where its data starts in its tar (imgxlate.io.shards)
    sidecars: str | None = None   # a WebDataset member: its sample's other members, [[name, offset, size]] JSON
    error: str | None = None      # an input known bad from the listing (a duplicate tar member): its row's error
    group: int = -1      # a Parquet row: its row group (its row in it is ``offset``)


def _split_userinfo(rest: str) -> tuple[str, str]:
    """(user info, the rest) of what follows ``scheme://``; ('', rest) when there is none."""
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        user, _, host = authority.rpartition("@")
        return user, host + rest[len(authority):]
    # A password with a '/' in it (AWS secret keys have them) ends the authority early:
    # 'AKIA...:abc/def@bucket/key'. A port is all digits; a bucket or host name has no ':'.
    port = authority.rpartition(":")[2]
    if ":" in authority and not authority.startswith("[") and not port.isdigit() and "@" in rest:
        user, _, remainder = rest.partition("@")
        return user, remainder
    return "", rest


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+")


def _parts(uri: str) -> tuple[str, str, str] | None:
    """(scheme, user info, rest) of a URI, or None for a local path."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return None
    return (scheme, *_split_userinfo(rest))


def is_http(uri: str) -> bool:
    return uri.lower().startswith(("http://", "https://"))


def redact(uri: str) -> str:
    """A URI safe to log and to record: no user info (any scheme), and for http(s) no query string (signed URLs
    carry credentials there; a '#fragment', never sent to a server, is kept: it names a WebDataset member).
    Elsewhere '?' is part of the key (s3://b/q?x=1.png)."""
    parts = _parts(uri)
    if parts is None:                          # a local path
        return uri
    scheme, _, rest = parts
    if is_http(uri):
        rest, sep, fragment = rest.partition("#")
        rest = rest.split("?", 1)[0] + sep + fragment
    return f"{scheme}://{rest}"


def userinfo(uri: str) -> str:
    """The ``user:password`` of a URI ('' when it has none)."""
    parts = _parts(uri)
    return parts[1] if parts else ""


_URL = re.compile(r"\b[a-zA-Z][\w+.-]*://[^\s'\"<>]*")


def redact_text(text: str) -> str:
    """Every URL inside a message (an exception text, say) redacted as :func:`redact` does."""
    return _URL.sub(lambda m: redact(m.group(0)), text)


def _full_uri(uri: str, protocol: str | None, path: str) -> str:
    return path if storage.is_local(uri) else f"{protocol}://{path}"


def _read_manifest(uri: str, exts: tuple[str, ...] = IMAGE_EXTS) -> list[str]:
    return list(_manifest_entries(uri, exts))


def _manifest_rel(uri: str) -> str:
    return redact(uri).split("://", 1)[-1]


def _manifest_key(rel: str, root: str) -> str:
    """A manifest entry's key: relative to the entries' common root, or the whole bucket/host path when there is
    none (two buckets, say), so that different inputs keep different keys."""
    if not root:
        return rel
    return posixpath.relpath(rel, root) if rel != root else posixpath.basename(rel)


def _manifest_keys(uris: list[str]) -> list[str]:
    rels = [_manifest_rel(u) for u in uris]
    try:
        root = posixpath.commonpath(rels) if len(rels) > 1 else posixpath.dirname(rels[0])
    except ValueError:                          # absolute and relative paths mixed
        root = ""
    return [_manifest_key(r, root) for r in rels]


def _path_of(uri: str) -> str:
    """What the extension filter looks at: http(s) URLs without their query string."""
    return re.split(r"[?#]", uri, maxsplit=1)[0] if is_http(uri) else uri


def has_ext(name: str, exts: tuple[str, ...]) -> bool:
    """The extension filter: whether a file name or key ends in one of ``exts`` (lower case), whitespace after
    it aside: 'photo.png ' (a legal name on disk and on S3) is an image, and its output is 'photo.png'."""
    return name.rstrip().lower().endswith(exts)


def list_inputs(src: str, extensions: tuple[str, ...] = IMAGE_EXTS, limit: int | None = None,
                exclude: str | None = None) -> list[Item]:
    """Inputs under a folder / prefix (recursive, filtered by extension, sorted by key), or listed in a
    manifest file (.parquet / .csv / .txt), each with its key relative to the source root: the whole of
    :func:`iter_inputs`, for training and eval, which hold their inputs anyway. Nothing under ``exclude`` (the
    job's DST, when it lies inside SRC) is listed."""
    items = sorted(iter_inputs(src, extensions, exclude), key=lambda it: it.key)
    return items[:limit] if limit else items


def _find(src: str, exts: tuple[str, ...], exclude: str | None) -> list[Item]:
    """A manifest file read whole, or an fsspec filesystem other than local disk and S3 (which
    :func:`iter_inputs` pages itself) listed whole with ``find``."""
    if src.lower().endswith(MANIFEST_EXTS):
        uris = list(dict.fromkeys(_read_manifest(src, exts)))  # the same URI twice is one input
        items = [Item(u, k) for u, k in zip(uris, _manifest_keys(uris))] if uris else []
    else:
        fs, _ = storage.filesystem(src)
        path = storage.location(src)                # local: absolute and normalised ('./', '..', '//')
        try:
            if not fs.isdir(path):
                raise SourceError(f"source {redact(src)} is not a folder, prefix or manifest file, "
                                  f"or does not exist")
            found = fs.find(path, detail=True)
        except SourceError:
            raise
        except FileNotFoundError as e:
            raise SourceError(f"source {redact(src)} does not exist: {e}") from e
        except PermissionError as e:
            raise SourceError(f"source {redact(src)}: access denied: {e}") from e
        protocol = None if storage.is_local(src) else src.split("://", 1)[0]
        skip = _skip(src, exclude)
        items = []
        for p, info in sorted(found.items()):
            if info.get("type") == "directory" or not has_ext(p, exts):
                continue
            if skip and (p == skip or p.startswith(skip + "/")):
                continue
            rel = p[len(path):]
            rel = rel[1:] if rel.startswith("/") else rel             # keep a '//' in a key as it is
            items.append(Item(_full_uri(src, protocol, p), rel.replace("\\", "/"), int(info.get("size") or -1)))
    items = [it for it in items if has_ext(_path_of(it.source_uri), exts)]
    return items


def _skip(src: str, exclude: str | None) -> str | None:
    """``exclude`` (DST) as the listing of ``src`` meets it, to be left out; None when it cannot be under SRC. A
    local DST reached through a symlink into SRC (or SRC through one to where DST is) is spelt under SRC's path,
    else its outputs would be listed as inputs by the next run."""
    if not exclude or storage.is_local(exclude) != storage.is_local(src):
        return None
    skip = storage.location(exclude)
    if storage.is_local(src):
        path = storage.location(src)
        real_src, real_skip = storage.real(src), storage.real(exclude)
        if real_skip == real_src or real_skip.startswith(real_src.rstrip("/") + "/"):
            return os.path.normpath(os.path.join(path, os.path.relpath(real_skip, real_src)))
    return skip


def iter_inputs(src: str, extensions: tuple[str, ...] = IMAGE_EXTS, exclude: str | None = None) -> Iterator[Item]:
    """The inputs under ``src``, streamed page by page (the batch job never holds a whole listing): a local
    folder is walked depth first with each folder's entries sorted by name; an ``s3://`` prefix is listed as 97
    key ranges (by the first character after the prefix) paged in parallel threads and yielded in key order.
    Either way every key that shares a prefix is yielded in one run, which is what lets the job cut the stream
    into shards (see :mod:`imgxlate.infer.plan`). Manifest files and other filesystems are listed whole and
    sorted by key. A manifest file is read in chunks, twice: the first pass finds the common root of its
    entries and checks they are sorted; a sorted manifest is then streamed, an unsorted one is held and sorted
    in memory (about 200 bytes an entry). Raises SourceError (at the first ``next``) for a missing or unreadable
    source."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if src.lower().endswith(MANIFEST_EXTS):
        yield from _stream_manifest(src, exts)
        return
    if not (storage.is_local(src) or src.lower().startswith("s3://")):
        yield from sorted(_find(src, exts, exclude), key=lambda it: it.key)
        return
    path = storage.location(src)
    skip = _skip(src, exclude)
    walk = _walk_local(path, exts, skip) if storage.is_local(src) else _walk_s3(path, exts, skip)
    yield from walk


def _manifest_entries(uri: str, exts: tuple[str, ...] = IMAGE_EXTS) -> Iterator[str]:
    """The entries of a manifest file, read in chunks: Parquet by record batches, CSV and text line by line. A CSV
    with none of URI_COLUMNS takes its first column, and its first row too when that names an image (``exts``):
    else the row is a header ('filename,label')."""
    fs, path = storage.filesystem(uri)
    low = uri.lower()
    with fs.open(path, "rb") as f:
        if low.endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            col = next((c for c in URI_COLUMNS if c in names), names[0])
            for batch in pf.iter_batches(batch_size=65536, columns=[col]):
                yield from (str(v) for v in batch.column(0).to_pylist() if v)
            return
        text = io.TextIOWrapper(f, encoding="utf-8-sig")
        if low.endswith(".csv"):
            rows = csv.reader(text)
            first = next(rows, None)
            if first is None:
                return
            header = [h.strip().lower() for h in first]
            col = next((header.index(c) for c in URI_COLUMNS if c in header), None)
            if col is None and first and first[0].strip() and has_ext(_path_of(first[0].strip()), exts):
                yield first[0].strip()
            for r in rows:
                if r and len(r) > (col or 0) and r[col or 0].strip():
                    yield r[col or 0].strip()
            return
        for line in text:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


_WARNED: set[tuple[str, int, int]] = set()     # manifests whose non-image entries were warned of


def _stream_manifest(src: str, exts: tuple[str, ...]) -> Iterator[Item]:
    """A manifest's inputs in key order, with the keys :func:`_find` gives, streamed in three passes when the
    file is in key order (the common root; the order of the keys; the items), else sorted in memory."""
    def rels():
        try:
            for u in _manifest_entries(src, exts):
                yield u, _manifest_rel(u)
        except FileNotFoundError as e:
            raise SourceError(f"source {redact(src)} does not exist: {e}") from e

    first, common, n, images, other = None, None, 0, 0, None
    for u, rel in rels():                       # the root, over every entry (as _manifest_keys)
        n += 1
        if has_ext(_path_of(u), exts):
            images += 1
        elif other is None:
            other = u
        if first is None:
            first = common = rel
        elif common:
            try:
                common = posixpath.commonpath([common, rel])
            except ValueError:                  # absolute and relative paths mixed
                common = ""
    if not n:
        return
    if not images:                              # a text file that is not a list of images: say so, not "no inputs"
        named = ", ".join(e.lstrip(".") for e in exts)
        raise SourceError(f"manifest {redact(src)} lists {n} entr{'y' if n == 1 else 'ies'}, none an image by its "
                          f"extension ({named}); the first is {redact(other)[:200]!r}. "
                          f"A manifest lists one image path or URI per line (.txt / .lst), or in a column named "
                          f"{' / '.join(URI_COLUMNS)} (.csv / .parquet), else its first column")
    if images < n and (src, n, images) not in _WARNED:          # once per manifest, not once per listing of it
        _WARNED.add((src, n, images))
        log(f"warning: {n - images} of the {n} entries of manifest {redact(src)} are not images by their extension "
            f"and are not listed (the first: {redact(other)[:200]!r})")
    root = common if n > 1 else posixpath.dirname(first)

    def items():
        previous = None
        for u, rel in rels():
            if u == previous or not has_ext(_path_of(u), exts):
                continue                        # the same URI twice (next to each other) is one input
            previous = u
            yield Item(u, _manifest_key(rel, root))

    last = None
    for it in items():
        if last is not None and it.key < last:
            yield from sorted(_find(src, exts, None), key=lambda it: it.key)
            return
        last = it.key
    yield from items()


def _walk_local(root: str, exts: tuple[str, ...], skip: str | None) -> Iterator[Item]:
    """Depth first, each folder's entries sorted by name (names only are held, a folder at a time). Links to
    folders are not followed (as before: no loops, no trees outside SRC); a link to a file is an input under the
    link's own key and is read wherever it points, inside SRC or not (as the README says); a file that vanishes
    or a broken link is still listed (its read fails and is recorded); an unreadable subfolder is reported and
    left out."""
    if not os.path.isdir(root):
        raise SourceError(f"source {root} is not a folder, prefix or manifest file, or does not exist")

    def walk(folder: str, rel: str) -> Iterator[Item]:
        try:
            with os.scandir(folder) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
        except PermissionError as e:
            if folder == root:
                raise SourceError(f"source folder {folder}: access denied: {e}") from e
            log(f"warning: folder {folder} cannot be read ({e}): its files are not listed")
            return
        except FileNotFoundError:
            return                             # removed while the listing ran
        for name, is_dir in entries:
            path = os.path.join(folder, name)
            if is_dir:
                if skip is None or os.path.normpath(path) != skip:
                    yield from walk(path, rel + name + "/")
            elif has_ext(name, exts):
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = -1
                yield Item(path, rel + name, size)

    yield from walk(root, "")


S3_PAGE = 1000


def _walk_s3(location: str, exts: tuple[str, ...], skip: str | None, lookahead: int = 8) -> Iterator[Item]:
    """Keys under bucket/prefix in key order. The key space is cut by the first character after the prefix:
    control characters, each printable ASCII character, and everything above '~'. Up to ``lookahead`` ranges are
    paged at once, each into a queue of a few pages, so memory stays a few pages whatever the bucket holds."""
    import boto3
    from botocore.exceptions import ClientError

    bucket, _, prefix = location.partition("/")
    prefix = prefix + "/" if prefix else ""
    client = boto3.client("s3", endpoint_url=storage.endpoint_from_env())
    printable = [chr(c) for c in range(0x20, 0x7F)]
    # (Prefix, StartAfter, range): keys below ' ' after the prefix, then one range per printable character, then
    # keys above '~' (StartAfter skips the rest; the filter drops a '~' key that sorts above the marker).
    ranges = [(prefix, "", "low")] + [(prefix + c, "", None) for c in printable] + \
             [(prefix, prefix + "~\U0010ffff", "high")]
    seen = [0]                                  # objects of any kind: none at all means no such prefix

    def pages(rng) -> Iterator[list[Item]]:
        pre, start, edge = rng
        kwargs = {"Bucket": bucket, "Prefix": pre, "MaxKeys": S3_PAGE, **({"StartAfter": start} if start else {})}
        while True:
            try:
                resp = storage.retry(client.list_objects_v2, **kwargs)
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchBucket", "AccessDenied", "403", "404"):
                    raise SourceError(f"source s3://{location}: {code}: {e}") from e
                raise
            page, done = [], not resp.get("IsTruncated")
            for obj in resp.get("Contents", []):
                k = obj["Key"]
                rest = k[len(prefix):]
                first = rest[:1]
                if edge == "low" and first >= " ":
                    done = True                 # the control-character range ends here
                    break
                if edge == "high" and first <= "~":
                    continue
                seen[0] += 1
                if k.endswith("/") or not has_ext(k, exts):
                    continue
                if skip and (f"{bucket}/{k}" == skip or f"{bucket}/{k}".startswith(skip + "/")):
                    continue
                page.append(Item(f"s3://{bucket}/{k}", rest, int(obj.get("Size", -1))))
            yield page
            if done:
                return
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]

    yield from _in_order(ranges, pages, lookahead)
    if not seen[0]:
        raise SourceError(f"source s3://{location} is not a prefix with objects under it, or does not exist")


def _in_order(ranges: list, pages, lookahead: int, queued_pages: int = 4) -> Iterator[Item]:
    """Run ``pages(range)`` for up to ``lookahead`` ranges at once in threads; yield their items in range order.
    A consumer that stops early stops the threads (they give up on a full queue after ``stop`` is set)."""
    stop = threading.Event()
    queues: dict[int, queue.Queue] = {}

    def put(q: queue.Queue, what) -> bool:
        while not stop.is_set():
            try:
                q.put(what, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def fill(i: int, q: queue.Queue) -> None:
        try:
            for page in pages(ranges[i]):
                if not put(q, page):
                    return
            put(q, None)
        except BaseException as e:  # handed to the consumer, which raises it
            put(q, e)

    started = 0
    try:
        for i in range(len(ranges)):
            while started < min(len(ranges), i + lookahead):
                queues[started] = queue.Queue(queued_pages)
                threading.Thread(target=fill, args=(started, queues[started]), daemon=True,
                                 name=f"imgxlate-list-{started}").start()
                started += 1
            q = queues.pop(i)
            while (page := q.get()) is not None:
                if isinstance(page, BaseException):
                    raise page
                yield from page
    finally:
        stop.set()
