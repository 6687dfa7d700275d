"""Shard formats attacked as a hostile user would (WebDataset tars and Parquet bytes in, webdataset / parquet
objects out), one test per finding: verify of a Parquet DST given as a relative path or copied; two tars whose
names differ in the case of '.tar'; a member whose name is not UTF-8; one Parquet file of a folder without the
image column; a damaged output object, marked by verify --redo and made again; --limit over a finished shard.
Each run is small and in-process (no Ray)."""

from __future__ import annotations

import io
import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from imgxlate.cli import main

from conftest import photo
from fixtures import png, rows_of, translate

RUN = ("--scale", "2", "--pipeline", "in-process")


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _names(tar_path) -> list[str]:
    with tarfile.open(tar_path) as tf:
        return tf.getnames()


def test_verify_reads_a_parquet_outputs_members_in_a_relative_or_copied_dst(tmp_path, monkeypatch):
    """The Parquet file's rows record the output as the run spelt DST (here relative); verify gets the DST as an
    absolute path, or a copy: its members were all reported missing, and --redo could never fix it."""
    monkeypatch.chdir(tmp_path)
    _tar(tmp_path / "in" / "a.tar", [("x.png", png(photo(12, 12))), ("x.json", b"{}"), ("y.png", png(photo(12, 14)))])
    assert translate("in/a.tar", "out", *RUN, "--output-format", "parquet") == 0
    assert main(["verify", "out", "--checksums"]) == 0
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    assert main(["verify", str(tmp_path / "copy"), "--checksums"]) == 0


def test_tars_whose_names_differ_in_the_case_of_their_extension_keep_their_own_objects(tmp_path):
    """a.tar and a.TAR both wrote DST/a.tar: one tar's outputs were lost while every row said ok."""
    _tar(tmp_path / "src" / "a.tar", [("one.png", png(photo(12, 12, seed=1)))])
    _tar(tmp_path / "src" / "a.TAR", [("two.png", png(photo(12, 12, seed=2)))])
    dst = tmp_path / "dst"
    assert translate(tmp_path / "src", dst, *RUN, "--input-format", "webdataset", "--output-format", "webdataset") == 0
    assert sorted(p.name for p in dst.glob("*.tar")) == ["a.TAR.tar", "a.tar"]
    assert _names(dst / "a.tar") == ["one.png"] and _names(dst / "a.TAR.tar") == ["two.png"]
    assert main(["verify", str(dst), "--checksums"]) == 0


def test_a_member_whose_name_is_not_utf8_is_a_row_and_the_rest_are_done(tmp_path, capsys):
    """It stopped the whole run with a traceback (exit 1) before any input was done."""
    _tar(tmp_path / "u.tar", [("ok.png", png(photo(12, 12))), ("bad\udcff.png", png(photo(12, 12, seed=3)))])
    for fmt in ("files", "webdataset"):
        dst = tmp_path / fmt
        assert translate(tmp_path / "u.tar", dst, *RUN, "--output-format", fmt) == 0
        rows = {r["key"]: r for r in rows_of(dst)}
        assert rows["u.tar/ok.png"]["status"] == "ok"
        assert rows["u.tar/bad\\xff.png"]["status"] == "read_error" and "not valid UTF-8" in rows[
            "u.tar/bad\\xff.png"]["error"]
        assert "Traceback" not in capsys.readouterr().err
        assert translate(tmp_path / "u.tar", dst, *RUN, "--output-format", fmt) == 0
        again = [r["status"] for r in rows_of(dst)]    # files: a failed input is retried; a shard object: final
        assert again == (["read_error"] if fmt == "files" else []), again


