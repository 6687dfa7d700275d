"""Findings of an adversarial review of the batch job, one test per finding, named after it."""

import io
import json
import os
import posixpath
import random
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib

import boto3
import numpy as np
import pytest
import requests
from PIL import Image, ImageOps

from imgxlate.cli import main
from imgxlate.infer import job
from imgxlate.io import codec, listing, manifest, png16, storage

from conftest import photo


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _jpg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG")
    return buf.getvalue()


def write_tree(root, files: dict[str, bytes]):
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def translate(*argv) -> int:
    """`imgxlate translate ARGV`, with the bicubic model unless ARGV names one."""
    args = [str(a) for a in argv]
    return main(["translate", *args] + ([] if "--model" in args else ["--model", "bicubic"]))


def rows_of(dst, run_id=None):
    dst = str(dst)
    return manifest.read_run(dst, run_id or manifest.runs(dst)[-1]).to_pylist()


def summary_of(dst, run_id):
    return json.loads(storage.read_bytes(storage.join(manifest.manifest_root(str(dst)), run_id, "summary.json")))


# ----------------------------------------------------------------------------------- 1: output keys
def _check_keys(keys, ext=".png", suffix="", sources=None):
    outs = listing.output_keys(keys, ext, suffix, sources)
    names = [o for o in outs if isinstance(o, str)]
    assert len(set(names)) == len(names), (keys, outs)
    for o in names:
        parts = o.split("/")
        assert o.endswith(suffix + ext) and parts[0] != manifest.MANIFEST_DIR, o
        assert all(p not in ("", ".", "..") for p in parts) and "\\" not in o, o
        assert posixpath.normpath(posixpath.join("/dst", o)).startswith("/dst/"), o
    order = list(range(len(keys)))
    random.Random(len(keys)).shuffle(order)
    again = listing.output_keys([keys[i] for i in order], ext, suffix,
                                None if sources is None else [sources[i] for i in order])
    assert [str(again[order.index(i)]) for i in range(len(keys))] == [str(o) for o in outs]   # order-free
    return outs


def test_output_keys_are_injective(tmp_path, ray_local):
    assert _check_keys(["a.jpg", "a.png", "a.jpg.png"])[1] == "a.png.png"
    _check_keys(["./dot.png", "dot.png"])
    _check_keys(["in//x.png", "in/x.png"])
    _check_keys(["_manifest/a.png", "_manifest_/a.png", "a.png"])
    # Every output fed back as a new input: still unique, whatever names the resolution picks.
    keys = ["a.jpg", "a.png", "a.jpg.png"]
    for _ in range(4):
        keys = sorted(set(keys) | {o for o in _check_keys(keys) if isinstance(o, str)})
    _check_keys(keys)
    # Property: many random name sets made of adversarial parts.
    rng = random.Random(11)
    parts = ["a", "a.png", "a.jpg", "a.jpg.png", "a.PNG", ".", "..", "", "_manifest", "_manifest_", "b c.png",
             "q?x=1.png", "ü.png", "a\\b.png", "a-0123456789.png", "a.png.png"]
    for _ in range(400):
        n = rng.randint(1, 12)
        keys = sorted({"/".join(rng.choice(parts) for _ in range(rng.randint(1, 3))) for _ in range(n)})
        _check_keys(keys, rng.choice([".png", ".jpg"]), rng.choice(["", "_x2"]))
    # A .txt manifest of two buckets has no common root: outputs still distinct (and readable).
    lst = tmp_path / "two-buckets.txt"
    lst.write_text("s3://b1/x/a.png\ns3://b2/y/a.png\n")
    items = listing.list_inputs(str(lst))
    outs = _check_keys([it.key for it in items], sources=[it.source_uri for it in items])
    assert len(outs) == 2
    # Through the job: the manifest records the chosen keys and each output comes from its own input.
    src, dst = tmp_path / "src", tmp_path / "dst"
    sizes = {"a.jpg": (10, 12), "a.png": (14, 16), "a.jpg.png": (18, 20)}
    write_tree(src, {k: (_jpg if k.endswith("jpg") else _png)(photo(*hw, seed=i)) for i, (k, hw) in
                     enumerate(sizes.items())})
    assert translate(src, dst, "--scale", "2") == 0
    rows = {r["key"]: r for r in rows_of(dst)}
    assert len({r["output_uri"] for r in rows.values()}) == 3 and all(r["status"] == "ok" for r in rows.values())
    for key, (h, w) in sizes.items():
        assert Image.open(rows[key]["output_uri"]).size == (2 * w, 2 * h), key


