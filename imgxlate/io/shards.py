"""WebDataset tar shards, in and out: which tars a SRC names, each tar's index of members, the inputs they make,
and the tar fragments the job's outputs are written as and joined into one tar per shard.

A WebDataset shard is a plain tar whose members are grouped into samples by name: a sample's key is the member's
path up to the first '.' of its file name, the rest is the member's extension ('000123.jpg', '000123.json' and
'000123.cls' are one sample). Each image member is one input of the job, keyed ``<tar>/<member>`` (its
``source_uri`` is ``<tar uri>#<member>``), and the sample's other members travel with it into the output.

Reading: the tar's index (member names, data offsets and sizes) is read once, in the plan, from its headers
(:func:`read_index`: a local tar by seeks; an object in large sequential reads); the model actors then read each
block's members with one ranged read of the span they cover (:func:`read_span`).

Writing: a block's outputs are one tar fragment (:func:`fragment`: members, no end-of-archive blocks), and a
shard's fragments joined and ended by :data:`END` are a valid tar (:mod:`imgxlate.infer.pieces`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from imgxlate.io import listing, storage
from imgxlate.io.listing import Item, SourceError, redact

TAR_EXTS = (".tar",)
END = b"\0" * 1024                     # a tar's end-of-archive marker: two zero blocks
INDEX_BLOCK = 16 << 20                 # sequential read size when an object's headers are read


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``s3://b/shards/{00000..00002}.tar`` -> three URIs; ``{a,b}`` lists; ranges keep their zero padding (the
    WebDataset / bash convention). Several braces multiply out, left to right; a URI that comes out twice (nested
    braces: ``{a,{a,b}}``) is listed once, so that its inputs are not two shards."""
    return list(dict.fromkeys(_expand(pattern)))


def _expand(pattern: str) -> list[str]:
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    if (r := re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)) is not None:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.lstrip("-").startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise SourceError(f"source {redact(pattern)}: '{{{body}}}' is neither a range (00000..00099) nor a list "
                          f"(a,b)")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [u for c in choices for u in _expand(head + c + tail)]


def is_folder_source(src: str) -> bool:
    """Whether SRC names a folder or prefix of shard files (not one file, not a brace pattern)."""
    return not _BRACE.search(src) and not src.rstrip().lower().endswith(TAR_EXTS + (".parquet",))


def folder_of(src: str) -> str:
    """The folder holding the shard files a brace pattern or a single file names."""
    head = src[:m.start()] if (m := _BRACE.search(src)) else src.rstrip()
    return head.rpartition("/")[0] or "."


def is_webdataset(src: str) -> bool:
    """Whether SRC names WebDataset tars by itself: a .tar, or a brace pattern of them."""
    return src.rstrip().lower().endswith(TAR_EXTS) or (bool(_BRACE.search(src)) and ".tar" in src.lower())


def tars(src: str, exclude: str | None = None) -> Iterator[Item]:
    """The tars SRC names (see :func:`files_named`)."""
    return files_named(src, TAR_EXTS, exclude)


def files_named(src: str, exts: tuple[str, ...], exclude: str | None = None) -> Iterator[Item]:
    """The shard files SRC names, in key order, each keyed by its path relative to SRC's folder: a brace pattern
    (relative to the folder before its first brace), one file, or every file with one of ``exts`` under a folder
    or prefix."""
    if _BRACE.search(src):
        root = folder_of(src) if "/" in src[:_BRACE.search(src).start()] else ""
        items = [Item(u, u[len(root):].lstrip("/") if root else u) for u in expand_braces(src)]
        return iter(sorted(items, key=lambda it: it.key))
    if src.rstrip().lower().endswith(exts):
        fs, path = storage.filesystem(src)
        if not storage.retry(fs.exists, path):  # a missing SRC stops the run, as a missing folder does
            raise SourceError(f"source {redact(src)} does not exist")
        return iter([Item(src, posixpath.basename(src.rstrip("/")))])
    return listing.iter_inputs(src, exts, exclude=exclude)


@dataclass(slots=True)
class Member:
    name: str
    offset: int          # of the member's data in the tar (-1: a link to nothing the tar holds)
    size: int
    link: str = ""       # a hard or symbolic link's target, as a member name


