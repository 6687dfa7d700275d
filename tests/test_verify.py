"""`imgxlate verify DST`: a finished run is proven complete from its manifest (each input's latest row ok, its
output there with the recorded size and, with --checksums, sha256), the problems are counted and written as
Parquet, exit 1 when there are any; --redo makes the next translate redo exactly those inputs. Local and S3."""

import json
import shutil

import boto3
import pyarrow.parquet as pq

from imgxlate.cli import main
from imgxlate.infer.verify import VerifyConfig, verify
from imgxlate.io import storage

from conftest import photo
from fixtures import png, rows_of, summary_of, translate, write_tree

NAMES = [f"{d}/{i}.png" for d in ("a", "b") for i in range(4)]


def _problems(uri: str) -> set[tuple[str, str]]:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    return {(r["source_uri"].rsplit("/src/", 1)[-1] if r["source_uri"] else None, r["problem"]) for r in rows}


def test_verify_finds_missing_and_damaged_outputs_and_redo_redoes_exactly_those(tmp_path, capsys, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {k: png(photo(10, 12, seed=i)) for i, k in enumerate(NAMES)})
    assert translate(src, dst, "--scale", 2, "--shard-size", 3, "--run-id", "r1") == 0
    capsys.readouterr()
    assert main(["verify", str(dst), "--checksums"]) == 0
    assert "8 inputs, 8 ok" in capsys.readouterr().out
    good = {k: (dst / k).read_bytes() for k in ("a/1.png", "b/2.png")}
    (dst / "a/1.png").unlink()
    damaged = bytearray(good["b/2.png"])
    damaged[len(damaged) // 2] ^= 0xFF                          # same size, other bytes
    (dst / "b/2.png").write_bytes(bytes(damaged))

    assert main(["verify", str(dst)]) == 1
    out, err = capsys.readouterr()
    assert "missing" in out and "checksum_mismatch" not in out
    assert len(err.strip().splitlines()) == 1 and err.startswith("imgxlate verify: 1 problems")
    sizes = verify(VerifyConfig(str(dst)))
    assert (sizes["inputs"], sizes["ok"], sizes["problems"]) == (8, 7, {"missing": 1})   # same size: not seen
    full = verify(VerifyConfig(str(dst), checksums=True))
    assert (full["ok"], full["problems"]) == (6, {"checksum_mismatch": 1, "missing": 1})
    json.dumps(full)
    assert _problems(full["problems_uri"]) == {("a/1.png", "missing"), ("b/2.png", "checksum_mismatch")}
    assert full["problems_uri"].startswith(str(dst / "_manifest" / "_verify"))

    assert main(["verify", str(dst), "--checksums", "--redo"]) == 1
    assert "2 inputs with a bad output are marked for redo" in capsys.readouterr().err
    assert translate(src, dst, "--scale", 2, "--shard-size", 3, "--run-id", "r2") == 0
    assert summary_of(dst, "r2")["counts"] == {"ok": 2, "skipped_done": 6}
    assert sorted((r["key"], r["status"]) for r in rows_of(dst, "r2")) == [("a/1.png", "ok"), ("b/2.png", "ok")]
    assert {k: (dst / k).read_bytes() for k in good} == good
    capsys.readouterr()
    assert main(["verify", str(dst), "--checksums"]) == 0
    assert "8 inputs, 8 ok" in capsys.readouterr().out
    assert translate(src, dst, "--scale", 2, "--shard-size", 3, "--run-id", "r3") == 0   # nothing left to redo
    assert summary_of(dst, "r3")["counts"] == {"skipped_done": 8}


def test_a_copied_dst_is_verified_in_the_copy_not_where_the_run_wrote_it(tmp_path, capsys, ray_local):
    src, dst, copy = tmp_path / "src", tmp_path / "dst", tmp_path / "backup" / "dst"
    write_tree(src, {k: png(photo(10, 12, seed=i)) for i, k in enumerate(NAMES)})
    assert translate(src, dst, "--scale", 2, "--shard-size", 3, "--run-id", "r1") == 0
    shutil.copytree(dst, copy)
    capsys.readouterr()
    assert main(["report", str(copy)]) == 0                     # reported as the copy, saying where it was written
    assert f"# Batch job report: `{copy}`" in (out := capsys.readouterr().out) and f"written as `{dst}`" in out
    (copy / "a/1.png").unlink()                                 # lost in the copy only
    found = verify(VerifyConfig(str(copy), checksums=True))
    assert (found["ok"], found["problems"]) == (7, {"missing": 1})
    assert _problems(found["problems_uri"]) == {("a/1.png", "missing")}
    assert verify(VerifyConfig(str(dst), checksums=True))["problems"] == {}    # the original is whole
    # --redo on the copy, and a translate into the copy, restore it there (the original is not touched).
    assert verify(VerifyConfig(str(copy), redo=True))["redo"] == 1
    assert translate(src, copy, "--scale", 2, "--shard-size", 3, "--run-id", "r2") == 0
    assert summary_of(copy, "r2")["counts"] == {"ok": 1, "skipped_done": 7}
    assert (copy / "a/1.png").read_bytes() == (dst / "a/1.png").read_bytes()
    # With no summary to say where its run wrote it, an output recorded outside the DST is not proven.
    for summary in (copy / "_manifest").glob("*/summary.json"):
        summary.unlink()
    shutil.rmtree(dst)
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 1
    assert "elsewhere" in capsys.readouterr().out


def test_rows_are_placed_inside_the_dst_given_however_the_run_spelt_it(tmp_path, monkeypatch):
    from imgxlate.infer.verify import in_dst

    monkeypatch.chdir(tmp_path)
    dst = str(tmp_path / "out")
    assert in_dst("out/a/1.png", dst, ()) == in_dst("./out//a/1.png", dst, ()) == dst + "/a/1.png"  # relative
    assert in_dst("/elsewhere/out/a.png", dst, ("/elsewhere/out",)) == dst + "/a.png"               # a copy
    assert in_dst("/elsewhere/b.png", dst, ()) == "/elsewhere/b.png"                 # unplaced: 'elsewhere'
    assert in_dst("s3://b/out/x.tar#a/1.png", "s3://c/copy", ("s3://b/out",)) == "s3://c/copy/x.tar#a/1.png"


def test_a_part_that_is_gone_is_found_and_redo_makes_a_complete_shard_be_read_again(tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {k: png(photo(8, 8, seed=i)) for i, k in enumerate(NAMES[:4])})
    assert translate(src, dst, "--scale", 2, "--run-id", "r1") == 0
    (marker_file,) = (dst / "_manifest" / "_shards").glob("*.json")
    part = dst / "_manifest" / json.loads(marker_file.read_text())["parts"][0]   # one part, or more on a slow run
    lost = pq.read_table(part).num_rows
    part.unlink()                                               # the marker still says complete, all ok
    found = verify(VerifyConfig(str(dst), redo=True))
    assert (found["ok"], found["problems"], found["redo"]) == (4 - lost, {"missing_part": 1, "no_row": lost}, 0)
    assert _problems(found["problems_uri"]) == {(None, "missing_part"), (None, "no_row")}
    assert json.loads(marker_file.read_text())["complete"] is False
    assert translate(src, dst, "--scale", 2, "--run-id", "r2") == 0
    assert summary_of(dst, "r2")["counts"] == {k: n for k, n in (("ok", lost), ("skipped_done", 4 - lost)) if n}
    assert verify(VerifyConfig(str(dst)))["problems"] == {}
    marker_file.write_text(marker_file.read_text()[:20])        # truncated: named, counted, never a traceback
    damaged = verify(VerifyConfig(str(dst)))
    assert (damaged["inputs"], damaged["problems"]) == (0, {"unreadable_marker": 1})


def test_verify_on_s3_finds_a_deleted_output_and_redo_redoes_it(tmp_path, capsys, bucket, s3_server, ray_local):
    src, dst = tmp_path / "src", f"s3://{bucket}/out"
    write_tree(src, {k: png(photo(8, 10, seed=i)) for i, k in enumerate(NAMES[:3])})
    assert translate(src, dst, "--scale", 2, "--run-id", "r1") == 0
    assert verify(VerifyConfig(dst, checksums=True))["problems"] == {}
    boto3.client("s3", endpoint_url=s3_server).delete_object(Bucket=bucket, Key="out/a/1.png")
    capsys.readouterr()
    assert main(["verify", dst, "--redo"]) == 1
    out = capsys.readouterr().out
    assert "3 inputs, 2 ok" in out and "missing" in out and "marked for redo: 1 inputs" in out
    assert translate(src, dst, "--scale", 2, "--run-id", "r2") == 0
    assert summary_of(dst, "r2")["counts"] == {"ok": 1, "skipped_done": 2}
    result = verify(VerifyConfig(dst, checksums=True))
    assert (result["ok"], result["problems"], result["problems_uri"]) == (3, {}, None)


def test_verify_of_a_folder_that_is_no_runs_dst_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(png(photo(8, 8)))
    assert main(["verify", str(tmp_path / "photos")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the DST of an imgxlate translate run" in err[0]
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