# ---------------------------------------------------------------------------------- 2: listing drops
def test_listing_never_drops_an_input(tmp_path, bucket, s3_server, ray_local):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = ["in/q?x=1.png", "in/_manifest/old.png", "in/plain.png"]
    for i, k in enumerate(names):
        s3.put_object(Bucket=bucket, Key=k, Body=_png(photo(12, 14, seed=i)))
    os.environ["AWS_ENDPOINT_URL"] = s3_server
    assert sorted(it.key for it in listing.list_inputs(f"s3://{bucket}/in")) == ["_manifest/old.png", "plain.png",
                                                                               "q?x=1.png"]
    assert translate(f"s3://{bucket}/in", f"s3://{bucket}/out", "--scale", "2") == 0
    rows = rows_of(f"s3://{bucket}/out")
    assert sorted(r["key"] for r in rows) == ["_manifest/old.png", "plain.png", "q?x=1.png"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert {r["source_uri"] for r in rows} == {f"s3://{bucket}/{k}" for k in names}     # '?' is part of a key
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert "out/q?x=1.png" in keys and "out/plain.png" in keys
    # The same locally; a signed http(s) URL still loses its query string before the extension check.
    write_tree(tmp_path / "src", {"q?x=1.png": b"", "_manifest/a.png": b"", "b.png": b""})
    assert len(listing.list_inputs(str(tmp_path / "src"))) == 3
    lst = tmp_path / "urls.txt"
    lst.write_text("https://h/p/a.png?X-Amz-Signature=s\nhttps://h/p/b.txt?x=.png\n")
    assert [it.key for it in listing.list_inputs(str(lst))] == ["a.png"]


# ------------------------------------------------------------------------------------ 3: SRC vs DST
def test_src_equal_to_dst_is_refused_and_dst_inside_src_is_excluded(tmp_path, bucket, s3_server, ray_local,
                                                                    capsys):
    src = tmp_path / "src"
    write_tree(src, {f"{i}.png": _png(photo(10, 12, seed=i)) for i in range(2)})
    for dst in (src, f"{src}/", f"{src}/./"):
        assert translate(src, dst, "--scale", "2") == 2
        assert "same folder" in capsys.readouterr().err
    assert sorted(os.listdir(src)) == ["0.png", "1.png"]                    # nothing written
    for run_id in ("r1", "r2"):
        assert translate(src, src / "out", "--scale", "2", "--run-id", run_id) == 0
    assert not (src / "out" / "out").exists()
    assert rows_of(src / "out", "r2") == [] and summary_of(src / "out", "r2")["counts"] == {"skipped_done": 2}
    # On S3.
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for i in range(2):
        s3.put_object(Bucket=bucket, Key=f"in/{i}.png", Body=_png(photo(10, 12, seed=i)))
    assert translate(f"s3://{bucket}/in", f"s3://{bucket}/in/", "--scale", "2") == 2
    assert "same folder" in capsys.readouterr().err
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 2
    for run_id in ("r1", "r2"):
        assert translate(f"s3://{bucket}/in", f"s3://{bucket}/in/out", "--scale", "2", "--run-id", run_id) == 0
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert not any(k.startswith("in/out/out/") for k in keys), keys
    os.environ["AWS_ENDPOINT_URL"] = s3_server
    assert summary_of(f"s3://{bucket}/in/out", "r2")["counts"] == {"skipped_done": 2}


# -------------------------------------------------------------------------------------- 4: recipe
def test_resume_compares_the_recipe(tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {f"{i}.png": _png(photo(10, 12, seed=i)) for i in range(2)})
    assert translate(src, dst, "--scale", "2", "--run-id", "x2") == 0
    assert translate(src, dst, "--scale", "3", "--run-id", "x3") == 0
    x2, x3 = rows_of(dst, "x2"), rows_of(dst, "x3")
    assert [r["status"] for r in x3] == ["ok", "ok"]
    assert all(Image.open(dst / f"{i}.png").size == (36, 30) for i in range(2))   # x3 outputs
    assert x2[0]["recipe"] and x3[0]["recipe"] and x2[0]["recipe"] != x3[0]["recipe"]
    assert translate(src, dst, "--scale", "3", "--run-id", "x3-again") == 0
    assert rows_of(dst, "x3-again") == [] and summary_of(dst, "x3-again")["counts"] == {"skipped_done": 2}
    assert translate(src, dst, "--scale", "3", "--tile", "64", "--run-id", "x3-tiled") == 0
    assert [r["status"] for r in rows_of(dst, "x3-tiled")] == ["ok", "ok"]


# ------------------------------------------------------------------------------------- 5: secrets
def test_secrets_in_uris_are_never_printed(tmp_path, capsys, monkeypatch):
    key_id, secret = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    leaked = f"s3://{key_id}:{secret}@bucket/in"
    src = tmp_path / "src"
    write_tree(src, {"a.png": _png(photo(8, 8))})
    for argv in ([leaked, tmp_path / "o"], [src, leaked], [src, tmp_path / "o", "--model", leaked + "/model"]):
        assert translate(*argv, "--scale", "2") == 2
        out, err = capsys.readouterr()
        assert "credentials" in err, err
        for text in (out, err):
            assert secret not in text and key_id not in text and secret.split("/")[0] not in text
    # A storage error that quotes a URL with user info: exit 2, redacted.
    def unreadable(*args, **kwargs):
        raise OSError(f"cannot list https://{key_id}:{secret}@host/_manifest")

    monkeypatch.setattr(manifest, "shard_markers", unreadable)
    assert translate(src, tmp_path / "o", "--scale", "2") == 2
    out, err = capsys.readouterr()
    assert "cannot list https://host/_manifest" in err and secret not in out + err and key_id not in err
    # Any exception that escapes is printed redacted, traceback included.
    monkeypatch.setattr(job, "planner", unreadable)
    assert translate(src, tmp_path / "o", "--scale", "2") == 1
    out, err = capsys.readouterr()
    assert "Traceback" in err and "OSError: cannot list https://host/_manifest" in err
    assert secret not in out + err and secret.split("/")[0] not in err and key_id not in err
    from imgxlate.io.listing import redact, redact_text

    assert redact(leaked) == "s3://bucket/in" and redact(f"ftp://u:{secret}@host:21/x") == "ftp://host:21/x"
    assert redact("s3://b/icons/logo@2x.png") == "s3://b/icons/logo@2x.png"
    assert secret not in redact_text(f"GET sftp://{key_id}:{secret}@h/x failed")


# ------------------------------------------------------------------------------- 6: access denied
def test_access_denied_on_dst_exits_2_naming_the_bucket(tmp_path, bucket, s3_server):
    """moto enforces IAM user policies (not bucket policies) once its authentication is switched on
    through the server's own API; the job runs in a fresh process with that user's credentials."""
    src = tmp_path / "src"
    write_tree(src, {"a.png": _png(photo(8, 8))})
    iam = boto3.client("iam", endpoint_url=s3_server)
    keys = {}
    for user, actions in (("no-dst", "s3:*"), ("no-put", "s3:PutObject")):
        iam.create_user(UserName=f"{user}-{bucket}")
        iam.put_user_policy(UserName=f"{user}-{bucket}", PolicyName="p", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": actions,
                 "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
        keys[user] = iam.create_access_key(UserName=f"{user}-{bucket}")["AccessKey"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "AWS_ENDPOINT_URL": s3_server}
    results = {}
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0").raise_for_status()
    try:
        for user, k in keys.items():
            results[user] = subprocess.run(
                [sys.executable, "-m", "imgxlate.cli", "translate", str(src), f"s3://{bucket}/out",
                 "--model", "bicubic", "--scale", "2"], capture_output=True, text=True, timeout=300,
                env={**env, "AWS_ACCESS_KEY_ID": k["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": k["SecretAccessKey"]})
    finally:
        requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf").raise_for_status()
    for user, r in results.items():
        assert r.returncode == 2, (user, r.stderr[-3000:])
        assert f"access denied on bucket '{bucket}'" in r.stderr and "Traceback" not in r.stderr, (user, r.stderr)
    assert boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket)["KeyCount"] == 0


# ------------------------------------------------------------------------- 7: 16-bit PNG: bomb, filters
def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def png_with_filters(pixels: np.ndarray, filters) -> bytes:
    """A 16-bit PNG whose row y uses filter ``filters[y % len(filters)]`` (the spec's encoder side)."""
    a = pixels[..., None] if pixels.ndim == 2 else pixels
    h, w, c = a.shape
    bpp = 2 * c
    raw = np.ascontiguousarray(a.astype(">u2")).view(np.uint8).reshape(h, w * bpp).astype(np.int32)
    out = []
    for y in range(h):
        x, up = raw[y], raw[y - 1] if y else np.zeros_like(raw[0])
        left, upleft = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]]), np.concatenate(
            [np.zeros(bpp, np.int32), up[:-bpp]])
        f = filters[y % len(filters)]
        pred = [0, left, up, (left + up) // 2, _paeth(left, up, upleft)][f]
        out.append(bytes([f]) + ((x - pred) & 0xFF).astype(np.uint8).tobytes())
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return png16.SIGNATURE + png16._chunk(b"IHDR", ihdr) + png16._chunk(b"IDAT", zlib.compress(b"".join(out))) + \
        png16._chunk(b"IEND", b"")


def test_png16_bomb_is_refused_and_unfiltering_is_exact_and_fast():
    # A 64x64 RGB16 header over an IDAT that inflates to 200 MB.
    z, chunk = zlib.compressobj(9), bytes(1 << 20)
    idat = b"".join(z.compress(chunk) for _ in range(200)) + z.flush()
    bomb = png16.SIGNATURE + png16._chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 16, 2, 0, 0, 0)) + \
        png16._chunk(b"IDAT", idat) + png16._chunk(b"IEND", b"")
    assert len(bomb) < 400_000
    tracemalloc.start()
    try:
        with pytest.raises(codec.DecodeError, match="more data than"):
            codec.decode(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, peak
    # Every filter type, alone and mixed, every colour type, odd sizes: exact, and Pillow agrees.
    rng = np.random.default_rng(7)
    for c in (1, 2, 3, 4):
        for h, w in ((1, 1), (1, 9), (7, 1), (23, 37)):
            px = rng.integers(0, 65536, (h, w, c), dtype=np.uint16)
            if h > 1:
                px[h // 2:] = px[h // 2:] // 257 * 257 + 7        # smooth-ish half: different predictions
            for filters in ([0], [1], [2], [3], [4], [4, 3, 1, 0, 2, 3, 4]):
                data = png_with_filters(px[..., 0] if c == 1 else px, filters)
                got, _ = png16.decode(data)
                np.testing.assert_array_equal(got, px, err_msg=f"c={c} {h}x{w} filters={filters}")
                ref = np.asarray(Image.open(io.BytesIO(data)))
                if c == 1:
                    np.testing.assert_array_equal(ref, px[..., 0])                  # Pillow keeps 16-bit gray
                elif c in (3, 4):
                    np.testing.assert_array_equal(ref, (px >> 8).astype(np.uint8))  # ... and the high bytes
    # Speed: a 768x768 RGB16 Paeth PNG took 3.8 s with the per-pixel loop; about 0.1 s now.
    big = rng.integers(0, 65536, (768, 768, 3), dtype=np.uint16)
    data = png_with_filters(big, [4])
    t0 = time.perf_counter()
    got, _ = png16.decode(data)
    assert time.perf_counter() - t0 < 1.0
    np.testing.assert_array_equal(got, big)


# -------------------------------------------------------------------------------- 8: 16-bit TIFF
def tiff16(pixels: np.ndarray, order: str = "<", deflate: bool = False, orientation: int = 1) -> bytes:
    """A baseline 16-bit RGB / RGBA TIFF (one strip, unassociated alpha), little or big endian."""
    h, w, c = pixels.shape
    strip = np.ascontiguousarray(pixels.astype(order + "u2")).tobytes()
    if deflate:
        strip = zlib.compress(strip)
    bps_at = 8
    data_at = bps_at + 2 * c
    entries = [(256, 4, w), (257, 4, h), (258, 3, (c, bps_at)), (259, 3, 8 if deflate else 1), (262, 3, 2),
               (273, 4, data_at), (277, 3, c), (278, 4, h), (279, 4, len(strip)), (284, 3, 1)]
    if c == 4:
        entries.append((338, 3, 2))
    if orientation != 1:
        entries = sorted(entries + [(274, 3, orientation)])
    ifd_at = data_at + len(strip) + (len(strip) & 1)
    out = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, ifd_at)
    out += struct.pack(order + f"{c}H", *[16] * c) + strip + b"\0" * (len(strip) & 1)
    out += struct.pack(order + "H", len(entries))
    for tag, typ, value in entries:
        if isinstance(value, tuple):
            out += struct.pack(order + "HHII", tag, typ, value[0], value[1])
        elif typ == 3:
            out += struct.pack(order + "HHIHH", tag, typ, 1, value, 0)
        else:
            out += struct.pack(order + "HHII", tag, typ, 1, value)
    return out + struct.pack(order + "I", 0)


def test_16bit_rgb_tiff_stays_16bit(tmp_path, ray_local):
    px = (photo(20, 24, seed=3).astype(np.uint16) * 257) ^ np.uint16(0x5A)       # low bytes matter
    rgba = np.dstack([px, np.full((20, 24), 40000, np.uint16)])
    for pixels in (px, rgba):
        for order in "<>":
            for deflate in (False, True):
                img = codec.decode(tiff16(pixels, order, deflate))
                assert img.bits == 16 and img.mode == ("RGB;16" if pixels is px else "RGBA;16"), (order, deflate)
                np.testing.assert_array_equal(img.pixels, pixels[..., :3])
                if pixels is rgba:
                    np.testing.assert_array_equal(img.alpha, rgba[..., 3])
    for orientation in range(1, 9):                # EXIF orientation applied as for every other image
        turned = Image.open(io.BytesIO(tiff16(px, orientation=orientation)))
        expected = np.asarray(ImageOps.exif_transpose(turned))
        np.testing.assert_array_equal(codec.decode(tiff16(px, orientation=orientation)).pixels >> 8, expected)
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"scan16.tif": tiff16(px, deflate=True)})
    assert translate(src, dst, "--scale", "2") == 0
    (row,) = rows_of(dst)
    assert row["status"] == "ok" and row["source_mode"] == "RGB;16", row
    out = codec.decode((dst / "scan16.png").read_bytes())
    assert out.bits == 16 and out.pixels.shape == (40, 48, 3)