def read_index(uri: str, size: int = -1) -> tuple[list[Member], str | None]:
    """A tar's regular members and its links (hard or symbolic: GNU tar stores every further hard link of a file as
    one) with their targets' data, in tar order, and why the index stops early (None when it was read to its
    end): a truncated tar keeps the members whose data is whole. Raises OSError / SourceError when it cannot be
    read at all."""
    fs, path = storage.filesystem(uri)
    if size < 0:
        size = storage.retry(fs.size, path)
    members: list[Member] = []
    problem = None
    opened = fs.open(path, "rb") if storage.is_local(uri) else \
        fs.open(path, "rb", block_size=INDEX_BLOCK, cache_type="readahead")
    with opened as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                while True:
                    try:
                        info = tf.next()
                    except tarfile.ReadError as e:
                        problem = f"the tar is damaged after {len(members)} members ({e})"
                        break
                    if info is None:
                        break
                    if info.islnk() or info.issym():
                        target = info.linkname if info.islnk() else posixpath.normpath(
                            posixpath.join(posixpath.dirname(info.name), info.linkname))
                        members.append(Member(info.name, -1, -1, target))
                        continue
                    if not info.isreg():
                        continue
                    if info.offset_data + info.size > size:
                        problem = f"the tar is truncated: it ends inside member {info.name!r}"
                        break
                    members.append(Member(info.name, info.offset_data, info.size))
                if problem is None:             # tarfile takes a bad header, or a file cut at a member's end,
                    f.seek(tf.offset)           # for the end of the archive: a whole tar ends in zero blocks
                    if f.read(tarfile.BLOCKSIZE) != b"\0" * tarfile.BLOCKSIZE:
                        problem = (f"the tar has no end-of-archive marker at byte {tf.offset} (cut short, or a "
                                   f"damaged header after {len(members)} members)")
        except tarfile.ReadError as e:
            if not members:
                raise SourceError(f"{redact(uri)} is not a tar file, or is damaged: {e}") from e
    data = {posixpath.normpath(m.name): m for m in members if not m.link}      # './a.png' is 'a.png'
    return [dataclasses.replace(m, offset=data[t].offset, size=data[t].size) if m.link and (
        t := posixpath.normpath(m.link)) in data else m for m in members], problem


def sample_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name, as WebDataset splits it: at the first '.' of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (folder + "/" if folder else "") + stem, ext if dot else ""


def items(tar: Item, exts: tuple[str, ...]) -> list[Item]:
    """The inputs of one tar: an Item per image member (``offset`` set; the sample's other members, as
    [[name, offset, size], ...] JSON, in ``sidecars``). A member name seen before, an image member with no data,
    or a tar cut short are rows with ``error`` set; a tar that cannot be read at all is one such row."""
    try:
        members, problem = read_index(tar.source_uri, tar.size)
    except Exception as e:
        return [Item(tar.source_uri + "#", tar.key + "/", tar.size,
                     error=f"the tar cannot be read: {type(e).__name__}: {e}")]
    out, seen = [], {}
    for sample in _samples(members):
        side = [[s.name, s.offset, s.size] for s in sample if not listing.has_ext(s.name, exts) and s.offset >= 0]
        for m in sample:
            if not listing.has_ext(m.name, exts):
                continue
            n = seen[m.name] = seen.get(m.name, 0) + 1
            uri, key = f"{tar.source_uri}#{m.name}", f"{tar.key}/{m.name}"
            if m.offset < 0 and n == 1:
                out.append(Item(uri, key, 0, error=f"a link to {m.link!r}, which the tar does not hold"))
                continue
            if n > 1:
                out.append(Item(f"{uri}#{n}", f"{key}#{n}", m.size,
                                error=f"duplicate member name: the tar holds {m.name!r} more than once (this is "
                                      f"copy {n}); only the first is processed"))
                continue
            out.append(Item(uri, key, m.size, offset=m.offset, sidecars=json.dumps(side) if side else None))
            side = []                   # a sample's other members go with its first image only (once)
    if problem:
        out.append(Item(tar.source_uri + "#", tar.key + "/", tar.size,
                        error=f"{problem}: {len(out)} image members before it were listed"))
    return out


def _samples(members: list[Member]) -> Iterator[list[Member]]:
    """Members grouped into samples as WebDataset groups them: consecutive members with the same sample key."""
    group: list[Member] = []
    for m in members:
        if group and sample_key(m.name)[0] != sample_key(group[0].name)[0]:
            yield group
            group = []
        group.append(m)
    if group:
        yield group


