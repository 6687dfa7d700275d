"""decode(bytes) -> Decoded and encode(Decoded-like) -> bytes, with Pillow (and png16 for 16-bit
colour PNGs). No torch here.

Fidelity rules: EXIF orientation applied; L / LA / P / RGB / RGBA / CMYK / 16-bit handled; alpha
kept as its own plane; 16-bit stays 16-bit; grayscale stays grayscale; the ICC profile is carried
over when it describes the output's colour space (a CMYK profile is used to convert to sRGB instead), up to
:data:`MAX_ICC_BYTES`, what every output format can hold. A profile that is not carried over (or a CMYK one
that cannot be used) is said in :attr:`Decoded.warning`, for the input's manifest row.
"""

from __future__ import annotations

import io
import re
import sys
import typing
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps, PngImagePlugin, UnidentifiedImageError

from imgxlate.io import png16
from imgxlate.log import quiet

Image.MAX_IMAGE_PIXELS = None                    # imgxlate applies its own max_pixels guard
# Pillow refuses a PNG whose iCCP chunk inflates to over 1 MiB (its text-chunk limit): profiles of a few MB are
# real (printer and camera profiles). png16's limit, 16 MiB, still refuses a bomb.
PngImagePlugin.MAX_TEXT_CHUNK = max(PngImagePlugin.MAX_TEXT_CHUNK, png16.MAX_ICC_BYTES)

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# PNG outputs are deflated, by default (PNG_LEVEL None), at zlib level 1 with its RLE strategy, as OpenCV writes
# PNG unless told a level: on photos and upscaled outputs as small as Pillow's default (level 6, default
# strategy; -0.7% to +0.4% here) and 2-3.6x faster (512x384: 23 vs 84 ms; 6000x4000: 1.4 vs 4.8 s), where level
# 6 took as long as a bf16 model on small photos. --png-level N (0-9) deflates at level N with zlib's default
# strategy, as OpenCV does when told a level: smaller on flat graphics at 6-9, stored at 0.
PNG_LEVEL: int | None = None
Z_RLE, Z_DEFAULT = 3, -1


def png_deflate(level: int | None) -> tuple[int, int]:
    """(zlib level, strategy) of 8-bit PNG outputs for ``--png-level`` (None: the default, level 1 with RLE)."""
    return (1, Z_RLE) if level is None else (level, Z_DEFAULT)
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
DEFAULT_MAX_PIXELS = 64_000_000
# The largest profile a JPEG holds: 255 APP2 segments of 65,519 bytes (Pillow writes a larger one as a profile no
# reader can put together). PNG and WebP hold more; a profile over this is dropped at decode, with a warning.
MAX_ICC_BYTES = 255 * 65_519


class DecodeError(ValueError):
    status = "decode_error"


class TooLarge(DecodeError):
    status = "too_large"


