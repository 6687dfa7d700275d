"""The batch job end to end: local folders and a real S3-protocol server, through Ray Data."""

import datetime as dt
import io
import json
import os

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgxlate.artifact import save
from imgxlate.cli import main
from imgxlate.infer import job
from imgxlate.io import codec, manifest
from imgxlate.models import build

from conftest import photo
from faultproxy import FaultProxy
from fixtures import bad_files, good_files, png, rows_of, translate


def write_tree(root, files: dict[str, bytes]):
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def run(src, dst, **kw):
    kw.setdefault("model", "bicubic")
    kw.setdefault("progress_every_s", 60)
    return job.run(job.TranslateConfig(src=str(src), dst=str(dst), **kw))


def rows_by_key(dst, summary):
    return {r["key"]: r for r in manifest.read_run(str(dst), summary["run_id"]).to_pylist()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ray_local):
    """One run over every good and bad fixture, shared by the assertions below."""
    src, dst = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dst")
    write_tree(src, good_files())
    write_tree(src, {n: b for n, (b, _) in bad_files().items()})
    summary = run(src, dst, scale=2)
    return src, dst, summary, rows_by_key(dst, summary)


def test_every_bad_input_gets_a_row_and_the_rest_are_processed(local_run):
    _, dst, summary, rows = local_run
    assert len(rows) == len(good_files()) + len(bad_files()) == summary["inputs"]
    for name, (_, status) in bad_files().items():
        assert rows[name]["status"] == status, (name, rows[name])
        assert rows[name]["error"], name
        assert not (dst / name).with_suffix(".png").exists()
    for name in good_files():
        assert rows[name]["status"] == "ok", (name, rows[name]["error"])
    assert "animated" in rows["animated.gif"]["error"] and "MP" in rows["100mp.png"]["error"]
    assert summary["counts"] == {"decode_error": 5, "ok": len(good_files()), "too_large": 1}


def test_report_of_a_batch_dst(local_run, capsys):
    _, dst, summary, _ = local_run
    assert main(["report", str(dst), "--slowest", "3"]) == 0
    text = capsys.readouterr().out
    assert f"{summary['inputs']} inputs seen across 1 run(s)" in text
    assert f"ok {len(good_files())}" in text and "still failing: 6" in text
    assert "## Slowest 3 inputs" in text and "## Sample errors" in text and "| too_large | 100mp.png |" in text
    assert "where the time went" in text and "model work by node" in text


