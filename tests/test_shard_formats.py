"""WebDataset tars and Parquet image-bytes columns in, and webdataset / parquet shards out: tars written by the
`webdataset` package's own writer (as img2dataset writes them) are read member by member with their samples'
other members; what imgxlate writes reads back with `webdataset.WebDataset`, Ray's `read_webdataset`, pyarrow
and Ray's `read_parquet`, sample for sample; bad tars, members and rows are rows; a killed run's rerun redoes
only the unfinished shards, whole; and the same over the S3 test server with a brace pattern."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgxlate.io import shards

from conftest import photo
from fixtures import alive, descendants, png, rows_of, summary_of, translate, wait_for


def _write_tar(path, samples: list[dict]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def _samples(tar: int, n: int, size: int = 24) -> list[dict]:
    return [{"__key__": f"{tar:02d}{i:04d}", "png": png(photo(size, size + 8, seed=100 * tar + i)),
             "json": {"tar": tar, "i": i}, "txt": f"caption {tar}/{i}"} for i in range(n)]


def test_brace_patterns_and_fragments():
    assert shards.expand_braces("s3://b/x/{00008..00011}.tar") == [f"s3://b/x/{i:05d}.tar" for i in range(8, 12)]
    assert shards.expand_braces("a/{x,y}-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "a/y-1.tar", "a/y-2.tar"]
    assert shards.is_webdataset("s3://b/{0..3}.tar") and shards.is_webdataset("a.TAR")
    assert not shards.is_webdataset("s3://b/photos")
    assert shards.sample_key("dir/000123.seg.png") == ("dir/000123", "seg.png")
    long = "d" * 150 + "/ü" + "n" * 120 + ".png"                    # pax headers: any length, UTF-8
    data = shards.fragment([("a.png", b"x" * 700), (long, b"y")]) + shards.fragment([("b.json", b"{}")])
    assert list(shards.members_of(data)) == [("a.png", b"x" * 700), (long, b"y"), ("b.json", b"{}")]


def test_nested_braces_list_a_tar_once_and_members_keep_their_names_when_the_tar_key_is_rewritten(tmp_path):
    from imgxlate.infer.plan import Planner

    assert shards.expand_braces("x/{a,{a,b}}.tar") == ["x/a.tar", "x/b.tar"]
    src = tmp_path / "src"
    (src / "_manifest").mkdir(parents=True)
    _write_tar(src / "_manifest" / "s.tar", _samples(0, 2))      # its outputs go to _manifest_/ (keys.output_keys)
    p = Planner(str(src), str(tmp_path / "dst"), [".png"], None, "png", "", "r1", "recipe",
                input_format="webdataset", output_format="webdataset")
    try:
        rows = [r for sh in p.take(100, timeout=30) for t in sh.tables() for r in t.to_pylist()]
    finally:
        p.stop()
    assert sorted(r["out_member"] for r in rows) == ["000000.png", "000001.png"]    # before: "/000000.png"
    assert {r["output_uri"].split("#")[0] for r in rows} == {str(tmp_path / "dst" / "_manifest_" / "s.tar")}


def test_tar_index_finds_every_way_a_tar_is_cut_short_and_gives_sidecars_once(tmp_path):
    from imgxlate.io import listing

    path = tmp_path / "a.tar"
    _write_tar(path, [{"__key__": "x", "left.png": b"L", "right.png": b"R", "json": b"{}"},
                      {"__key__": "y", "png": b"Y"}, {"__key__": "x", "png": b"X2", "txt": b"later"}])
    whole = path.read_bytes()
    members, problem = shards.read_index(str(path))
    assert problem is None and [m.name for m in members] == ["x.json", "x.left.png", "x.right.png", "y.png",
                                                             "x.png", "x.txt"]
    tar = listing.Item(str(path), "a.tar", len(whole))
    items = {it.key: it for it in shards.items(tar, listing.IMAGE_EXTS)}
    assert json.loads(items["a.tar/x.left.png"].sidecars) == [["x.json", members[0].offset, 2]]
    assert items["a.tar/x.right.png"].sidecars is None                # a sample's other members go once
    assert json.loads(items["a.tar/x.png"].sidecars)[0][0] == "x.txt"  # consecutive members make a sample
    for cut in (members[3].offset - 512, members[3].offset + 1, members[-1].offset + 512):  # at a header, in data,
        path.write_bytes(whole[:cut])                                               # at a member's end
        got, problem = shards.read_index(str(path))
        assert problem and len(got) <= len(members), cut
    damaged = bytearray(whole)
    damaged[members[3].offset - 512:members[3].offset - 400] = b"\xff" * 112          # a header made garbage
    path.write_bytes(bytes(damaged))
    assert shards.read_index(str(path))[1]


def test_shard_inputs_refuse_a_dst_that_holds_them_and_http_members_keep_their_names(tmp_path):
    from imgxlate.infer.config import JobError, TranslateConfig, check
    from imgxlate.io.listing import redact

    for src in (f"{tmp_path}/s/{{0..3}}.tar", f"{tmp_path}/s/a.tar", f"{tmp_path}/s/a.parquet"):
        extra = {"image_column": "image"} if src.endswith("parquet") else {}
        with pytest.raises(JobError, match="holds SRC"):
            check(TranslateConfig(src=src, dst=f"{tmp_path}/s", model="bicubic", scale=2, **extra))
        check(TranslateConfig(src=src, dst=f"{tmp_path}/out", model="bicubic", scale=2, **extra))
    assert redact("https://h/a.tar?X-Amz-Signature=s3cr3t#000001.jpg") == "https://h/a.tar#000001.jpg"


def test_tars_in_files_out_every_member_and_every_bad_tar_is_a_row(tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _write_tar(src / "a.tar", _samples(0, 4) + [{"__key__": "text-only", "txt": "no image in this sample"},
                                                {"__key__": "broken", "jpg": b"not a jpeg at all"}])
    with tarfile.open(src / "a.tar", "a") as tf:                    # the same member name again, other bytes
        info = tarfile.TarInfo("000001.png")
        dup = png(photo(8, 8, seed=9))
        info.size = len(dup)
        tf.addfile(info, io.BytesIO(dup))
    _write_tar(src / "b.tar", _samples(1, 6, size=64))
    whole = (src / "b.tar").read_bytes()
    (src / "b.tar").write_bytes(whole[:len(whole) // 2])             # cut short inside a member
    (src / "c.tar").write_bytes(b"this is not a tar file" * 100)
    assert translate(src, dst, "--input-format", "webdataset", "--scale", "2") == 0
    rows = {r["key"]: r for r in rows_of(dst)}
    for i in range(4):
        r = rows[f"a.tar/00{i:04d}.png"]
        assert r["status"] == "ok" and r["source_uri"] == f"{src}/a.tar#00{i:04d}.png"
        out = Image.open(r["output_uri"])
        assert r["output_uri"] == f"{dst}/a.tar/00{i:04d}.png" and out.size == (64, 48)
    assert rows["a.tar/broken.jpg"]["status"] == "decode_error"
    dup_row = rows["a.tar/000001.png#2"]
    assert dup_row["status"] == "read_error" and "duplicate member name" in dup_row["error"]
    assert "a.tar/text-only.txt" not in rows                        # not an image: no input, as in a folder
    b_ok = [k for k, r in rows.items() if k.startswith("b.tar/") and r["status"] == "ok"]
    assert 1 <= len(b_ok) < 6
    assert "truncated" in rows["b.tar/"]["error"] and rows["b.tar/"]["status"] == "read_error"
    assert rows["c.tar/"]["status"] == "read_error" and "cannot be read" in rows["c.tar/"]["error"]
    assert len(rows) == 4 + 1 + 1 + len(b_ok) + 1 + 1


def _read_wds(paths) -> dict[str, dict]:
    import webdataset as wds

    return {s["__key__"]: s for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False)}


def test_webdataset_and_parquet_out_read_back_with_their_own_readers(tmp_path, ray_local):
    src = tmp_path / "src"
    src.mkdir()
    for t in range(2):
        _write_tar(src / f"shard-{t:05d}.tar", _samples(t, 5))
    pattern = str(src / "shard-{00000..00001}.tar")
    out = {}
    for fmt in ("files", "webdataset", "parquet"):
        out[fmt] = tmp_path / fmt
        assert translate(pattern, out[fmt], "--scale", "2", "--suffix", "_x2", "--output-format", fmt) == 0
    files = {r["key"]: r for r in rows_of(out["files"])}
    # webdataset: one tar per source tar, members named for their sample, the sample's other members beside them
    tars = sorted(out["webdataset"].glob("*.tar"))
    assert [p.name for p in tars] == ["shard-00000.tar", "shard-00001.tar"]
    got = _read_wds(tars)
    assert sorted(got) == sorted(f"{t:02d}{i:04d}_x2" for t in range(2) for i in range(5))
    for t in range(2):
        for i in range(5):
            s = got[f"{t:02d}{i:04d}_x2"]
            assert json.loads(s["json"]) == {"tar": t, "i": i} and s["txt"] == f"caption {t}/{i}".encode()
            assert s["png"] == open(files[f"shard-{t:05d}.tar/{t:02d}{i:04d}.png"]["output_uri"], "rb").read()
    assert [n for n, _ in shards.members_of(tars[0].read_bytes())][:3] == ["000000_x2.png", "000000_x2.json",
                                                                          "000000_x2.txt"]   # input order
    wrows = {r["key"]: r for r in rows_of(out["webdataset"])}
    r = wrows["shard-00001.tar/010003.png"]
    assert r["output_uri"] == f"{out['webdataset']}/shard-00001.tar#010003_x2.png"
    assert r["output_sha256"] == hashlib.sha256(got["010003_x2"]["png"]).hexdigest()
    import ray

    ray_rows = ray.data.read_webdataset([str(p) for p in tars], decoder=None).take_all()
    assert sorted(x["__key__"] for x in ray_rows) == sorted(got)
    assert all(x["png"] == got[x["__key__"]]["png"] for x in ray_rows)
    # parquet: one file per shard, every manifest column, the output's bytes and the sidecars
    table = pq.read_table(out["parquet"] / "shard-00000.parquet")
    assert table.num_rows == 5 and {"source_uri", "status", "output_sha256", "output", "sidecars"} <= set(
        table.column_names)
    for row in table.to_pylist():
        key = row["key"]
        assert row["output"] == open(files[key]["output_uri"], "rb").read()
        assert dict(row["sidecars"])["txt"].startswith(b"caption 0/")
    ray_table = ray.data.read_parquet([str(p) for p in sorted(out["parquet"].glob("*.parquet"))]).take_all()
    assert len(ray_table) == 10 and all(x["output"][:8] == b"\x89PNG\r\n\x1a\n" for x in ray_table)
    # verify reads the shard objects; damage one and it says so
    from imgxlate.cli import main

    for fmt in ("webdataset", "parquet"):
        assert main(["verify", str(out[fmt]), "--checksums"]) == 0
    (out["webdataset"] / "shard-00000.tar").unlink()
    assert main(["verify", str(out["webdataset"])]) != 0
    assert not list((out["webdataset"] / "_manifest").rglob("*.tar"))      # no pieces left behind


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_a_killed_runs_rerun_redoes_only_its_unfinished_shards_whole(kind, tmp_path, ray_local):
    import pyarrow as pa

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    n_units, per_unit, ext = 8, 6, {"webdataset": "tar", "parquet": "parquet"}[kind]
    for t in range(n_units):
        if kind == "webdataset":
            _write_tar(src / f"{t:05d}.tar", _samples(t, per_unit, size=160))
        else:
            pq.write_table(pa.Table.from_pylist([{"image": s["png"]} for s in _samples(t, per_unit, size=160)]),
                           src / f"{t:05d}.parquet", row_group_size=3)
    options = ["--input-format", kind, "--output-format", kind, "--scale", "4"] + \
        (["--image-column", "image"] if kind == "parquet" else [])
    cmd = [sys.executable, "-m", "imgxlate.cli", "translate", str(src), str(dst), "--model", "bicubic",
           "--batch-size", "1", "--actors", "1", *options]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def complete() -> int:
        markers = (dst / "_manifest" / "_shards").glob("*.json")
        return sum(json.loads(m.read_text())["complete"] for m in markers)
    try:
        wait_for(lambda: complete() or proc.poll() is not None, "the first complete shard", 240)
        assert proc.poll() is None, "the job finished before it could be killed"
        tree = descendants(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    wait_for(lambda: not alive(tree), "the killed run's processes to exit", 60, every_s=0.5)
    done = complete()                  # shards recorded complete: their objects are kept; any other is redone whole
    before = {p.name: p.stat().st_mtime_ns for p in dst.glob(f"*.{ext}")}
    assert 1 <= done <= len(before) < n_units
    assert translate(src, dst, *options) == 0
    after = sorted(dst.glob(f"*.{ext}"))
    assert [p.name for p in after] == [f"{t:05d}.{ext}" for t in range(n_units)]
    assert len([p for p in after if before.get(p.name) == p.stat().st_mtime_ns]) == done
    if kind == "webdataset":
        outputs = [s["png"] for s in _read_wds(after).values()]
    else:
        outputs = [r["output"] for p in after for r in pq.read_table(p).to_pylist()]
    assert len(outputs) == n_units * per_unit
    assert all(Image.open(io.BytesIO(o)).size == (672, 640) for o in outputs)
    rows = rows_of(dst)
    assert len(rows) == (n_units - done) * per_unit and all(r["status"] == "ok" for r in rows)
    assert summary_of(dst, rows[0]["run_id"])["counts"]["skipped_done"] == done * per_unit
    assert not list((dst / "_manifest").rglob("*.tar")) and not list(dst.rglob("*imgxlate-tmp*"))


def test_s3_brace_pattern_in_webdataset_out(s3_server, bucket, ray_local):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for t in range(3):
        buf = io.BytesIO()
        import webdataset as wds

        with wds.TarWriter(buf) as w:
            for s in _samples(t, 4):
                w.write(s)
        s3.put_object(Bucket=bucket, Key=f"shards/{t:05d}.tar", Body=buf.getvalue())
    dst = f"s3://{bucket}/out"
    assert translate(f"s3://{bucket}/shards/{{00000..00002}}.tar", dst, "--scale", "2",
                     "--output-format", "webdataset") == 0
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
    assert [k for k in keys if not k.startswith("out/_manifest/")] == [f"out/{t:05d}.tar" for t in range(3)]
    assert not [k for k in keys if "_pieces" in k]
    body = s3.get_object(Bucket=bucket, Key="out/00002.tar")["Body"].read()
    names = [n for n, _ in shards.members_of(body)]
    assert names == [f"02{i:04d}.{e}" for i in range(4) for e in ("png", "json", "txt")]
    first = Image.open(io.BytesIO(dict(shards.members_of(body))["020000.png"]))
    assert first.size == (64, 48) and np.asarray(first).dtype == np.uint8
    from imgxlate.cli import main

    assert main(["verify", dst, "--checksums"]) == 0
    assert translate(f"s3://{bucket}/shards/{{00000..00002}}.tar", dst, "--scale", "2",
                     "--output-format", "webdataset") == 0                  # a rerun skips every tar
    run = summary_of(dst, sorted(manifest_runs(dst))[-1])
    assert run["counts"] == {"skipped_done": 12}


def manifest_runs(dst: str) -> list[str]:
    from imgxlate.io import manifest

    return manifest.runs(dst)


def test_parquet_bytes_in_by_row_groups_every_bad_row_a_row(tmp_path, ray_local):
    import pyarrow as pa

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    rows = [{"id": f"img{i:03d}", "image": png(photo(20, 28, seed=i)), "caption": f"c{i}"} for i in range(12)]
    rows[3]["image"] = None                                         # a null cell
    rows[5]["image"] = b"garbage"                                   # not an image
    rows[9]["id"] = "img002"                                        # a key seen before
    pq.write_table(pa.Table.from_pylist(rows), src / "a.parquet", row_group_size=5)
    hf = [{"image": {"bytes": png(photo(16, 16, seed=50 + i)), "path": f"p{i}.png"}} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(hf), src / "hf.parquet")  # Hugging Face datasets' Image struct
    assert translate(src, dst, "--input-format", "parquet", "--image-column", "image", "--key-column", "id",
                     "--scale", "2", "--output-format", "parquet") == 0
    got = {r["key"]: r for r in rows_of(dst)}
    no_id = got.pop("hf.parquet/")                  # not the first file: its missing key column is its one row
    assert no_id["status"] == "read_error" and "no column 'id' (--key-column)" in no_id["error"]
    assert got["a.parquet/img003"]["status"] == "read_error" and "null" in got["a.parquet/img003"]["error"]
    assert got["a.parquet/img005"]["status"] == "decode_error"
    assert got["a.parquet/row-9"]["status"] == "read_error" and "more than one row" in got["a.parquet/row-9"]["error"]
    assert sum(r["status"] == "ok" for r in got.values()) == 9 and len(got) == 12
    table = pq.read_table(dst / "a.parquet").to_pylist()
    assert len(table) == 12
    for row in table:
        if row["status"] == "ok":
            i = int(row["key"].rsplit("img", 1)[1])
            assert Image.open(io.BytesIO(row["output"])).size == (56, 40)
            assert row["output_sha256"] == hashlib.sha256(row["output"]).hexdigest() and i not in (3, 5, 9)
        else:
            assert row["output"] is None
    hf_dst = tmp_path / "hf"
    assert translate(src / "hf.parquet", hf_dst, "--image-column", "image", "--scale", "2") == 0
    assert sorted(p.name for p in (hf_dst / "hf.parquet").iterdir()) == [f"00000000{i}.png" for i in range(3)]
    assert translate(src / "hf.parquet", hf_dst, "--image-column", "image", "--scale", "2") == 0
    assert summary_of(hf_dst, manifest_runs(str(hf_dst))[-1])["counts"] == {"skipped_done": 3}


def test_s3_parquet_in_parquet_out(s3_server, bucket, ray_local):
    import pyarrow as pa

    s3 = boto3.client("s3", endpoint_url=s3_server)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"image": png(photo(20, 20, seed=i))} for i in range(7)]), buf,
                   row_group_size=3)
    s3.put_object(Bucket=bucket, Key="in/part-0.parquet", Body=buf.getvalue())
    dst = f"s3://{bucket}/out"
    assert translate(f"s3://{bucket}/in", dst, "--input-format", "parquet", "--image-column", "image",
                     "--scale", "2", "--output-format", "parquet") == 0
    body = s3.get_object(Bucket=bucket, Key="out/part-0.parquet")["Body"].read()
    table = pq.read_table(io.BytesIO(body)).to_pylist()
    assert [r["key"] for r in table] == [f"part-0.parquet/{i:09d}" for i in range(7)]
    assert all(r["status"] == "ok" and Image.open(io.BytesIO(r["output"])).size == (40, 40) for r in table)
    from imgxlate.cli import main

    assert main(["verify", dst, "--checksums"]) == 0


pytestmark = pytest.mark.slow