@dataclass
class Decoded:
    pixels: np.ndarray                 # HxW (gray) or HxWx3, uint8 or uint16
    alpha: np.ndarray | None           # HxW, same dtype, or None
    mode: str                          # what the source was: 'RGB', 'P', 'CMYK', 'I;16', 'RGB;16', ...
    icc: bytes | None = None
    warning: str | None = None         # what the output loses: a profile not carried over, ...

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def gray(self) -> bool:
        return self.pixels.ndim == 2

    @property
    def bits(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8


def _icc_space(icc: bytes | None) -> str | None:
    return icc[16:20].decode("ascii", "replace").strip() if icc and len(icc) >= 20 else None


def _keep_icc(icc: bytes | None, space: str) -> tuple[bytes | None, str | None]:
    """(the profile to carry over, or None; a warning when there was one and it is not carried over) for an
    image in colour space ``space`` ('RGB' or 'GRAY')."""
    if not icc:
        return None, None
    found = _icc_space(icc)
    if found != space:
        what = f"is for {found!r}" if found else f"is unreadable ({len(icc)} bytes)"
        return None, f"ICC profile {what}, not this {space} image: dropped; colours may differ"
    if len(icc) > MAX_ICC_BYTES:
        return None, (f"ICC profile of {len(icc)} bytes is over the {MAX_ICC_BYTES} bytes every output format "
                      f"can hold (JPEG's limit): dropped; colours may differ")
    return icc, None


def _from_png16(data: bytes, mode: str) -> Decoded:
    try:
        a, icc = png16.decode(data)
    except png16.PngError as e:
        raise DecodeError(str(e)) from e
    c = a.shape[2]
    if c in (1, 2):
        return Decoded(a[..., 0], a[..., 1] if c == 2 else None, mode, *_keep_icc(icc, "GRAY"))
    return Decoded(a[..., :3], a[..., 3] if c == 4 else None, mode, *_keep_icc(icc, "RGB"))


def _low_byte_rawmode(rawmode: str) -> str:
    """The rawmode that unpacks the low byte of each 16-bit sample where ``rawmode`` unpacks the high one
    (``N``: libtiff hands samples over in this machine's byte order)."""
    order = rawmode[-1] if rawmode[-1] != "N" else "L" if sys.byteorder == "little" else "B"
    return rawmode[:-1] + ("B" if order == "L" else "L")


def _from_tiff16(data: bytes, im: Image.Image) -> Decoded:
    """A 16-bit RGB / RGBA TIFF at 16 bits. Pillow has no 16-bit colour mode: it unpacks the high byte of
    each sample (rawmode ``RGB;16L``, ``;16B`` or ``;16N``). Loading a second time with the byte order
    swapped in the rawmode unpacks the low bytes; together they are the samples."""
    rawmodes = sorted({t.args[0] for t in im.tile})
    if len(rawmodes) != 1 or not re.fullmatch(r"RGB[AX]?;16[LBN]", rawmodes[0]):
        raise DecodeError(f"16-bit {im.mode} TIFF stored as {', '.join(rawmodes)} is not supported "
                          f"(decoding it would drop the low 8 bits of every sample)")
    planes = []
    for rawmode in (rawmodes[0], _low_byte_rawmode(rawmodes[0])):
        part = Image.open(io.BytesIO(data))
        part.tile = [t._replace(args=(rawmode, *t.args[1:])) for t in part.tile]
        try:
            part.load()
        except Exception as e:
            raise DecodeError(f"truncated or corrupt TIFF data: {e}") from e
        planes.append(np.asarray(part).astype(np.uint16))
    a = planes[0] << 8 | planes[1]                    # Pillow applies the TIFF orientation tag on load
    return Decoded(a[..., :3], a[..., 3] if im.mode == "RGBA" else None, f"{im.mode};16",
                   *_keep_icc(im.info.get("icc_profile"), "RGB"))


def probe(data: bytes) -> tuple[int, int, str, str]:
    """(width, height, mode, format) from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.width, im.height, im.mode, im.format or "?"
    except Exception:
        return 0, 0, "", ""


# EXIF orientations that swap width and height (decode applies them).
_TRANSPOSED = (5, 6, 7, 8)


def header_size(f: typing.BinaryIO) -> tuple[int, int]:
    """(height, width) as :func:`decode` would give them (EXIF orientation applied), from an open file's
    header: Pillow reads only as far as the header and the EXIF block."""
    with Image.open(f) as im:
        w, h = im.size
        return (w, h) if im.getexif().get(0x0112) in _TRANSPOSED else (h, w)


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode one image file; raises DecodeError / TooLarge with a message fit for a manifest row."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise DecodeError(f"not a recognised image format ({len(data)} bytes)") from e
    except Exception as e:
        raise DecodeError(f"unreadable image header: {e}") from e
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        raise DecodeError(f"animated or multi-frame {im.format} ({frames} frames) is not supported")
    if im.width * im.height > max_pixels:
        raise TooLarge(f"{im.width}x{im.height} = {im.width * im.height / 1e6:.1f} MP exceeds the "
                       f"max-pixels limit of {max_pixels / 1e6:.1f} MP")
    head = png16.header(data)
    if im.format == "PNG" and head and head[2] == 16 and head[3] in (2, 4, 6):
        mode = {2: "RGB;16", 4: "LA;16", 6: "RGBA;16"}[head[3]]
        return _from_png16(data, mode)  # Pillow would drop these to 8 bits
    if im.format == "TIFF" and im.mode in ("RGB", "RGBA") and set(im.tag_v2.get(258, ())) == {16}:
        return _from_tiff16(data, im)   # ... and these
    try:
        with quiet():
            im.load()
    except Exception as e:
        raise DecodeError(f"truncated or corrupt {im.format} data: {e}") from e
    source_mode, icc = im.mode, im.info.get("icc_profile")
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # a malformed EXIF block only loses the orientation tag, not the image
    return _to_arrays(im, source_mode, icc)


def _from_cmyk(im: Image.Image, source_mode: str, icc: bytes | None) -> Decoded:
    """sRGB pixels of a CMYK image: through its CMYK profile when it has one that can be used, else Pillow's
    naive conversion (with a warning when a profile was there but could not be used)."""
    warning = None
    if icc and _icc_space(icc) == "CMYK":
        try:
            rgb = ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                            ImageCms.createProfile("sRGB"), outputMode="RGB")
            return Decoded(np.asarray(rgb), None, source_mode)
        except Exception as e:
            warning = f"CMYK profile could not be read ({type(e).__name__}: {e})"
    elif icc:
        found = _icc_space(icc)
        warning = f"ICC profile {f'is for {found!r}' if found else 'is unreadable'}, not CMYK"
    if warning:
        warning += ": converted without it; colours may differ"
    return Decoded(np.asarray(im.convert("RGB")), None, source_mode, None, warning)


def _to_arrays(im: Image.Image, source_mode: str, icc: bytes | None) -> Decoded:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        return Decoded(np.clip(a, 0, 65535).astype(np.uint16), None, source_mode, *_keep_icc(icc, "GRAY"))
    if mode == "F":
        raise DecodeError("32-bit float images are not supported")
    if mode == "CMYK":
        return _from_cmyk(im, source_mode, icc)
    if mode in ("1", "L"):
        return Decoded(np.asarray(im.convert("L")), None, source_mode, *_keep_icc(icc, "GRAY"))
    if mode in ("LA", "La"):
        a = np.asarray(im.convert("LA"))
        return Decoded(a[..., 0].copy(), a[..., 1].copy(), source_mode, *_keep_icc(icc, "GRAY"))
    has_alpha = mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info) or "A" in mode
    if has_alpha:
        a = np.asarray(im.convert("RGBA"))
        return Decoded(a[..., :3].copy(), a[..., 3].copy(), source_mode, *_keep_icc(icc, "RGB"))
    return Decoded(np.asarray(im.convert("RGB")), None, source_mode, *_keep_icc(icc, "RGB"))


def to_8bit(a: np.ndarray) -> np.ndarray:
    """uint8 as is; uint16 to uint8 rounded to nearest (65535 -> 255, 257 * v -> v). The one 16-bit rule:
    the encoder for 8-bit formats and the training / eval readers (imgxlate.io.images) both use it."""
    return a if a.dtype == np.uint8 else ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def profile_lost(fmt: str, pixels: np.ndarray, icc: bytes | None) -> str | None:
    """What :func:`encode` cannot carry over of ``icc`` in ``fmt``, as a warning for the row, or None: WebP has
    no grayscale (a gray image is written as RGB, which a GRAY profile does not describe)."""
    if icc and fmt == "webp" and pixels.ndim == 2:
        return "WebP has no grayscale: the gray ICC profile is not carried over (--format png keeps it)"
    return None


def encode(pixels: np.ndarray, alpha: np.ndarray | None = None, fmt: str = "png", quality: int = 95,
           icc: bytes | None = None, png_level: int | None = PNG_LEVEL) -> bytes:
    """Encode HxW / HxWx3 pixels (+ optional HxW alpha). 16-bit is kept for PNG; JPEG and WebP are
    8-bit. JPEG cannot hold alpha: the image is composited over white (never black). The profile is written
    unless :func:`profile_lost` says the format cannot hold it. ``png_level``: zlib's level for PNG (0-9; None:
    :data:`PNG_LEVEL`), which changes the file's size and the time to write it, never its pixels."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}: use {', '.join(FORMATS)}")
    if profile_lost(fmt, pixels, icc):
        icc = None
    if icc and fmt == "jpeg" and len(icc) > MAX_ICC_BYTES:    # Pillow would write it as no profile at all
        raise ValueError(f"an ICC profile of {len(icc)} bytes does not fit in a JPEG (at most {MAX_ICC_BYTES})")
    if fmt == "png" and pixels.dtype == np.uint16 and not (pixels.ndim == 2 and alpha is None):
        planes = [pixels[..., None] if pixels.ndim == 2 else pixels]
        if alpha is not None:
            planes.append(alpha.astype(np.uint16)[..., None])
        # 16-bit: level 1 with the default strategy (RLE made its Up-filtered bytes a third larger)
        return png16.encode(np.concatenate(planes, axis=2), icc, 1 if png_level is None else png_level)
    if fmt == "png" and pixels.dtype == np.uint16:
        im = Image.fromarray(pixels)                           # 16-bit gray: I;16
    else:
        p8, a8 = to_8bit(pixels), None if alpha is None else to_8bit(alpha)
        if a8 is not None and fmt == "jpeg":
            a = a8.astype(np.float32)[..., None] / 255
            base = p8[..., None] if p8.ndim == 2 else p8
            p8 = np.round(base * a + 255 * (1 - a)).astype(np.uint8)
            p8 = p8[..., 0] if pixels.ndim == 2 else p8
            a8 = None
        if a8 is not None:
            im = Image.fromarray(np.dstack([p8, a8]) if p8.ndim == 2 else np.dstack([p8, a8]),
                                 "LA" if p8.ndim == 2 else "RGBA")
        else:
            im = Image.fromarray(p8, "L" if p8.ndim == 2 else "RGB")
    if fmt == "webp" and im.mode == "LA":
        im = im.convert("RGBA")
    kwargs = {"icc_profile": icc} if icc else {}
    if fmt in ("jpeg", "webp"):
        kwargs["quality"] = quality
    elif fmt == "png":
        kwargs["compress_level"], kwargs["compress_type"] = png_deflate(png_level)
    buf = io.BytesIO()
    im.save(buf, FORMATS[fmt], **kwargs)
    return buf.getvalue()