def test_runs_are_ordered_by_when_they_started_not_by_their_names(tmp_path, capsys):
    """A --run-id is a name the user chooses: 'zeta' ran first and failed an input, 'alpha' redid it once the
    input was fixed. manifest.runs(), the report's runs table and the current state of every input go by when
    each run started (its summary.json's started_at), not by the names."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"a.png": png(photo(24, 24)), "b.png": b"not an image"})
    assert translate(src, dst, "--scale", "2", "--run-id", "zeta") == 0
    write_tree(src, {"b.png": png(photo(24, 24, seed=1))})
    assert translate(src, dst, "--scale", "2", "--run-id", "alpha") == 0
    assert manifest.runs(str(dst)) == manifest.all_runs(str(dst)) == ["zeta", "alpha"]
    assert [r["status"] for r in rows_of(dst)] == ["ok"]            # the latest run: alpha, which redid b.png
    capsys.readouterr()
    assert main(["report", str(dst)]) == 0
    text = capsys.readouterr().out
    assert "current state: ok 2" in text and "still failing: 0" in text, text
    assert text.index("| zeta |") < text.index("| alpha |"), text


def test_run_order_falls_back_to_older_summaries_and_to_a_killed_runs_first_part(tmp_path):
    """Summaries written before runs recorded started_at are placed by finished_at less wall_s; a killed run
    (parts, no summary) by the time in its id when the job made the id (a copied DST's files have the copy's
    times), else by its earliest part's time; a summary that says neither, by its file's time."""
    root = tmp_path / "_manifest"
    for run_id, summary in {"b-new": {"started_at": "2026-12-07T10:00:00.500+00:00"},
                            "c-old": {"finished_at": "2026-12-07T10:00:30+00:00", "wall_s": 40},
                            "a-blank": {}}.items():
        (root / run_id).mkdir(parents=True)
        (root / run_id / "summary.json").write_text(json.dumps(summary))
    (root / "d-killed").mkdir()
    (root / "d-killed" / "part-000.parquet").write_bytes(b"")
    t = dt.datetime(2026, 12, 7, 10, 0, 0, tzinfo=dt.timezone.utc).timestamp()
    os.utime(root / "d-killed" / "part-000.parquet", (t, t))           # between c-old (09:59:50) and b-new
    os.utime(root / "a-blank" / "summary.json", (t + 60, t + 60))      # last
    (root / "20261207T095900Z-0a1b2c").mkdir()                          # killed, in a copy made later
    (root / "20261207T095900Z-0a1b2c" / "part-000.parquet").write_bytes(b"")
    os.utime(root / "20261207T095900Z-0a1b2c" / "part-000.parquet", (t + 99, t + 99))
    assert manifest.all_runs(str(tmp_path)) == ["20261207T095900Z-0a1b2c", "c-old", "d-killed", "b-new", "a-blank"]
    assert manifest.runs(str(tmp_path)) == ["c-old", "b-new", "a-blank"]


def _out(dst, name):
    return Image.open(dst / (os.path.splitext(name)[0] + ".png"))


def test_fidelity_of_outputs(local_run):
    src, dst, _, rows = local_run
    assert _out(dst, "64x48_rgb.jpg").size == (128, 96)
    rgba = np.asarray(_out(dst, "40x40_rgba.png"))
    assert rgba.shape == (80, 80, 4) and rgba[..., 3].min() < 10 and rgba[..., 3].max() > 245  # alpha kept
    assert _out(dst, "24x32_gray_alpha.png").mode == "LA"
    pal = _out(dst, "30x30_palette_transparent.png")
    assert pal.mode == "RGBA" and np.asarray(pal)[..., 3].min() == 0 and rows["30x30_palette_transparent.png"][
        "source_mode"] == "P"
    assert _out(dst, "36x20_exif_rotated.jpg").size == (40, 72)        # orientation applied, then x2
    assert _out(dst, "gray.png").mode == "L"
    assert _out(dst, "64x48_cmyk.jpg").mode == "RGB" and rows["64x48_cmyk.jpg"]["source_mode"] == "CMYK"
    icc = Image.open(src / "64x48_rgb_icc.png").info["icc_profile"]
    assert icc and _out(dst, "64x48_rgb_icc.png").info.get("icc_profile") == icc
    g16 = _out(dst, "20x24_gray16.png")
    assert g16.mode.startswith("I") and np.asarray(g16).max() > 255  # 16-bit in, 16-bit out
    c16 = codec.decode((dst / "18x22_rgb16.png").read_bytes())
    assert c16.bits == 16 and c16.pixels.shape == (44, 36, 3)
    np.testing.assert_allclose(c16.pixels[::2, ::2].astype(float) / 257, codec.decode(
        (src / "18x22_rgb16.png").read_bytes()).pixels.astype(float) / 257, atol=40)


def test_manifest_schema_and_summary(local_run, ray_local):
    _, dst, summary, rows = local_run
    run_dir = dst / "_manifest" / summary["run_id"]
    table = pq.read_table(next(run_dir.glob("part-*.parquet")))
    assert table.schema.names == manifest.SCHEMA.names and "path" not in table.schema.names
    r = rows["64x48_rgb.jpg"]
    assert r["output_width"] == 128 and r["output_format"] == "png" and len(r["output_sha256"]) == 64
    assert r["model_id"] == "bicubic-x2" and r["task"] == "sr" and r["attempt"] == 1
    assert r["node_id"] and r["worker_id"] and r["t_model_s"] is not None
    import hashlib

    assert hashlib.sha256((dst / "64x48_rgb.png").read_bytes()).hexdigest() == r["output_sha256"]
    # Ray's own reader sees every column.
    ds = ray_local.data.read_parquet(str(run_dir), file_extensions=["parquet"])
    assert set(ds.schema().names) == set(manifest.SCHEMA.names) and ds.count() == len(rows)
    import json

    s = json.loads((run_dir / "summary.json").read_text())
    assert s["counts"]["ok"] == len(good_files()) and s["model_id"] == "bicubic-x2" and s["images_per_s"] > 0


def test_rerun_skips_done_and_retries_failed(tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    good = {f"a/{i}.png": Image.fromarray(photo(20, 24, seed=i)) for i in range(3)}
    write_tree(src, {k: _png(v) for k, v in good.items()})
    full = (src / "a/0.png").read_bytes()
    (src / "a/0.png").write_bytes(full[:40])                      # interrupted upload: truncated
    first = run(src, dst, scale=2)
    assert first["counts"] == {"decode_error": 1, "ok": 2}
    mtimes = {p: p.stat().st_mtime_ns for p in (dst / "a").glob("*.png")}
    (src / "a/0.png").write_bytes(full)                            # fixed at the source
    second = run(src, dst, scale=2)
    rows = rows_by_key(dst, second)
    assert second["counts"] == {"ok": 1, "skipped_done": 2}
    assert rows["a/0.png"]["status"] == "ok" and rows["a/0.png"]["attempt"] == 2
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # done outputs untouched
    third = run(src, dst, scale=2, png_level=9)                    # zlib's level is no part of the recipe:
    assert third["counts"] == {"skipped_done": 3}                  # same pixels, so nothing to redo
    assert sorted(p.name for p in (dst / "a").iterdir()) == ["0.png", "1.png", "2.png"]


def _png(im):
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_png_level_changes_the_size_never_the_pixels():
    rgb = photo(64, 80, seed=5)
    alpha = photo(64, 80, seed=6, channels=1)
    for px, a in ((rgb, None), (rgb, alpha), (rgb.astype(np.uint16) * 257, None), (alpha.astype(np.uint16) * 3, None)):
        sizes = {}
        for level in (0, None, 1, 9):                              # None: the default, level 1 with RLE
            data = codec.encode(px, a, "png", png_level=level)
            back = codec.decode(data)
            assert np.array_equal(back.pixels, px) and (a is None or np.array_equal(back.alpha, a)), level
            sizes[level] = len(data)
        assert sizes[0] > sizes[1] >= sizes[9] and sizes[None] < sizes[0], (px.dtype, sizes)
        assert sizes[None] <= 1.1 * sizes[9], (px.dtype, sizes)   # 8-bit RLE / 16-bit level 1: near level 9


def test_tiled_equals_untiled_through_the_job(tmp_path, ray_local):
    src = tmp_path / "src"
    write_tree(src, {"big.png": _png(Image.fromarray(photo(150, 190, seed=3)))})
    model = tmp_path / "tiny"
    save(build("sr", preset="tiny", scale=2), str(model))
    run(src, tmp_path / "whole", model=str(model), tile=1024)
    run(src, tmp_path / "tiled", model=str(model), tile=64, overlap=24)
    a = np.asarray(Image.open(tmp_path / "whole/big.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "tiled/big.png")).astype(int)
    assert a.shape == b.shape == (300, 380, 3) and np.abs(a - b).max() <= 1


def test_dry_run_counts_and_writes_nothing(tmp_path, ray_local, capsys):
    src = tmp_path / "src"
    write_tree(src, {f"{i}.png": _png(Image.fromarray(photo(30, 40, seed=i))) for i in range(4)})
    write_tree(src, {"notes.txt": b"not an image"})
    assert main(["translate", str(src), str(tmp_path / "dst"), "--model", "bicubic", "--scale", "4",
                 "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "4 inputs" in err and "4 to process" in err and "estimated output" in err
    assert not (tmp_path / "dst").exists()


def test_s3_to_s3_with_503s_and_resets_absorbed(bucket, s3_server, ray_local, capsys):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = ["in/scans 1901/page one.png", "in/über/ß.png", "in/a/b/c/deep.jpg", "in/top.png"]
    for i, k in enumerate(names):
        im = Image.fromarray(photo(24, 32, seed=i))
        s3.put_object(Bucket=bucket, Key=k, Body=_png(im) if k.endswith("png") else _save_jpg(im))
    s3.put_object(Bucket=bucket, Key="in/bad.jpg", Body=b"\xff\xd8 not really")
    with FaultProxy(s3_server, every=3, max_faults=12, resets=True) as proxy:
        code = main(["translate", f"s3://{bucket}/in", f"s3://{bucket}/out", "--model", "bicubic", "--scale", "2",
                     "--s3-endpoint", proxy.url, "--suffix", "_x2"])
        assert code == 0
        assert proxy.faults_503 > 0 and proxy.faults_reset > 0
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    outs = {k for k in keys if not k.startswith("out/_manifest/")}
    assert outs == {"out/scans 1901/page one_x2.png", "out/über/ß_x2.png", "out/a/b/c/deep_x2.png",
                    "out/top_x2.png"}
    body = s3.get_object(Bucket=bucket, Key="out/über/ß_x2.png")["Body"].read()
    assert Image.open(io.BytesIO(body)).size == (64, 48)
    summary_keys = [k for k in keys if k.endswith("summary.json")]
    assert len(summary_keys) == 1
    os.environ["AWS_ENDPOINT_URL"] = s3_server
    rows = manifest.read_all(f"s3://{bucket}/out").to_pylist()
    assert {r["status"] for r in rows} == {"ok", "decode_error"} and len(rows) == 5
    assert "testing" not in capsys.readouterr().err                    # no credentials in the logs


def _save_jpg(im):
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    return buf.getvalue()


def test_permanent_destination_errors_stop_before_work(tmp_path, bucket, s3_server, ray_local, capsys):
    src = tmp_path / "src"
    write_tree(src, {"a.png": _png(Image.fromarray(photo(20, 20)))})
    assert main(["translate", str(src), "s3://no-such-bucket-xyz/out", "--model", "bicubic",
                 "--s3-endpoint", s3_server]) == 2
    assert "bucket 'no-such-bucket-xyz' does not exist" in capsys.readouterr().err
    with FaultProxy(s3_server, deny_write_buckets=(bucket,)) as proxy:
        assert main(["translate", str(src), f"s3://{bucket}/out", "--model", "bicubic",
                     "--s3-endpoint", proxy.url]) == 2
    err = capsys.readouterr().err
    assert f"access denied on bucket '{bucket}'" in err
    assert "Contents" not in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket)
    assert main(["translate", str(tmp_path / "missing"), str(tmp_path / "o"), "--model", "bicubic"]) == 2


def test_unsafe_keys_get_a_row_and_never_escape(bucket, s3_server, ray_local):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket=bucket, Key="in/ok.png", Body=_png(Image.fromarray(photo(16, 16))))
    s3.put_object(Bucket=bucket, Key="in/../../escape.png", Body=_png(Image.fromarray(photo(16, 16))))
    os.environ["AWS_ENDPOINT_URL"] = s3_server
    summary = run(f"s3://{bucket}/in", f"s3://{bucket}/out/", scale=2)
    rows = manifest.read_run(f"s3://{bucket}/out", summary["run_id"]).to_pylist()
    bad = [r for r in rows if r["status"] == "write_error"]
    assert len(bad) == 1 and "leave the destination" in bad[0]["error"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert not any(k.startswith("escape") or k == "out/../escape.png" for k in keys)
    assert "out/ok.png" in keys


def test_signed_urls_are_read_but_never_logged(tmp_path, bucket, s3_server, ray_local, capsys):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket=bucket, Key="p/photo.png", Body=_png(Image.fromarray(photo(16, 20))))
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "p/photo.png"}, ExpiresIn=600)
    assert "Signature" in url
    listing = tmp_path / "inputs.txt"
    listing.write_text(url + "\n")
    summary = run(str(listing), tmp_path / "dst", scale=2)
    assert summary["counts"] == {"ok": 1}
    row = rows_by_key(tmp_path / "dst", summary)["photo.png"]
    assert "Signature" not in row["source_uri"] and "?" not in row["source_uri"]
    assert "Signature" not in capsys.readouterr().err
    assert (tmp_path / "dst" / "photo.png").exists()


def test_segmentation_writes_masks_and_cutouts(tmp_path, ray_local):
    src = tmp_path / "src"
    write_tree(src, {"car.jpg": _save_jpg(Image.fromarray(photo(40, 56, seed=5)))})
    save(build("unet", n_classes=1), str(tmp_path / "unet"))
    run(src, tmp_path / "masks", model=str(tmp_path / "unet"))
    mask = Image.open(tmp_path / "masks/car.png")
    assert mask.mode == "L" and mask.size == (56, 40) and set(np.unique(mask)) <= {0, 255}
    run(src, tmp_path / "cut", model=str(tmp_path / "unet"), cutout=True, format="webp")
    cut = Image.open(tmp_path / "cut/car.webp")
    assert cut.mode == "RGBA" and cut.size == (56, 40)


def test_fail_on_error_exit_status(tmp_path, ray_local):
    src = tmp_path / "src"
    write_tree(src, {"ok.png": _png(Image.fromarray(photo(16, 16))), "bad.png": b"junk"})
    args = ["translate", str(src), str(tmp_path / "dst"), "--model", "bicubic"]
    assert main(args) == 0
    assert main(args + ["--fail-on-error"]) == 1   # the bad input is retried, fails again


def test_redaction_of_urls_in_messages():
    from imgxlate.io.listing import redact, redact_text

    msg = "ClientError: GET https://user:pw@host:9000/b/k.jpg?X-Amz-Signature=abc&X-Amz-Credential=AKIA failed"
    assert redact_text(msg) == "ClientError: GET https://host:9000/b/k.jpg failed"
    assert redact("https://h/k.jpg?X-Amz-Signature=1") == "https://h/k.jpg" and redact("/tmp/a b.png") == "/tmp/a b.png"
    assert redact("s3://bucket/q?x=1.png") == "s3://bucket/q?x=1.png"    # outside http(s), '?' is part of a key


def test_split_pipeline_writes_what_the_fused_one_writes(local_run, tmp_path):
    """The split pipeline (I/O tasks around the model actors: the GPU default) and the fused one (the CPU default,
    which local_run used) give every input the same status and the same output bytes."""
    src, _, fused, fused_rows = local_run
    split = run(src, tmp_path / "split", scale=2, pipeline="split")
    assert fused["resources"]["pipeline"] == "fused" and split["resources"]["pipeline"] == "split"
    split_rows = rows_by_key(tmp_path / "split", split)
    assert split_rows.keys() == fused_rows.keys()
    for key, r in split_rows.items():
        assert (r["status"], r["output_sha256"]) == (fused_rows[key]["status"], fused_rows[key]["output_sha256"]), key