# ------------------------------------------------------------------ 11 (partial): run id, empty source
def test_run_id_is_validated_and_an_empty_source_exits_0(tmp_path, capsys):
    src = tmp_path / "src"
    write_tree(src, {"a.png": _png(photo(8, 8)), "notes.txt": b"not an image"})
    for bad in ("../x", "a/b", "..", ".", "a\\b", "x y", ""):
        assert translate(src, tmp_path / "dst", "--run-id", bad) == 2, bad
        assert "--run-id" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
    empty = tmp_path / "empty"
    write_tree(empty, {"notes.txt": b"not an image"})
    assert translate(empty, tmp_path / "dst") == 0
    assert "no inputs" in capsys.readouterr().err and not (tmp_path / "dst").exists()
    assert translate(tmp_path / "missing", tmp_path / "dst") == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 9: SIGTERM / SIGINT
def _descendants(pid: int) -> set[int]:
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


def _alive(pids) -> set[int]:
    alive = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(p)
        except OSError:
            pass
    return alive


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_drain_record_every_output_and_leave_no_ray_process(sig, code, tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {f"img{i:03d}.png": _png(photo(160, 160, seed=i)) for i in range(60)})
    cmd = [sys.executable, "-m", "imgxlate.cli", "translate", str(src), str(dst), "--model", "bicubic",
           "--scale", "4", "--batch-size", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240

    def written():
        return sorted(p.name for p in dst.glob("*.png"))
    while time.time() < deadline and len(written()) < 3 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be signalled"
    tree = _descendants(proc.pid)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)           # Ctrl-C reaches the whole foreground process group
    else:
        os.kill(proc.pid, sig)             # `kill PID`, or an orchestrator stopping the driver
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "core_worker" not in err and "draining" in err
    summary = json.loads(next((dst / "_manifest").glob("*/summary.json")).read_text())
    assert summary["interrupted"] == signal.Signals(sig).name
    rows = rows_of(dst)
    ok = sorted(posixpath.basename(r["output_uri"]) for r in rows if r["status"] == "ok")
    assert ok == written() and 3 <= len(ok) < 60                 # every written output has its row
    assert summary["not_started"] == 60 - len(rows)
    assert not list(dst.rglob("*imgxlate-tmp*"))
    deadline = time.time() + 30
    while _alive(tree) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(tree), "Ray processes outlived the interrupted run"
    assert translate(src, dst, "--scale", "4") == 0                # the rerun finishes the rest
    assert written() == [f"img{i:03d}.png" for i in range(60)]
    last = rows_of(dst)                                              # only what was left to do
    assert len(last) == 60 - len(ok) and all(r["status"] == "ok" for r in last)
    assert json.loads(next(p for p in (dst / "_manifest").glob("*/summary.json") if p.parent.name == last[0][
        "run_id"]).read_text())["counts"] == {"ok": 60 - len(ok), "skipped_done": len(ok)}


