"""What to process: list a source (folder, s3:// prefix or manifest file) and map each input to a
safe, deterministic output key under DST."""

from __future__ import annotations

import csv
import io
import posixpath
import re
from dataclasses import dataclass

from imgxlate.io import storage

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


def list_inputs(src: str, extensions: tuple[str, ...] = IMAGE_EXTS, limit: int | None = None) -> list[Item]:
    """Inputs under a folder / prefix (recursive, filtered by extension, sorted), or listed in a
    manifest file (.parquet / .csv / .txt), each with its key relative to the source root."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if src.lower().endswith(MANIFEST_EXTS):
        uris = _read_manifest(src)
        if not uris:
            raise SourceError(f"manifest {redact(src)} lists no inputs")
        items = [Item(u, "") for u in uris]
        root = posixpath.commonpath([redact(u).split("://", 1)[-1] for u in uris]) if len(uris) > 1 else ""
        for it in items:
            rel = redact(it.source_uri).split("://", 1)[-1]
            it.key = posixpath.relpath(rel, root) if root and rel != root else posixpath.basename(rel)
    else:
        fs, path = storage.filesystem(src)
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
        base = path.rstrip("/")
        items = []
        for p, info in sorted(found.items()):
            if info.get("type") == "directory" or not p.lower().endswith(exts):
                continue
            rel = p[len(base):].lstrip("/")
            if rel.startswith("_manifest/"):
                continue
            items.append(Item(_full_uri(src, protocol, p), rel.replace("\\", "/"), int(info.get("size") or -1)))
    items = [it for it in items if it.source_uri.split("?", 1)[0].lower().endswith(exts)]
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


def output_keys(keys: list[str], ext: str, suffix: str = "") -> list[str | Exception]:
    """Deterministic output key per input key: same relative path, ``suffix`` before the new
    extension. Two inputs that would collide (``a.jpg`` and ``a.png``) keep their source extension
    (``a.jpg.png``, ``a.png.png``). Unsafe keys come back as the ValueError to record."""
    out: list[str | Exception] = []
    stems = []
    for k in keys:
        try:
            s = safe_key(k)
        except ValueError as e:
            out.append(e)
            stems.append(None)
            continue
        stem, _ = posixpath.splitext(s)
        stems.append(stem)
        out.append(stem + suffix + ext)
    counts: dict[str, int] = {}
    for o in out:
        if isinstance(o, str):
            counts[o] = counts.get(o, 0) + 1
    for i, o in enumerate(out):
        if isinstance(o, str) and counts[o] > 1:
            out[i] = safe_key(keys[i]) + suffix + ext
    return out
