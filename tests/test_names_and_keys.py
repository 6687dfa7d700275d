"""Which inputs the job sees and which output key each one gets, end to end: every input is listed whatever its
name, every input gets an output key of its own inside DST, and SRC and DST never overlap (SRC equal to DST is
refused, a DST inside SRC is left out of the listing). The key functions' own properties are in test_keys.py."""

import os
import posixpath
import random

import boto3
from PIL import Image

from imgxlate.io import listing, manifest
from imgxlate.io.keys import output_keys

from conftest import photo
from fixtures import jpg, png, rows_of, summary_of, translate, write_tree


def _check_keys(keys, ext=".png", suffix="", sources=None):
    outs = output_keys(keys, ext, suffix, sources)
    names = [o for o in outs if isinstance(o, str)]
    assert len(set(names)) == len(names), (keys, outs)
    for o in names:
        parts = o.split("/")
        assert o.endswith(suffix + ext) and parts[0] != manifest.MANIFEST_DIR, o
        assert all(p not in ("", ".", "..") for p in parts) and "\\" not in o, o
        assert posixpath.normpath(posixpath.join("/dst", o)).startswith("/dst/"), o
    order = list(range(len(keys)))
    random.Random(len(keys)).shuffle(order)
    again = output_keys([keys[i] for i in order], ext, suffix,
                        None if sources is None else [sources[i] for i in order])
    assert [str(again[order.index(i)]) for i in range(len(keys))] == [str(o) for o in outs]   # order-free
    return outs


def test_every_input_gets_an_output_key_of_its_own(tmp_path, ray_local):
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
    write_tree(src, {k: (jpg if k.endswith("jpg") else png)(photo(*hw, seed=i)) for i, (k, hw) in
                     enumerate(sizes.items())})
    assert translate(src, dst, "--scale", "2") == 0
    rows = {r["key"]: r for r in rows_of(dst)}
    assert len({r["output_uri"] for r in rows.values()}) == 3 and all(r["status"] == "ok" for r in rows.values())
    for key, (h, w) in sizes.items():
        assert Image.open(rows[key]["output_uri"]).size == (2 * w, 2 * h), key


def test_listing_keeps_every_input_whatever_its_name(tmp_path, bucket, s3_server, ray_local):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = ["in/q?x=1.png", "in/_manifest/old.png", "in/plain.png"]
    for i, k in enumerate(names):
        s3.put_object(Bucket=bucket, Key=k, Body=png(photo(12, 14, seed=i)))
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


def test_src_equal_to_dst_is_refused_and_dst_inside_src_is_excluded(tmp_path, bucket, s3_server, ray_local,
                                                                    capsys):
    src = tmp_path / "src"
    write_tree(src, {f"{i}.png": png(photo(10, 12, seed=i)) for i in range(2)})
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
        s3.put_object(Bucket=bucket, Key=f"in/{i}.png", Body=png(photo(10, 12, seed=i)))
    assert translate(f"s3://{bucket}/in", f"s3://{bucket}/in/", "--scale", "2") == 2
    assert "same folder" in capsys.readouterr().err
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 2
    for run_id in ("r1", "r2"):
        assert translate(f"s3://{bucket}/in", f"s3://{bucket}/in/out", "--scale", "2", "--run-id", run_id) == 0
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert not any(k.startswith("in/out/out/") for k in keys), keys
    os.environ["AWS_ENDPOINT_URL"] = s3_server
    assert summary_of(f"s3://{bucket}/in/out", "r2")["counts"] == {"skipped_done": 2}
