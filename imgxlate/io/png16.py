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


def _paeth_row(row: np.ndarray, prev: np.ndarray, bpp: int) -> None:
    a = np.zeros(bpp, np.int32)
    c = np.zeros(bpp, np.int32)
    r = row.astype(np.int32)
    p = prev.astype(np.int32)
    for i in range(0, len(r), bpp):
        b = p[i:i + bpp]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        a = (r[i:i + bpp] + pred) & 0xFF
        r[i:i + bpp] = a
        c = b
    row[:] = r


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
            icc = zlib.decompress(body[name_end + 2:])
        elif kind == b"IEND":
            break
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise PngError(f"corrupt or truncated PNG data: {e}") from e
    bpp = CHANNELS[ctype] * 2
    stride = w * bpp
    if len(raw) < h * (stride + 1):
        raise PngError("truncated PNG data")
    rows = np.frombuffer(raw, np.uint8, h * (stride + 1)).reshape(h, stride + 1)
    out = np.empty((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(h):
        f, row = rows[y, 0], rows[y, 1:].copy()
        if f == 1:                              # Sub: running sum per byte lane (uint8 wraps)
            row = np.cumsum(row.reshape(w, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif f == 2:                            # Up
            row = row + prev
        elif f == 3:                            # Average
            r = row.astype(np.int32)
            for i in range(stride):
                left = r[i - bpp] if i >= bpp else 0
                r[i] = (r[i] + ((left + int(prev[i])) >> 1)) & 0xFF
            row = r.astype(np.uint8)
        elif f == 4:
            _paeth_row(row, prev, bpp)
        elif f != 0:
            raise PngError(f"bad PNG filter type {f}")
        out[y] = row
        prev = row
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
