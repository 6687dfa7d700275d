"""The names the job makes for itself on a local DST, and how its writes reach the disk: temporaries live in
DST/_manifest/_tmp (never a user's name, never making a legal output name too long), cleanup looks only inside
DST/_manifest, a name over the filesystem's limit gets a write_error row that says so, and an output (or a
manifest part, or a marker) is synced before anything can record it."""

import errno
import hashlib
import os

import pyarrow as pa
import pytest

from imgxlate.infer import stages
from imgxlate.io import manifest, storage

from conftest import photo
from fixtures import png, rows_of, summary_of, translate, write_tree


def test_a_users_file_named_like_a_temporary_keeps_its_output_on_a_rerun(tmp_path, capsys, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    name = "a.imgxlate-tmp-0123abcd.png"
    write_tree(src, {name: png(photo(20, 24, seed=1)), "sub/b.imgxlate-tmp-ffff.png": png(photo(16, 16, seed=2))})
    assert translate(src, dst, "--scale", "2", "--shard-size", "1", "--run-id", "first") == 0
    first = {r["key"]: r for r in rows_of(dst, "first")}
    assert {r["status"] for r in first.values()} == {"ok"}
    write_tree(dst, {"mine/notes.imgxlate-tmp-1": b"a user's file in DST"})
    write_tree(src, {"c.png": png(photo(16, 16, seed=3))})          # the rerun has work, so it cleans up
    (dst / "_manifest" / "_tmp").mkdir(exist_ok=True)
    (dst / "_manifest" / "_tmp" / "left-by-a-killed-writer").write_bytes(b"half an output")
    capsys.readouterr()
    assert translate(src, dst, "--scale", "2", "--shard-size", "1", "--run-id", "second") == 0
    for key, row in first.items():          # each output is still there, as its ok row says
        assert hashlib.sha256((dst / key).read_bytes()).hexdigest() == row["output_sha256"]
    assert summary_of(dst, "second")["counts"] == {"ok": 1, "skipped_done": 2}
    assert "removed 1 stale temporary files" in capsys.readouterr().err
    assert (dst / "mine/notes.imgxlate-tmp-1").read_bytes() == b"a user's file in DST"
    assert not list((dst / "_manifest" / "_tmp").iterdir())


def test_a_legal_long_name_is_written_and_one_over_the_limit_says_so(tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    fits, over = "a" * 237, "b" * 245            # with "-restored.png": 250 and 258 bytes (the limit is 255)
    write_tree(src, {fits + ".png": png(photo(12, 12, seed=3)), over + ".png": png(photo(12, 12, seed=4))})
    assert translate(src, dst, "--scale", "2", "--suffix=-restored") == 0
    rows = {r["key"]: r for r in rows_of(dst)}
    assert rows[fits + ".png"]["status"] == "ok", rows[fits + ".png"]["error"]
    assert (dst / (fits + "-restored.png")).stat().st_size == rows[fits + ".png"]["output_bytes"]
    bad = rows[over + ".png"]
    assert bad["status"] == "write_error"
    assert "file name is 258 bytes, over the filesystem's limit of 255 bytes (ENAMETOOLONG)" in bad["error"]
    assert not bad["error"].startswith(storage.DST_FAILURE)       # about this input, not DST: the run went on
    assert not list((dst / "_manifest" / "_tmp").iterdir())


def _block(tmp_path, names):
    """Decoded input rows for ``names`` (tiny PNGs under tmp_path/src), with outputs under tmp_path/dst."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {n: png(photo(10, 12, seed=i)) for i, n in enumerate(names)})
    batch = pa.table({"source_uri": [str(src / n) for n in names], "key": names,
                      "output_uri": [str(dst / n) for n in names]})
    return stages.load(batch, max_pixels=10**6, env={}), dst


def _save(block, dst):
    return stages.save(block, "png", 90, "m", "0" * 64, "sr", {}, tmp_dir=storage.temporaries_dir(str(dst)))


def _record(monkeypatch):
    """Every fsync (of a file or a folder, by path), syncfs and rename from now on, in order."""
    events = []
    real_fsync, real_replace, real_syncfs = os.fsync, os.replace, storage.syncfs

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        real_replace(a, b)
        events.append(("replace", str(a), str(b)))

    def syncfs(fd):
        real_syncfs(fd)
        events.append(("syncfs", os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(storage, "syncfs", syncfs)
    return events


def test_outputs_are_synced_after_their_rename_and_before_save_returns_their_rows(tmp_path, monkeypatch):
    block, dst = _block(tmp_path, ["x/1.png", "x/2.png", "y/3.png"])
    events = _record(monkeypatch)
    monkeypatch.delenv("IMGXLATE_DURABLE", raising=False)
    rows = _save(block, dst).to_pylist()
    events.append(("returned",))
    assert [r["status"] for r in rows] == ["ok"] * 3
    renames = [e for e in events if e[0] == "replace"]
    tmp = str(dst / "_manifest" / "_tmp")
    assert [e[2] for e in renames] == [r["output_uri"] for r in rows]
    assert all(os.path.dirname(e[1]) == tmp and len(os.path.basename(e[1])) == 46 for e in renames)
    if storage.sync_mode() == "syncfs":         # Linux: one syncfs of DST's filesystem for the whole block
        assert events[-2:] == [("syncfs", str(dst / "x")), ("returned",)] and events[:-2] == renames
    # Each file synced before its rename, each folder after the renames into it, all before save returns.
    monkeypatch.setenv("IMGXLATE_DURABLE", "fsync")
    block, dst = _block(tmp_path / "f", ["x/1.png", "x/2.png", "y/3.png"])
    events.clear()
    _save(block, dst)
    events.append(("returned",))
    for e in [e for e in events if e[0] == "replace"]:
        assert events.index(("fsync", e[1])) < events.index(e)
        assert events.index(e) < events.index(("fsync", os.path.dirname(e[2]))) < len(events) - 1
    assert ("fsync", str(dst)) in events        # dst/x and dst/y were made: their entries in dst are synced too
    monkeypatch.setenv("IMGXLATE_DURABLE", "0")     # benchmarks only
    block, dst = _block(tmp_path / "off", ["1.png"])
    events.clear()
    assert _save(block, dst).column("status").to_pylist() == ["ok"]
    assert [e[0] for e in events] == ["replace"]


def test_a_part_and_its_marker_are_each_durable_before_the_next_write(tmp_path, monkeypatch):
    dst = str(tmp_path / "dst")
    events = _record(monkeypatch)
    name = manifest.write_part(dst, "run1", "s1-0", [{"key": "a.png", "status": "ok", "shard": "s1"}])
    manifest.write_shard_marker(dst, manifest.ShardMarker("s1", 1, True, "r", "run1", {"ok": 1}, [name]))
    manifest.write_summary(dst, "run1", {"counts": {"ok": 1}})
    root = os.path.join(dst, "_manifest")
    order = []
    for target in (os.path.join(root, "run1", "part-s1-0.parquet"), os.path.join(root, "_shards", "s1.json"),
                   os.path.join(root, "run1", "summary.json")):
        rename = next(e for e in events if e[0] == "replace" and e[2] == target)
        assert os.path.basename(rename[1]).startswith(storage.TMP_MARK)
        at = events.index(rename)
        order += [events.index(("fsync", rename[1])), at, events.index(("fsync", os.path.dirname(target)), at)]
    assert order == sorted(order)               # the marker is renamed into place after its part is durable


def test_a_failed_sync_fails_the_rows_and_a_rename_across_filesystems_writes_beside(tmp_path, monkeypatch):
    block, dst = _block(tmp_path, ["a/1.png", "a/2.png"])
    monkeypatch.delenv("IMGXLATE_DURABLE", raising=False)

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(storage, "syncfs", broken)
    monkeypatch.setattr(storage, "fsync_folder", lambda folder: broken(0))
    rows = _save(block, dst).to_pylist()
    assert [r["status"] for r in rows] == ["write_error"] * 2       # written, but not known to be on the disk
    assert all(r["error"].startswith(storage.DST_FAILURE + "I/O error on DST") for r in rows)
    monkeypatch.undo()
    # DST/a on another filesystem (a mount inside DST): its outputs' temporaries are made beside them instead.
    block, dst = _block(tmp_path / "m", ["a/1.png", "a/2.png", "b/3.png"])
    real_replace, tmp = os.replace, str(dst / "_manifest" / "_tmp")

    def replace(a, b):
        if os.path.dirname(a) == tmp and os.path.dirname(b) == str(dst / "a"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", replace)
    rows = _save(block, dst).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert sorted(os.listdir(dst / "a")) == ["1.png", "2.png"] and not os.listdir(tmp)
    assert [hashlib.sha256((dst / r["key"]).read_bytes()).hexdigest() for r in rows] == \
        [r["output_sha256"] for r in rows]


def test_cleanup_lists_only_the_jobs_own_folders(tmp_path, monkeypatch):
    assert storage.JOB_DIR == manifest.MANIFEST_DIR and manifest.SHARD_DIR == "_shards"
    dst = tmp_path / "dst"
    tmp = storage.TMP_MARK + "0" * 32
    write_tree(dst, {
        "a.imgxlate-tmp-0123abcd.png": b"an output", "deep/er/x.png" + storage.TMP_MARK + "9": b"a user's file",
        "_manifest_/b" + storage.TMP_MARK + "1.png": b"an output under _manifest_",
        "_manifest/_tmp/" + "1" * 32: b"left by a killed writer", "_manifest/_tmp/" + tmp: b"another",
        "_manifest/" + tmp: b"a lease's", "_manifest/_shards/" + tmp: b"a marker's", "_manifest/_shards/s.json": b"{}",
        "_manifest/killed/" + tmp: b"a part's", "_manifest/killed/part-s.parquet": b"kept",
        "_manifest/done/summary.json": b"{}", "_manifest/done/part-s.parquet": b"kept"})
    listed, real_scandir = [], os.scandir

    def scandir(path="."):
        listed.append(os.path.abspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "walk", lambda *a, **k: (_ for _ in ()).throw(AssertionError("walked DST")))
    monkeypatch.setattr(os, "listdir", lambda *a, **k: (_ for _ in ()).throw(AssertionError("listed DST")))
    assert storage.remove_stale_temporaries(str(dst)) == 5
    monkeypatch.undo()
    assert listed and all(p.startswith(str(dst / "_manifest")) for p in listed)
    left = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert left == sorted(["a.imgxlate-tmp-0123abcd.png", "deep/er/x.png" + storage.TMP_MARK + "9",
                           "_manifest_/b" + storage.TMP_MARK + "1.png", "_manifest/_shards/s.json",
                           "_manifest/killed/part-s.parquet", "_manifest/done/summary.json",
                           "_manifest/done/part-s.parquet"])
    assert storage.remove_stale_temporaries(str(tmp_path / "absent")) == 0


def test_a_streamed_write_is_all_or_nothing_and_crosses_a_mount_by_copying_its_temporary(tmp_path, monkeypatch):
    """A shard's one output object (--output-format webdataset / parquet) is written from a stream of chunks by the
    same LocalWrites as every output: read once, so a rename that fails with EXDEV copies the temporary beside it."""
    dst = tmp_path / "dst"
    tmp = str(dst / "_manifest" / "_tmp")
    real_replace = os.replace

    def replace(a, b):
        if os.path.dirname(a) == tmp:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b)
    monkeypatch.setattr(os, "replace", replace)
    writes = storage.LocalWrites(tmp)
    writes.write(str(dst / "s" / "shard.tar"), iter([b"one ", b"two ", b"three"]))
    assert writes.sync() == {}
    assert (dst / "s" / "shard.tar").read_bytes() == b"one two three"
    assert os.listdir(dst / "s") == ["shard.tar"] and not os.listdir(tmp)

    def broken():
        yield b"half"
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.undo()
    with pytest.raises(OSError, match="No space"):
        storage.LocalWrites(tmp).write(str(dst / "s" / "other.tar"), broken())
    assert os.listdir(dst / "s") == ["shard.tar"] and not os.listdir(tmp)     # nothing half-written is left