def read_span(tar_uri: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (offset, size) in one tar, read with one ranged read of the span they cover (members of a
    block lie together in the tar)."""
    if not spans:
        return []
    lo, hi = min(o for o, _ in spans), max(o + s for o, s in spans)
    fs, path = storage.filesystem(tar_uri)
    data = storage.retry(fs.cat_file, path, start=lo, end=hi)
    if len(data) < hi - lo:
        raise OSError(f"{redact(tar_uri)} ended at byte {lo + len(data)}, before {hi}: the tar changed or was cut")
    return [bytes(data[o - lo:o - lo + s]) for o, s in spans]


def read_members(specs: list[tuple[str, int, int, str | None]]) -> list[tuple[bytes | Exception, bytes | None, float]]:
    """For each (tar uri, offset, size, sidecars JSON) of a block's members: (its bytes, or why they could not be
    read; its sample's other members as a fragment named by extension, or None; seconds), with one ranged read
    per tar of the span the members and their sidecars cover."""
    out: list = [None] * len(specs)
    by_tar: dict[str, list[int]] = {}
    for i, (tar, *_) in enumerate(specs):
        by_tar.setdefault(tar, []).append(i)
    for tar, idx in by_tar.items():
        sides = {i: json.loads(specs[i][3] or "[]") for i in idx}
        spans = [sp for i in idx for sp in [(specs[i][1], specs[i][2]), *((o, n) for _, o, n in sides[i])]]
        t0 = time.perf_counter()
        try:
            datas = iter(read_span(tar, spans))
        except Exception as e:
            for i in idx:
                out[i] = (e, None, time.perf_counter() - t0)
            continue
        share = (time.perf_counter() - t0) / len(idx)
        for i in idx:
            data = next(datas)
            side = [(sample_key(name)[1], next(datas)) for name, _, _ in sides[i]]
            out[i] = (data, fragment(side) if side else None, share)
    return out


def renamed(side: bytes | None, out_member: str) -> list[tuple[str, bytes]]:
    """A sample's other members (a fragment named by extension), named for the output member's sample:
    '000123_x2.json' beside '000123_x2.png'; one whose name is taken (by the output, or another) gets '.src'."""
    if side is None:
        return []
    key, taken, out = sample_key(out_member)[0], {out_member}, []
    for ext, data in members_of(bytes(side)):
        name, n = f"{key}.{ext}", 1         # a sidecar named as the output (a mask 000.png beside 000.jpg's output
        while name in taken:                # 000.png) or as another sidecar: 000.src.png, 000.src2.png, ...
            name, n = f"{key}.src{n if n > 1 else ''}" + (f".{ext}" if ext else ""), n + 1
        taken.add(name)
        out.append((name, data))
    return out


def fragment(members: list[tuple[str, bytes]]) -> bytes:
    """Tar members with no end-of-archive marker: fragments joined and followed by :data:`END` are one tar. POSIX
    (pax) headers, so any name length and any UTF-8 name are kept; mode 0644, mtime 0 (same bytes in, same bytes
    out)."""
    buf = io.BytesIO()
    for name, data in members:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        buf.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        buf.write(data)
        if pad := -len(data) % tarfile.BLOCKSIZE:
            buf.write(b"\0" * pad)
    return buf.getvalue()


def members_of(fragment_bytes: bytes) -> Iterator[tuple[str, bytes]]:
    """The (name, data) of each member of a fragment (or a whole tar)."""
    with tarfile.open(fileobj=io.BytesIO(fragment_bytes + END), mode="r:") as tf:
        for info in tf:
            if info.isreg():
                yield info.name, tf.extractfile(info).read()


def container_members(uri: str, checksums: bool, name: str | None = None) -> dict[str, tuple[int, str | None]]:
    """{member: (bytes, sha256 or None)} of a shard's object: a tar's members from its headers (read whole only
    for ``checksums``), or a Parquet file's ``output`` column by its ``output_uri``. ``name``: the object's name
    under DST (its marker's); a Parquet file's rows record ``<DST as the run spelt it>/<name>#<member>``, which a
    relative, copied or moved DST spells otherwise than ``uri``. Raises FileNotFoundError when the object is gone."""
    import hashlib

    fs, path = storage.filesystem(uri)
    out: dict[str, tuple[int, str | None]] = {}
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        tail = (name or posixpath.basename(path)) + "#"
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                t = pf.read_row_group(i, columns=["output_uri", "output"])
                for u, data in zip(t.column("output_uri").to_pylist(), t.column("output").to_pylist()):
                    at = u.find(tail) if u else -1
                    while at > 0 and u[at - 1] != "/":           # the name must start a path segment
                        at = u.find(tail, at + 1)
                    if data is not None and at >= 0:
                        out[u[at + len(tail):]] = (len(data), hashlib.sha256(data).hexdigest() if checksums else None)
        return out
    if not checksums:
        members, _ = read_index(uri)
        return {m.name: (m.size, None) for m in members}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for info in tf:
            if info.isreg():
                out[info.name] = (info.size, hashlib.sha256(tf.extractfile(info).read()).hexdigest())
    return out


# ------------------------------------------------------------------------------ Parquet with an image-bytes column
PARQUET_EXTS = (".parquet",)
PARQUET_BLOCK_BYTES = 64 << 20      # a row group up to this size (and BLOCK_ROWS rows) is one block, read once


def parquet_files(src: str, exclude: str | None = None) -> Iterator[Item]:
    """The Parquet files SRC names (see :func:`files_named`)."""
    return files_named(src, PARQUET_EXTS, exclude)


def _image_field(schema, column: str, uri: str):
    import pyarrow as pa

    if column not in schema.names:
        raise SourceError(f"{redact(uri)} has no column {column!r} (--image-column): its columns are "
                          f"{', '.join(schema.names[:20])}")
    t = schema.field(column).type
    ok = pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t) or (
        pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
    if not ok:
        raise SourceError(f"{redact(uri)}: column {column!r} is {t}, not image bytes (binary, or a struct with a "
                          f"'bytes' field as Hugging Face datasets writes images)")


def parquet_items(file: Item, image_column: str, key_column: str | None) -> list[Item]:
    """The inputs of one Parquet file: an Item per row (``group`` its row group, ``offset`` its row in it, ``size``
    the row group's average bytes per image), keyed ``<file>/<key column>`` (or ``<file>/<row number>``), read
    from the key column only. A null or repeated key is a row with ``error`` set; a file that cannot be read
    is one such row. A missing or non-bytes image column stops the run (SourceError)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(file.source_uri)
    out, seen, row0 = [], set(), 0
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            _image_field(pf.schema_arrow, image_column, file.source_uri)
            if key_column and key_column not in pf.schema_arrow.names:
                raise SourceError(f"{redact(file.source_uri)} has no column {key_column!r} (--key-column)")
            leaves = [c for c in range(pf.metadata.num_columns)      # the image column's leaf columns (a struct's
                      if pf.metadata.schema.column(c).path.split(".")[0] == image_column]  # bytes and path)
            groups = []
            for g in range(pf.num_row_groups):
                meta = pf.metadata.row_group(g)
                n = meta.num_rows
                avg = sum(meta.column(c).total_uncompressed_size for c in leaves) // max(1, n)
                names = pf.read_row_group(g, columns=[key_column]).column(0).to_pylist() if key_column else \
                    [f"{row0 + j:09d}" for j in range(n)]
                groups.append((g, avg, names))
                row0 += n
            real, row0 = {str(name) for _, _, names in groups for name in names}, 0
            for g, avg, names in groups:
                for j, name in enumerate(names):
                    uri, key = f"{file.source_uri}#{name}", f"{file.key}/{name}"
                    error = "the key column is null in this row" if name is None else \
                        f"the key {name!r} names no file" if not str(name).strip("./") else \
                        f"the key {name!r} is in more than one row; only the first is processed" if name in seen \
                        else None
                    if error:                   # named by its row, under a name no key of the file has
                        bad = f"row-{row0 + j}"
                        while bad in real:
                            bad = "_" + bad
                        uri, key = f"{file.source_uri}#{bad}", f"{file.key}/{bad}"
                    seen.add(name)
                    out.append(Item(uri, key, avg, offset=j, group=g, error=error))
                row0 += len(names)
    except SourceError:
        raise
    except Exception as e:
        return [Item(file.source_uri + "#", file.key + "/", file.size,
                     error=f"the Parquet file cannot be read: {type(e).__name__}: {e}")]
    return out


def read_cells(file_uri: str, column: str, cells: list[tuple[int, int]]) -> list[bytes | None | Exception]:
    """The image bytes of each (row group, row) of one Parquet file: each row group's image column read once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(file_uri)
    out: list = [None] * len(cells)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for g in sorted({g for g, _ in cells}):
            want = {r: i for i, (gi, r) in enumerate(cells) if gi == g}
            try:                                # batch by batch, up to the last row wanted (memory: one batch)
                row0 = 0
                for batch in pf.iter_batches(batch_size=64, row_groups=[g], columns=[column]):
                    values = batch.column(0)
                    if pa.types.is_struct(values.type):     # a Hugging Face Image: {bytes, path}
                        values = values.field("bytes")
                    for r in range(row0, row0 + batch.num_rows):
                        if r in want:
                            out[want[r]] = values[r - row0].as_py()
                    row0 += batch.num_rows
                    if row0 > max(want):
                        break
            except Exception as e:
                for i, (gi, _) in enumerate(cells):
                    if gi == g:
                        out[i] = e
    return out


def read_rows(specs: list[tuple[str, int, int]], column: str) -> list[tuple[bytes | Exception, float]]:
    """For each (Parquet file uri, row group, row) of a block: (its image bytes, or why not: a null cell is an
    error; seconds), each file's row groups read once."""
    by_file: dict[str, list[int]] = {}
    for i, (uri, _, _) in enumerate(specs):
        by_file.setdefault(uri, []).append(i)
    out: list = [None] * len(specs)
    for uri, idx in by_file.items():
        t0 = time.perf_counter()
        try:
            values = read_cells(uri, column, [specs[i][1:] for i in idx])
        except Exception as e:
            values = [e] * len(idx)
        share = (time.perf_counter() - t0) / len(idx)
        for i, v in zip(idx, values):
            out[i] = (v if v is not None else ValueError(f"the {column!r} cell of this row is null"), share)
    return out