# ----------------------------------------------------------------------------------- 10: one run at a time
def test_a_second_run_on_the_same_dst_waits_or_stops_with_a_clear_message(tmp_path, capsys, ray_local):
    from imgxlate.io.lease import Lease

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {f"img{i}.png": _png(photo(32, 32, seed=i)) for i in range(4)})
    holder = Lease(str(dst), "other-run").acquire()              # a run in progress elsewhere
    try:
        (dst / "x.png.imgxlate-tmp-123").write_bytes(b"in flight")   # its temporary file
        assert translate(src, dst, "--scale", "2") == 2
        err = capsys.readouterr().err
        assert "destination in use: run other-run" in err and "--wait-for-lease" in err
        assert (dst / "x.png.imgxlate-tmp-123").exists()         # nothing of the other run was touched
        assert not list(dst.glob("img*.png"))
    finally:
        holder.release()
    assert translate(src, dst, "--scale", "2", "--wait-for-lease", "5") == 0
    assert sorted(r["status"] for r in rows_of(dst)) == ["ok"] * 4


# ------------------------------------------------------------------- 11: smaller findings (the rest)
def test_a_killed_runs_dst_is_reported_and_a_dry_run_checks_dst(tmp_path, capsys, s3_server, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {f"img{i}.png": _png(photo(24, 24, seed=i)) for i in range(3)})
    assert translate(src, dst, "--scale", "2", "--run-id", "first") == 0
    rows = rows_of(dst, "first")
    (dst / "_manifest" / "first" / "summary.json").unlink()          # as a SIGKILL leaves it: parts, no summary
    capsys.readouterr()
    assert main(["report", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "first (killed: no summary)" in out and len(rows) == 3
    assert translate(src, f"s3://no-such-bucket-{os.getpid()}/out", "--scale", "2", "--dry-run") == 2
    assert "does not exist" in capsys.readouterr().err
