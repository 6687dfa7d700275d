"""16-bit colour PNG read/write with zlib and NumPy.

Pillow reads 16-bit RGB / RGBA / gray+alpha PNGs as 8-bit, silently dropping precision; this module
keeps all 16 bits so that 16-bit scans come back as 16-bit PNGs. (16-bit gray goes through Pillow's
``I;16`` mode, which keeps them.)
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}           # PNG colour type -> samples per pixel


class PngError(ValueError):
    pass


def header(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(width, height, bit depth, colour type, interlace) of a PNG, or None if not a PNG."""
    if len(data) < 33 or not data.startswith(SIGNATURE) or data[12:16] != b"IHDR":
        return None
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return w, h, depth, ctype, interlace


def _chunks(data: bytes):
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length:
            raise PngError("truncated PNG chunk")
        yield kind, body
        pos += 12 + length


MAX_ICC_BYTES = 16 << 20


def _inflate(data: bytes, size: int, what: str) -> bytes:
    """The zlib stream ``data``, inflated to at most ``size`` bytes: a stream that holds more (a
    decompression bomb: hundreds of megabytes of zeros in a few hundred kilobytes) is refused without
    inflating it."""
    try:
        out = zlib.decompressobj().decompress(data, size + 1)
    except zlib.error as e:
        raise PngError(f"corrupt or truncated PNG data: {e}") from e
    if len(out) > size:
        raise PngError(f"PNG {what} inflates to more data than {size} bytes: a decompression bomb?")
    return out


def _unfilter_rows(rows: np.ndarray, w: int, bpp: int) -> np.ndarray:
    """None / Sub / Up rows, one row at a time: each needs only the row above."""
    out = np.empty((rows.shape[0], w * bpp), np.uint8)
    prev = np.zeros(w * bpp, np.uint8)
    for y, (f, row) in enumerate(zip(rows[:, 0], rows[:, 1:])):
        if f == 1:                              # Sub: running sum per byte lane (uint8 wraps)
            row = np.cumsum(row.reshape(w, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif f == 2:                            # Up
            row = row + prev
        out[y] = prev = row
    return out


def _unfilter_diagonals(rows: np.ndarray, w: int, bpp: int) -> np.ndarray:
    """Every filter type, Average and Paeth included, along anti-diagonals: pixel (y, x) needs its left,
    upper and upper-left neighbours, which all lie on earlier diagonals, so each diagonal is one NumPy
    step (H + W - 1 steps, not H x W)."""
    h = rows.shape[0]
    # A zero row above and a zero column on the left stand for the pixels outside the image. In this
    # (h+1) x (w+1) grid pixel (i, j) is at flat index i*(w+1) + j = i*w + (i+j): a diagonal i+j = k is
    # a slice with step w. Pixels are reconstructed in place.
    grid = np.zeros((h + 1, w + 1, bpp), np.uint8)
    grid[1:, 1:] = rows[:, 1:].reshape(h, w, bpp)
    flat = grid.reshape(-1, bpp)
    types = np.concatenate([[0], rows[:, 0]]).astype(np.int16)[:, None]        # filter type per grid row
    for k in range(2, h + w + 1):
        i0, i1 = max(1, k - w), min(h, k - 1)                                   # rows with 1 <= j = k - i <= w
        here = slice(i0 * w + k, i1 * w + k + 1, w)
        a = flat[i0 * w + k - 1:i1 * w + k:w].astype(np.int16)                 # left       (i, j-1)
        b = flat[(i0 - 1) * w + k - 1:(i1 - 1) * w + k:w].astype(np.int16)     # up         (i-1, j)
        c = flat[(i0 - 1) * w + k - 2:(i1 - 1) * w + k - 1:w].astype(np.int16)  # up-left   (i-1, j-1)
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.choose(types[i0:i1 + 1], [np.zeros_like(a), a, b, (a + b) >> 1, paeth])
        flat[here] += pred.astype(np.uint8)                                     # mod 256, as the spec says
    return np.ascontiguousarray(grid[1:, 1:]).reshape(h, w * bpp)


def decode(data: bytes) -> tuple[np.ndarray, bytes | None]:
    """(HxWxC uint16 array, ICC profile or None) of a 16-bit non-interlaced PNG."""
    head = header(data)
    if head is None:
        raise PngError("not a PNG")
    w, h, depth, ctype, interlace = head
    if depth != 16 or ctype not in CHANNELS:
        raise PngError(f"not a 16-bit PNG (depth {depth}, colour type {ctype})")
    if interlace:
        raise PngError("interlaced 16-bit PNG is not supported")
    idat, icc = [], None
    for kind, body in _chunks(data):
        if kind == b"IDAT":
            idat.append(body)
        elif kind == b"iCCP":
            name_end = body.index(b"\0")
            icc = _inflate(body[name_end + 2:], MAX_ICC_BYTES, "ICC profile")
        elif kind == b"IEND":
            break
    bpp = CHANNELS[ctype] * 2
    size = h * (w * bpp + 1)                     # per row: the filter type byte, then the row
    raw = _inflate(b"".join(idat), size, f"image data of {w}x{h} (its header)")
    if len(raw) < size:
        raise PngError("truncated PNG data")
    rows = np.frombuffer(raw, np.uint8).reshape(h, w * bpp + 1)
    if rows[:, 0].max(initial=0) > 4:
        raise PngError(f"bad PNG filter type {rows[:, 0].max()}")
    unfilter = _unfilter_diagonals if (rows[:, 0] >= 3).any() else _unfilter_rows
    out = unfilter(rows, w, bpp)
    return out.view(">u2").reshape(h, w, CHANNELS[ctype]).astype(np.uint16), icc


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def encode(pixels: np.ndarray, icc: bytes | None = None, level: int = 6) -> bytes:
    """A 16-bit PNG of an HxW, HxWx2, HxWx3 or HxWx4 uint16 array (Up filter on every row)."""
    a = pixels[..., None] if pixels.ndim == 2 else pixels
    h, w, c = a.shape
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = np.ascontiguousarray(a.astype(">u2")).view(np.uint8).reshape(h, w * c * 2)
    up = rows.copy()
    up[1:] -= rows[:-1]                         # Up filter: byte-wise difference with the row above
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1).tobytes()
    out = SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
    if icc:
        out += _chunk(b"iCCP", b"icc\0\0" + zlib.compress(icc))
    return out + _chunk(b"IDAT", zlib.compress(raw, level)) + _chunk(b"IEND", b"")