def test_one_parquet_file_of_a_folder_without_the_image_column_is_a_row(tmp_path, capsys):
    """A later file without the column stopped the run midway with exit 2, after earlier files' outputs were
    written, and left no summary; the first file's columns still stop a run before any work (a mistyped
    --image-column)."""
    src = tmp_path / "src"
    src.mkdir()
    for name, col in (("a_good", [png(photo(10, 10, seed=i)) for i in range(2)]), ("b_wrong", ["text", "more"]),
                      ("c_good", [png(photo(10, 10, seed=5 + i)) for i in range(2)])):
        pq.write_table(pa.table({"img": col, "name": [f"{name}{i}.png" for i in range(2)]}), src / f"{name}.parquet")
    dst = tmp_path / "dst"
    args = ("--input-format", "parquet", "--image-column", "img", "--key-column", "name", *RUN)
    assert translate(src, dst, *args) == 0
    rows = rows_of(dst)
    assert sorted(r["key"] for r in rows if r["status"] == "ok") == [
        "a_good.parquet/a_good0.png", "a_good.parquet/a_good1.png", "c_good.parquet/c_good0.png",
        "c_good.parquet/c_good1.png"]
    bad = [r for r in rows if r["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["status"] == "read_error" and "not image bytes" in bad[0]["error"]
    capsys.readouterr()
    assert translate(src / "b_wrong.parquet", tmp_path / "dst2", *args) == 2
    assert "not image bytes" in capsys.readouterr().err and not (tmp_path / "dst2").exists()


def test_a_damaged_output_object_is_marked_by_verify_redo_and_made_again(tmp_path, capsys):
    """A tar whose header checksum is broken (or a Parquet page) was reported unreadable and never marked: the
    rerun skipped it and it stayed damaged."""
    _tar(tmp_path / "a.tar", [("x.png", png(photo(12, 12))), ("y.png", png(photo(12, 12, seed=4)))])
    for fmt, obj in (("webdataset", "a.tar"), ("parquet", "a.parquet")):
        dst = tmp_path / fmt
        assert translate(tmp_path / "a.tar", dst, *RUN, "--output-format", fmt) == 0
        good = (dst / obj).read_bytes()
        at = 10 if fmt == "webdataset" else _output_chunk(dst / obj) + 100    # a tar header; the outputs' pages
        (dst / obj).write_bytes(good[:at] + bytes(b ^ 0xFF for b in good[at:at + 32]) + good[at + 32:])
        capsys.readouterr()                                   # the tar's index alone finds its header damaged
        assert main(["verify", str(dst), "--redo", *(["--checksums"] if fmt == "parquet" else [])]) == 1
        assert "damaged_output" in capsys.readouterr().out
        assert translate(tmp_path / "a.tar", dst, *RUN, "--output-format", fmt) == 0
        assert {r["status"] for r in rows_of(dst)} == {"ok"} and len(rows_of(dst)) == 2
        assert main(["verify", str(dst), "--checksums"]) == 0


def _output_chunk(path) -> int:
    """Where the ``output`` column's bytes start in a Parquet file."""
    md = pq.ParquetFile(path).metadata
    col = md.row_group(0).column([md.schema.column(c).path for c in range(md.num_columns)].index("output"))
    return col.dictionary_page_offset or col.data_page_offset


def test_limit_never_cuts_a_finished_shard_object(tmp_path):
    """--limit cut the tar's shard and wrote the cut one's object over the whole one's: y.png was gone while its
    row still said ok."""
    _tar(tmp_path / "a.tar", [("x.png", png(photo(12, 12))), ("y.png", png(photo(12, 12, seed=4)))])
    dst = tmp_path / "dst"
    assert translate(tmp_path / "a.tar", dst, *RUN, "--output-format", "webdataset") == 0
    assert translate(tmp_path / "a.tar", dst, *RUN, "--output-format", "webdataset", "--limit", "1") == 0
    assert _names(dst / "a.tar") == ["x.png", "y.png"]
    assert main(["verify", str(dst), "--checksums"]) == 0


def test_a_sidecar_named_as_the_output_is_kept_under_another_name(tmp_path):
    """A segmentation layout: image 000.jpg, mask 000.png, metadata 000.json; only the jpg is an input. The mask,
    renamed for the output's sample, was named 000.png like the output, and it and 000.json vanished."""
    from fixtures import jpg

    _tar(tmp_path / "seg.tar", [("000.jpg", jpg(photo(12, 12))), ("000.png", png(photo(12, 12, seed=7))),
                                ("000.json", b'{"label": 1}'), ("001.jpg", jpg(photo(12, 12, seed=2))),
                                ("001.json", b"{}")])
    dst = tmp_path / "dst"
    assert translate(tmp_path / "seg.tar", dst, *RUN, "--extensions", "jpg", "--output-format", "webdataset") == 0
    assert _names(dst / "seg.tar") == ["000.png", "000.src.png", "000.json", "001.png", "001.json"]
    with tarfile.open(dst / "seg.tar") as tf:
        assert tf.extractfile("000.src.png").read() == png(photo(12, 12, seed=7))
    assert main(["verify", str(dst), "--checksums"]) == 0


def test_hard_and_symbolic_links_in_a_tar_are_inputs(tmp_path):
    """GNU tar stores every further hard link of a file as a link member: a folder of deduplicated images lost
    them (no output, no row). A link to a member the tar does not hold is a row that says so."""
    data = png(photo(12, 12))
    path = tmp_path / "h.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        for name, kind, target in (("b.png", tarfile.LNKTYPE, "a.png"), ("sub/c.png", tarfile.SYMTYPE, "../a.png"),
                                   ("d.png", tarfile.SYMTYPE, "/etc/passwd")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    dst = tmp_path / "dst"
    assert translate(path, dst, *RUN) == 0
    rows = {r["key"]: r for r in rows_of(dst)}
    assert {k: r["status"] for k, r in rows.items()} == {"h.tar/a.png": "ok", "h.tar/b.png": "ok",
                                                         "h.tar/sub/c.png": "ok", "h.tar/d.png": "read_error"}
    assert (dst / "h.tar/b.png").read_bytes() == (dst / "h.tar/a.png").read_bytes() == (
        dst / "h.tar/sub/c.png").read_bytes()
    assert "a link to '/etc/passwd', which the tar does not hold" in rows["h.tar/d.png"]["error"]
    with tarfile.open(tmp_path / "dot.tar", "w") as tf:     # as `tar cf dot.tar .` names members
        info = tarfile.TarInfo("./a.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("./b.png")
        info.type, info.linkname = tarfile.SYMTYPE, "a.png"
        tf.addfile(info)
    assert translate(tmp_path / "dot.tar", tmp_path / "dot", *RUN) == 0
    assert sorted(r["status"] for r in rows_of(tmp_path / "dot")) == ["ok", "ok"]


def test_parquet_keys_that_name_no_file_or_clash_with_a_bad_rows_name_are_rows(tmp_path):
    """An empty key wrote a stray file 'DST/y.tar#' and failed the whole shard on every rerun; a repeated key's row
    was named 'row-1', the name of a real key, so the rerun counted its failure as done."""
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"img": [png(photo(10, 10, seed=i)) for i in range(5)],
                             "name": ["", "a.png", "a.png", "row-2", "."]}), src / "y.parquet")
    dst = tmp_path / "dst"
    args = ("--image-column", "img", "--key-column", "name", *RUN, "--output-format", "webdataset")
    assert translate(src / "y.parquet", dst, *args) == 0
    rows = {r["key"]: r for r in rows_of(dst)}
    assert {k: r["status"] for k, r in rows.items()} == {
        "y.parquet/row-0": "read_error", "y.parquet/a.png": "ok", "y.parquet/_row-2": "read_error",
        "y.parquet/row-2": "ok", "y.parquet/row-4": "read_error"}
    assert "names no file" in rows["y.parquet/row-0"]["error"] and "more than one row" in rows[
        "y.parquet/_row-2"]["error"]
    assert sorted(p.name for p in dst.iterdir()) == ["_manifest", "y.tar"]
    assert _names(dst / "y.tar") == ["a.png", "row-2.png"]
    assert translate(src / "y.parquet", dst, *args) == 0             # the rows stand: nothing is done again
    assert rows_of(dst) == []


