"""What to process: list a source (folder, s3:// prefix or manifest file) and map each input to a
safe, deterministic output key under DST."""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import re
from collections import defaultdict
from dataclasses import dataclass

from imgxlate.io import storage
from imgxlate.io.manifest import MANIFEST_DIR

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_EXTS = (".parquet", ".csv", ".txt", ".lst")
URI_COLUMNS = ("source_uri", "uri", "url", "path", "key")


class SourceError(RuntimeError):
    pass


@dataclass
class Item:
    source_uri: str      # where to read (full URI, credentials never embedded)
    key: str             # relative key under SRC, e.g. "scans/1901/page 3.jpg"
    size: int = -1       # bytes, when the listing knows


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
    """A URI safe to log and to record: no user info (any scheme), and for http(s) no query string or
    fragment (signed URLs carry credentials there). Elsewhere '?' is part of the key (s3://b/q?x=1.png)."""
    parts = _parts(uri)
    if parts is None:                          # a local path
        return uri
    scheme, _, rest = parts
    if is_http(uri):
        rest = re.split(r"[?#]", rest, maxsplit=1)[0]
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


def _read_manifest(uri: str) -> list[str]:
    data = storage.read_bytes(uri)
    low = uri.lower()
    if low.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        col = next((c for c in URI_COLUMNS if c in table.column_names), table.column_names[0])
        return [str(v) for v in table.column(col).to_pylist() if v]
    text = data.decode("utf-8-sig")
    if low.endswith(".csv"):
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        col = next((header.index(c) for c in URI_COLUMNS if c in header), None)
        body = rows[1:] if col is not None else rows
        return [r[col or 0].strip() for r in body if r and r[col or 0].strip()]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _manifest_keys(uris: list[str]) -> list[str]:
    """Keys of manifest entries: relative to their common root, or the whole bucket/host path when
    there is none (two buckets, say), so that different inputs keep different keys."""
    rels = [redact(u).split("://", 1)[-1] for u in uris]
    try:
        root = posixpath.commonpath(rels) if len(rels) > 1 else posixpath.dirname(rels[0])
    except ValueError:                          # absolute and relative paths mixed
        root = ""
    if not root:
        return rels
    return [posixpath.relpath(r, root) if r != root else posixpath.basename(r) for r in rels]


def _path_of(uri: str) -> str:
    """What the extension filter looks at: http(s) URLs without their query string."""
    return re.split(r"[?#]", uri, maxsplit=1)[0] if is_http(uri) else uri


def list_inputs(src: str, extensions: tuple[str, ...] = IMAGE_EXTS, limit: int | None = None,
                exclude: str | None = None) -> list[Item]:
    """Inputs under a folder / prefix (recursive, filtered by extension, sorted), or listed in a
    manifest file (.parquet / .csv / .txt), each with its key relative to the source root. Nothing
    under ``exclude`` (the job's DST, when it lies inside SRC) is listed."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if src.lower().endswith(MANIFEST_EXTS):
        uris = list(dict.fromkeys(_read_manifest(src)))        # the same URI twice is one input
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
        skip = storage.location(exclude) if exclude and storage.is_local(exclude) == storage.is_local(src) else None
        items = []
        for p, info in sorted(found.items()):
            if info.get("type") == "directory" or not p.lower().endswith(exts):
                continue
            if skip and (p == skip or p.startswith(skip + "/")):
                continue
            rel = p[len(path):]
            rel = rel[1:] if rel.startswith("/") else rel             # keep a '//' in a key as it is
            items.append(Item(_full_uri(src, protocol, p), rel.replace("\\", "/"), int(info.get("size") or -1)))
    items = [it for it in items if _path_of(it.source_uri).lower().endswith(exts)]
    return items[:limit] if limit else items


def safe_key(key: str) -> str:
    """Normalise a relative key so that it can never leave DST; raises ValueError when it cannot."""
    k = key.replace("\\", "/")
    if any(ord(ch) < 32 for ch in k):
        raise ValueError(f"unsafe output key {key!r}: control characters")
    parts = [p for p in k.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"unsafe output key {key!r}: it would leave the destination")
    return "/".join(parts)


def _candidate(safe: str, source: str, level: int, suffix: str, ext: str) -> str:
    """The output key at each level of collision resolution, for a/b.jpg -> .png: a/b.png, then
    a/b.jpg.png, then a/b.jpg-<10 hex of sha256(source)>.png, then all 64 hex digits."""
    name = posixpath.splitext(safe)[0] if level == 0 else safe
    if level >= 2:
        name += "-" + hashlib.sha256(source.encode()).hexdigest()[:10 if level == 2 else 64]
    return name + suffix + ext


def output_keys(keys: list[str], ext: str, suffix: str = "", sources: list[str] | None = None
                ) -> list[str | Exception]:
    """Output key per input: the same relative path with ``suffix`` before the new extension, and
    never the same key for two inputs. Inputs that would collide (``a.jpg`` and ``a.png``) keep their
    source extension (``a.jpg.png``, ``a.png.png``); if that collides too, a hash of the source URI
    (``sources``, default the keys) is added, until every key is unique. The result depends on the set
    of inputs, not on their order. Unsafe keys come back as the ValueError to record; keys under
    ``_manifest/`` go to ``_manifest_/`` so that outputs never land in DST's manifest folder."""
    sources = keys if sources is None else sources
    out: list[str | Exception] = [""] * len(keys)
    safe, level = {}, {}
    for i, k in enumerate(keys):
        try:
            s = safe_key(k)
        except ValueError as e:
            out[i] = e
            continue
        head, sep, tail = s.partition("/")
        if head == MANIFEST_DIR and sep:
            s = f"{head}_/{tail}"
        safe[i], level[i] = s, 0
    name = {i: _candidate(s, sources[i], 0, suffix, ext) for i, s in safe.items()}
    holders = defaultdict(set)
    for i, n in name.items():
        holders[n].add(i)
    clash = {i for group in holders.values() if len(group) > 1 for i in group}
    while clash := {i for i in clash if level[i] < 3}:
        touched = set()
        for i in clash:                      # every member of a clash moves on, so order never matters
            holders[name[i]].discard(i)
            level[i] += 1
            name[i] = _candidate(safe[i], sources[i], level[i], suffix, ext)
            holders[name[i]].add(i)
            touched.add(name[i])
        clash = {i for n in touched if len(holders[n]) > 1 for i in holders[n]}
    for n, group in holders.items():         # left: the same key and source twice, i.e. one input
        if not group:
            continue
        first, *rest = sorted(group)
        out[first] = n
        for i in rest:
            out[i] = ValueError(f"input {keys[i]!r} ({redact(sources[i])}) is listed more than once")
    return out
