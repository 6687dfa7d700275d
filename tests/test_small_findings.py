"""The smaller findings of issue 22, one test each: a file link in SRC is followed wherever it points (and the
README says so); an ICC profile of over 1 MB is carried over; a CMYK input whose profile cannot be read is
converted with a warning on its row; a key that ends in a space is an input, not dropped by the extension filter.
The job runs once for the local findings (one small SRC); the codec and the S3 listing are checked directly."""

import functools
import io
import os
import re
import struct
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image, ImageCms

from imgxlate.io import codec, listing, png16
from imgxlate.io.keys import output_keys

from conftest import photo
from fixtures import png, rows_of, srgb_icc, translate, write_tree

README = Path(__file__).resolve().parents[1] / "README.md"
BIG = 1_500_000                         # over Pillow's 1 MiB limit on a PNG's inflated iCCP chunk


@functools.cache
def big_icc(size: int = BIG) -> bytes:
    """A valid-looking RGB profile of ``size`` bytes: the sRGB profile, padded with incompressible bytes after
    its tags and with its header's size field set to the new length (LittleCMS still parses it). Made once: the
    profile's header holds the time it was made."""
    base = srgb_icc()
    pad = np.random.default_rng(22).integers(0, 256, size - len(base), dtype=np.uint8).tobytes()
    return struct.pack(">I", size) + base[4:] + pad


def bad_cmyk_icc() -> bytes:
    """A profile whose header claims a CMYK colour space and whose body is garbage."""
    head = bytearray(128)
    head[0:4] = struct.pack(">I", 300)
    head[12:20] = b"prtrCMYK"
    return bytes(head) + b"garbage, not a tag table" * 7


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _cmyk() -> Image.Image:
    return Image.fromarray(photo(20, 24, seed=4)).convert("CMYK")


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    """One job over a SRC that holds every local finding; yields (src, outside, dst, rows by key)."""
    root = tmp_path_factory.mktemp("small")
    src, outside, dst = root / "src", root / "outside", root / "dst"
    rgb = Image.fromarray(photo(16, 20, seed=1))
    write_tree(src, {
        "plain.png": png(photo(12, 14, seed=0)),
        "big_icc.png": _save(rgb, "PNG", icc_profile=big_icc()),
        "big_icc.jpg": _save(rgb, "JPEG", icc_profile=big_icc(), quality=95),
        "cmyk_bad_profile.jpg": _save(_cmyk(), "JPEG", icc_profile=bad_cmyk_icc()),
        "photo.png ": png(photo(10, 12, seed=2)),
    })
    write_tree(outside, {"real.png": png(photo(14, 10, seed=3)), "folder/x.png": png(photo(8, 8, seed=5))})
    os.symlink(outside / "real.png", src / "linked.png")            # a file link out of SRC
    os.symlink(outside / "folder", src / "linked_folder")          # a folder link: not followed
    assert translate(src, dst, "--scale", "2", "--shard-size", "4") == 0
    yield src, outside, dst, {r["key"]: r for r in rows_of(dst)}


def test_a_file_link_is_followed_wherever_it_points_and_the_readme_says_so(run):
    src, outside, dst, rows = run
    row = rows["linked.png"]                                     # named by the link's key, read from outside SRC
    assert row["status"] == "ok" and row["source_uri"] == str(src / "linked.png"), row
    assert Image.open(row["output_uri"]).size == (20, 28)
    assert not any(k.startswith("linked_folder") for k in rows), sorted(rows)
    text = README.read_text()
    assert re.search(r"file link[^.]*followed", text, re.I), "README: say that file links in SRC are followed"
    assert re.search(r"folder links[^.]*not followed", text, re.I), "README: say that folder links are not"


def test_an_icc_profile_of_over_1_mb_is_carried_over(run):
    _, _, dst, rows = run
    icc = big_icc()
    for key in ("big_icc.png", "big_icc.jpg"):
        row = rows[key]
        assert row["status"] == "ok" and row["warning"] is None, row
        with Image.open(row["output_uri"]) as im:
            assert im.info.get("icc_profile") == icc, key


