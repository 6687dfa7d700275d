"""Output keys: where each input's output goes under DST, and which inputs could ever compete for one.

    key (relative to SRC) -> safe_key (can never leave DST) -> candidate at level 0..3 -> output_keys (unique)
    group_of(key): the name every possible rival of a key shares; shard cuts (imgxlate.infer.plan) are made
    only between groups, so output keys unique within a shard are unique in the whole run.

Both rules live here together because one undoes what the other adds: a candidate adds an image extension and
maybe a hash of :data:`HASH_HEX` digits after it; ``group_of`` strips exactly those.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections import defaultdict

from imgxlate.io.listing import has_ext, redact
from imgxlate.io.manifest import MANIFEST_DIR

HASH_HEX = (10, 64)      # hex digits of sha256(source) a candidate adds at levels 2 and 3
_HASHED = re.compile(r"-(?:" + "|".join(f"[0-9a-f]{{{n}}}" for n in sorted(HASH_HEX, reverse=True)) + r")$")


def check_suffix(suffix: str) -> None:
    """A ``--suffix`` goes into every output's file name: no slashes or control characters."""
    if any(ch in "/\\" or ord(ch) < 32 for ch in suffix):
        raise ValueError(f"--suffix {suffix!r}: no slashes or control characters")


def safe_key(key: str) -> str:
    """Normalise a relative key so that it can never leave DST; raises ValueError when it cannot."""
    k = key.replace("\\", "/")
    if any(ord(ch) < 32 for ch in k):
        raise ValueError(f"unsafe output key {key!r}: control characters")
    parts = [p for p in k.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"unsafe output key {key!r}: it would leave the destination")
    return "/".join(parts)


def dst_key(key: str) -> str:
    """:func:`safe_key`, and out of DST's manifest folder: ``_manifest/...`` (in any case: DST may be
    case-insensitive) becomes ``_manifest_/...``. Raises ValueError when the key cannot be made safe."""
    s = safe_key(key)
    head, sep, tail = s.partition("/")
    return f"{head}_/{tail}" if head.casefold() == MANIFEST_DIR and sep else s


def member_prefix(unit_key: str) -> str | None:
    """A tar's (or Parquet file's) key as the output keys of its members (``<unit_key>/<member>``) start with it,
    through :func:`dst_key`; None when it is unsafe (then so is every member's key)."""
    try:
        return dst_key(unit_key + "/x")[:-2]
    except ValueError:
        return None


def object_name(sid: str, unit_key: str | None, output_format: str) -> str:
    """The name under DST of a shard's one object (--output-format webdataset / parquet): its tar's or Parquet
    file's key with the format's extension for its own, as spelt (a.TAR gives a.TAR.tar, never a.tar's name),
    else shard-<id>."""
    ext = ".tar" if output_format == "webdataset" else ".parquet"
    safe = member_prefix(unit_key) if unit_key else None
    if not safe:
        return f"shard-{sid}{ext}"
    own = next((e for e in (".tar", ".parquet") if safe.endswith(e)), "")
    return safe[:len(safe) - len(own)] + ext


def candidate(safe: str, source: str, level: int, suffix: str, ext: str) -> str:
    """The output key at each level of collision resolution, for a/b.jpg -> .png: a/b.png, then
    a/b.jpg.png, then a/b.jpg-<10 hex of sha256(source)>.png, then all 64 hex digits (see :data:`HASH_HEX`)."""
    name = posixpath.splitext(safe)[0] if level == 0 else safe
    if level >= 2:
        name += "-" + hashlib.sha256(source.encode()).hexdigest()[:HASH_HEX[level - 2]]
    return name + suffix + ext


def output_keys(keys: list[str], ext: str, suffix: str = "", sources: list[str] | None = None,
                min_level: list[int] | None = None) -> list[str | Exception]:
    """Output key per input: the same relative path with ``suffix`` before the new extension, and
    never the same key for two inputs. Inputs that would collide (``a.jpg`` and ``a.png``) keep their
    source extension (``a.jpg.png``, ``a.png.png``); if that collides too, a hash of the source URI
    (``sources``, default the keys) is added, until every key is unique. The result depends on the set
    of inputs, not on their order. Unsafe keys come back as the ValueError to record; keys under
    ``_manifest/`` (in any case: DST may be case-insensitive) go to ``_manifest_/`` so that outputs never land in DST's
    manifest folder. ``min_level`` (per
    input, 0-3) starts an input at a later level: 3, all 64 hex digits of the hash, is what the job gives keys
    whose rivals a shard cannot see."""
    sources = keys if sources is None else sources
    out: list[str | Exception] = [""] * len(keys)
    safe, level = {}, {}
    for i, k in enumerate(keys):
        try:
            s = dst_key(k)
        except ValueError as e:
            out[i] = e
            continue
        safe[i], level[i] = s, min_level[i] if min_level else 0
    name = {i: candidate(s, sources[i], level[i], suffix, ext) for i, s in safe.items()}
    holders = defaultdict(set)
    for i, n in name.items():
        holders[n].add(i)
    clash = {i for group in holders.values() if len(group) > 1 for i in group}
    while clash := {i for i in clash if level[i] < 3}:
        touched = set()
        for i in clash:                      # every member of a clash moves on, so order never matters
            holders[name[i]].discard(i)
            level[i] += 1
            name[i] = candidate(safe[i], sources[i], level[i], suffix, ext)
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


def group_of(key: str, exts: tuple[str, ...]) -> str:
    """The name every possible rival of ``key`` for an output key has: ``folder/stem`` where the stem is the file
    name without its extension, then without what :func:`candidate` may have added or kept under it (a hash
    ``-<10 or 64 hex>`` after an image extension, image extensions): a.jpg.png, a.png and
    a.png-0123456789.png are all of group 'a'. Every key of a group starts with the group and a '.'."""
    stem = posixpath.splitext(key)[0]
    while True:
        m = _HASHED.search(stem)
        if m and has_ext(stem[:m.start()], exts):
            stem = stem[:m.start()]
        elif has_ext(stem, exts) and posixpath.splitext(stem.rstrip())[0] != stem.rstrip():
            stem = posixpath.splitext(stem.rstrip())[0]     # 'a.png ' is an input as 'a.png' is (listing.has_ext)
        else:
            return stem


def canonical(key: str) -> str:
    return "/".join(p for p in key.replace("\\", "/").split("/") if p not in ("", "."))


def set_aside(key: str) -> bool:
    """Keys whose rivals the listing may yield elsewhere: not in canonical form ('//', './', a backslash), or a
    file name starting with '.' (its rivals need not share a prefix): their outputs get hashed names."""
    return canonical(key) != key or posixpath.basename(key).startswith(".")


def in_manifest_folder(key: str) -> bool:
    """Keys that output_keys moves from _manifest/ to _manifest_/, and their rivals there: kept in one shard."""
    return key.split("/", 1)[0].casefold() in (MANIFEST_DIR, MANIFEST_DIR + "_") and "/" in key


def is_utf8(text: str) -> bool:
    """Whether a name (as the listing gave it: undecodable bytes as surrogates) is valid UTF-8."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def escaped(text: str) -> str:
    """A name that is not valid UTF-8, its bad bytes shown as \\x escapes (for a row that says so)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