def test_a_shard_whose_only_failures_are_names_no_output_can_have_is_not_redone(tmp_path):
    """A member whose output would leave DST fails the same way on every run: its shard was redone whole, and its
    object rewritten, on every rerun."""
    _tar(tmp_path / "m.tar", [("good.png", png(photo(12, 12))), ("../bad.png", png(photo(12, 12, seed=2)))])
    dst = tmp_path / "dst"
    assert translate(tmp_path / "m.tar", dst, *RUN, "--output-format", "webdataset") == 0
    assert sorted(r["status"] for r in rows_of(dst)) == ["ok", "write_error"]
    before = (dst / "m.tar").stat().st_mtime_ns
    assert translate(tmp_path / "m.tar", dst, *RUN, "--output-format", "webdataset") == 0
    assert rows_of(dst) == [] and (dst / "m.tar").stat().st_mtime_ns == before


def test_a_missing_tar_or_parquet_src_stops_the_run_as_a_missing_folder_does(tmp_path, capsys):
    for src, extra in (("nope.tar", ()), ("nope.parquet", ("--image-column", "img"))):
        capsys.readouterr()
        assert translate(tmp_path / src, tmp_path / "dst", *RUN, *extra) == 2
        assert f"source {tmp_path / src} does not exist" in capsys.readouterr().err
        assert not (tmp_path / "dst").exists()
