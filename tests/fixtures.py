"""What the pipeline tests share: generated input files, named by what they are; encoding a fixture image and
writing a SRC tree; running `imgxlate translate` and reading a run's rows and summary; and waiting for an event
with a deadline."""

from __future__ import annotations

import io
import json
import os
import re
import time

import numpy as np
from PIL import Image, ImageCms

from imgxlate.cli import main
from imgxlate.io import manifest, png16, storage

from conftest import photo


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def good_files() -> dict[str, bytes]:
    """Valid inputs in every mode the job must handle, with the property each one tests."""
    rgb = Image.fromarray(photo(48, 64, seed=1))
    rgba = np.dstack([photo(40, 40, seed=2), np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (40, 1))])
    la = np.dstack([photo(32, 24, seed=3, channels=1), np.full((32, 24), 128, np.uint8)])
    pal = Image.fromarray(photo(30, 30, seed=4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    rot = Image.fromarray(photo(20, 36, seed=5))                 # stored 36 wide x 20 high
    exif = Image.Exif()
    exif[0x0112] = 6                                            # orientation: rotate 90 CW to display
    big_exif = Image.Exif()
    big_exif[0x010E] = "x" * 60000                              # ImageDescription: ~60 KB EXIF block
    g16 = (photo(24, 20, seed=6, channels=1).astype(np.uint16) * 257 + 7)
    c16 = photo(22, 18, seed=7).astype(np.uint16) * 257 + 3
    return {
        "64x48_rgb.jpg": _save(rgb, "JPEG", quality=92),
        "64x48_rgb_icc.png": _save(rgb, "PNG", icc_profile=srgb_icc()),
        "40x40_rgba.png": _save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "24x32_gray_alpha.png": _save(Image.fromarray(la, "LA"), "PNG"),
        "30x30_palette_transparent.png": _save(pal, "PNG", transparency=0),
        "36x20_exif_rotated.jpg": _save(rot, "JPEG", exif=exif),
        "64x48_huge_exif.jpg": _save(rgb, "JPEG", exif=big_exif),
        "64x48_cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "20x24_gray16.png": _save(Image.fromarray(g16), "PNG"),
        "18x22_rgb16.png": png16.encode(c16),
        "gray.png": _save(Image.fromarray(photo(26, 26, seed=8, channels=1)), "PNG"),
    }


def bad_files() -> dict[str, tuple[bytes, str]]:
    """Inputs that must each get a failure row: name -> (bytes, expected status)."""
    jpg = _save(Image.fromarray(photo(64, 64, seed=9)), "JPEG")
    png = _save(Image.fromarray(photo(64, 64, seed=10)), "PNG")
    frames = [Image.fromarray(photo(16, 16, seed=s)) for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    huge = _save(Image.new("1", (10000, 10000)), "PNG")        # 100 MP, a few KB on disk
    return {
        "zero_bytes.jpg": (b"", "decode_error"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "decode_error"),
        "truncated.png": (png[: len(png) // 2], "decode_error"),
        "random_bytes.jpg": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
                             "decode_error"),
        "animated.gif": (buf.getvalue(), "decode_error"),
        "100mp.png": (huge, "too_large"),
    }


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def jpg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG")
    return buf.getvalue()


def write_tree(root, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def translate(*argv) -> int:
    """`imgxlate translate ARGV`, with the bicubic model unless ARGV names one."""
    args = [str(a) for a in argv]
    return main(["translate", *args] + ([] if "--model" in args else ["--model", "bicubic"]))


RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|gcs_server|[\w.:-]+ pid=\d+)")


def own(err: str) -> str:
    """A command's own stderr, without the lines Ray forwards from actors and workers of the test session's shared
    cluster: an earlier test's Ray Train controller may still be shutting down, and its messages reach whatever
    the driver prints next."""
    return "\n".join(line for line in err.splitlines() if not RAY_FORWARDED.match(line))


def rows_of(dst, run_id=None) -> list[dict]:
    """The manifest rows of run ``run_id`` (default: the latest finished run) in ``dst``."""
    dst = str(dst)
    return manifest.read_run(dst, run_id or manifest.runs(dst)[-1]).to_pylist()


def summary_of(dst, run_id) -> dict:
    return json.loads(storage.read_bytes(storage.join(manifest.manifest_root(str(dst)), run_id, "summary.json")))


def wait_for(condition, what: str, timeout_s: float, every_s: float = 0.05):
    """Poll ``condition()`` until it returns a true value, and return that value; fail the test, naming ``what``,
    once ``timeout_s`` seconds have passed first. For waiting on an event (a file appears, a process is gone,
    a thread waits), never for something not to happen: a deadline is no proof that it had its chance."""
    deadline = time.monotonic() + timeout_s
    while not (got := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g} s for {what}")
        time.sleep(every_s)
    return got


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(p))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pids) -> set[int]:
    """Those of ``pids`` still running (not gone, not zombies)."""
    alive = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(p)
        except OSError:
            pass
    return alive