@pytest.mark.parametrize("fmt", list(codec.FORMATS))
def test_every_output_format_holds_a_large_profile_and_one_too_large_for_jpeg_is_said(fmt):
    icc = big_icc()
    rgb = photo(9, 11, seed=6)
    for pixels in (rgb, rgb.astype(np.uint16) * 257):          # 8-bit, and 16-bit (png16 for PNG)
        back = codec.decode(codec.encode(pixels, None, fmt, 90, icc))
        assert back.icc == icc and back.warning is None, fmt
    assert codec.decode(png16.encode(rgb.astype(np.uint16) * 257, icc)).icc == icc
    # Over what a JPEG holds (255 APP2 segments): dropped at decode with a warning, never written as no profile.
    huge = big_icc(codec.MAX_ICC_BYTES + 1)
    got = codec.decode(_save(Image.fromarray(rgb), "WEBP", icc_profile=huge, lossless=True))
    assert got.icc is None and "dropped" in got.warning and str(codec.MAX_ICC_BYTES) in got.warning
    if fmt == "jpeg":
        with pytest.raises(ValueError, match="does not fit in a JPEG"):
            codec.encode(rgb, None, fmt, 90, huge)


def test_a_gray_profile_is_kept_where_the_format_has_gray_and_said_lost_in_webp():
    icc = bytes(16) + b"GRAY" + bytes(180)                       # what the codec looks at: the colour space
    gray = photo(8, 8, seed=8, channels=1)
    for fmt in ("png", "jpeg"):
        assert codec.profile_lost(fmt, gray, icc) is None
        assert Image.open(io.BytesIO(codec.encode(gray, None, fmt, 90, icc))).info.get("icc_profile") == icc
    assert "WebP has no grayscale" in codec.profile_lost("webp", gray, icc)
    webp = codec.encode(gray, None, "webp", 90, icc)            # written as RGB: a GRAY profile would be wrong
    assert Image.open(io.BytesIO(webp)).info.get("icc_profile") is None
    assert codec.profile_lost("webp", photo(8, 8), srgb_icc()) is None


def test_a_cmyk_input_whose_profile_cannot_be_read_is_converted_with_a_warning(run):
    _, _, _, rows = run
    row = rows["cmyk_bad_profile.jpg"]
    assert row["status"] == "ok" and row["source_mode"] == "CMYK", row
    assert re.fullmatch(r"CMYK profile could not be read \(.+\): converted without it; colours may differ",
                        row["warning"]), row["warning"]
    assert rows["plain.png"]["warning"] is None
    # The pixels are Pillow's conversion without a profile, as before; a profile for another space is said too.
    data = _save(_cmyk(), "JPEG", icc_profile=bad_cmyk_icc())
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(codec.decode(data).pixels, naive)
    rgb_profile = codec.decode(_save(_cmyk(), "JPEG", icc_profile=srgb_icc()))
    assert "not CMYK" in rgb_profile.warning and "converted without it" in rgb_profile.warning
    assert codec.decode(_save(_cmyk(), "JPEG")).warning is None             # no profile: nothing lost


def test_an_rgb_profile_on_a_gray_image_is_dropped_with_a_warning():
    gray = _save(Image.fromarray(photo(8, 8, seed=7, channels=1)), "JPEG", icc_profile=srgb_icc())
    got = codec.decode(gray)
    assert got.icc is None and "is for 'RGB'" in got.warning and "GRAY" in got.warning
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    assert "is for 'Lab'" in codec.decode(_save(Image.fromarray(photo(8, 8)), "JPEG", icc_profile=lab)).warning


def test_a_key_that_ends_in_a_space_is_an_input(run, tmp_path, bucket, s3_server):
    _, _, dst, rows = run
    row = rows["photo.png "]
    assert row["status"] == "ok" and row["output_uri"] == str(dst / "photo.png"), row
    assert Image.open(row["output_uri"]).size == (24, 20)
    # On S3 likewise (the listing; the job reads keys as the local run does); other names still filtered.
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for k in ("in/photo.png ", "in/a.JPG\t", "in/notes.txt ", "in/b.png"):
        s3.put_object(Bucket=bucket, Key=k, Body=b"x")
    assert [it.key for it in listing.list_inputs(f"s3://{bucket}/in")] == ["a.JPG\t", "b.png", "photo.png "]
    assert output_keys(["photo.png ", "b.png"], ".png") == ["photo.png", "b.png"]
    write_tree(tmp_path / "src", {"x.tif  ": b"", "y.txt ": b""})
    assert [it.key for it in listing.list_inputs(str(tmp_path / "src"))] == ["x.tif  "]
