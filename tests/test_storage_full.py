"""DST failing mid-run (issue 22, finding 2): a local DST that fills up (a small tmpfs) and an S3 store that refuses
writes (507 Insufficient Storage) drain the run as a signal does. Every output on DST has its one ok row and none
is without one, the writes that failed are write_error rows, the summary says why the run stopped, the command
exits 75 with one line that says what to do, and a rerun once DST can be written finishes the rest, each input
once."""

import contextlib
import errno
import json
import posixpath
import subprocess
import threading
import urllib.parse

import boto3
import numpy as np
import pytest

from imgxlate.infer import plan
from imgxlate.infer.book import RESERVE, RESERVE_BYTES, ShardBook
from imgxlate.infer.run import DstFailed
from imgxlate.io import listing, manifest, storage

from faultproxy import FaultProxy
from fixtures import png, rows_of, summary_of, translate, write_tree

EXIT_DST_FAILED = 75            # guard.py's docstring; the README's exit codes


def noise_inputs(src, n: int, size: int) -> list[str]:
    """``n`` PNGs of noise (incompressible: each output takes its full size on DST); their names."""
    rng = np.random.default_rng(0)
    files = {f"img{i:03d}.png": png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(n)}
    write_tree(src, files)
    return sorted(files)


@contextlib.contextmanager
def tmpfs(path, kib: int):
    """A tmpfs of ``kib`` KiB mounted on ``path``; yields a function that resizes it."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"a small tmpfs for DST cannot be mounted here (the test needs root): {r.stderr.strip()}")
    try:
        yield lambda k: subprocess.run(["mount", "-o", f"remount,size={k}k", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def stop_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("imgxlate translate: stopped: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def check_stopped(rows: list[dict], summary: dict, outputs: list[str], inputs: list[str], line: str) -> list[str]:
    """What the stopped run recorded: each output on DST has exactly one row, ok, and every other row is a failed
    write that says DST failed; the summary and the line count them. Returns the inputs done."""
    ok = sorted(r["key"] for r in rows if r["status"] == "ok")
    assert sorted(posixpath.basename(r["output_uri"]) for r in rows if r["status"] == "ok") == outputs
    assert len({r["key"] for r in rows}) == len(rows)                  # one row per input
    failed = [r for r in rows if r["status"] != "ok"]     # none when DST refused a manifest part first
    assert all(r["status"] == "write_error" and r["error"].startswith(storage.DST_FAILURE) for r in failed)
    assert 0 < len(ok) < len(inputs)
    assert summary["counts"] == {"ok": len(ok), **({"write_error": len(failed)} if failed else {})}
    # (a drain stops the listing too: inputs not yet listed are not counted, and the line says "at least")
    assert summary["not_started"] == summary["inputs"] - len(rows) and "unrecorded" not in summary
    assert "interrupted" not in summary
    assert f": {len(ok)} outputs written" + (f", {len(failed)} writes failed" if failed else "") + "; " + \
           ("" if summary["listed_all"] else "at least ") + f"{summary['not_started']} inputs not started; " in line
    assert line.endswith(" and rerun the same command to finish")
    return ok


def check_finished_once(all_rows: list[dict], rest: list[dict], summary: dict, inputs: list[str],
                        done_before: list[str]) -> None:
    """The rerun did exactly the inputs left, once each: every input has one ok row over both runs."""
    assert sorted(r["key"] for r in rest) == sorted(set(inputs) - set(done_before))
    assert all(r["status"] == "ok" for r in rest)
    oks = sorted(r["key"] for r in all_rows if r["status"] == "ok")
    assert oks == inputs                                                # one ok row per input, over both runs
    assert summary["counts"] == {"ok": len(inputs) - len(done_before), "skipped_done": len(done_before)}
    retried = {r["key"] for r in all_rows if r["status"] == "write_error"}
    assert all(r["attempt"] == (2 if r["key"] in retried else 1) for r in rest)


def local_outputs(dst) -> list[str]:
    """Every file under DST outside its manifest (a temporary left behind would be one too)."""
    return sorted(p.name for p in dst.rglob("*") if p.is_file() and "_manifest" not in p.relative_to(dst).parts)


def test_a_full_local_dst_stops_the_run_recorded_and_a_rerun_finishes_it(tmp_path, capsys, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    inputs = noise_inputs(src, 40, 64)          # outputs of 128x128 noise: ~50 KB each, 2 MB in all
    with tmpfs(dst, RESERVE_BYTES // 1024 + 512) as resize:       # the reserve, and room for about 8 outputs
        code = translate(src, dst, "--scale", "2", "--shard-size", "4", "--queued-inputs", "8", "--run-id", "full")
        line = stop_line(capsys.readouterr().err)
        assert code == EXIT_DST_FAILED
        assert line.startswith(f"imgxlate translate: stopped: no space left on DST ({dst}): ")
        assert "free space on DST and rerun the same command to finish" in line
        summary = summary_of(dst, "full")
        assert summary["stopped"] == "no space left on DST"
        rows = rows_of(dst, "full")
        done = check_stopped(rows, summary, local_outputs(dst), inputs, line)
        assert not [p for p in (dst / "_manifest").iterdir() if p.name.startswith(RESERVE)]
        assert not [p for p in dst.rglob("*") if storage.TMP_MARK in p.name]        # no temporary left

        resize(64 * 1024)                       # space is back
        assert translate(src, dst, "--scale", "2", "--shard-size", "4", "--run-id", "rest") == 0
        check_finished_once(rows + rows_of(dst, "rest"), rows_of(dst, "rest"), summary_of(dst, "rest"), inputs,
                            done)
        assert local_outputs(dst) == inputs
        assert not [p for p in (dst / "_manifest").iterdir() if p.name.startswith(RESERVE)]


FULL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InsufficientStorage</Code>'
        b"<Message>Insufficient storage space.</Message></Error>")


def full_after(n: int, prefix: str):
    """A FaultProxy answer: the store is full once ``n`` outputs under ``prefix`` were written (its manifest, under
    _manifest/, is still written)."""
    lock, written = threading.Lock(), [0]

    def answer(method, path, headers):
        key = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        if method != "PUT" or not key.startswith(prefix) or "/_manifest/" in key or not key.endswith(".png"):
            return None
        with lock:
            written[0] += 1
            return (507, FULL) if written[0] > n else None
    return answer


def test_a_store_that_refuses_writes_stops_the_run_recorded_and_a_rerun_finishes_it(
        tmp_path, bucket, s3_server, ray_local, capsys, monkeypatch):
    src, dst = tmp_path / "src", f"s3://{bucket}/out"
    inputs = noise_inputs(src, 24, 16)
    s3 = boto3.client("s3", endpoint_url=s3_server)

    def outputs():
        got = s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])
        return sorted(posixpath.basename(o["Key"]) for o in got if not o["Key"].startswith("out/_manifest/"))

    argv = (src, dst, "--scale", "2", "--shard-size", "3", "--queued-inputs", "6")
    with FaultProxy(s3_server, answer=full_after(6, f"/{bucket}/out/")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)       # restored after the test (the job sets it too)
        code = translate(*argv, "--s3-endpoint", proxy.url, "--run-id", "full")
        assert proxy.answered > 0
    line = stop_line(capsys.readouterr().err)
    assert code == EXIT_DST_FAILED
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    summary = summary_of(dst, "full")
    assert summary["stopped"] == "the store refused the write (quota or storage full)"
    assert line.startswith(f"imgxlate translate: stopped: {summary['stopped']} ({dst}): ")
    assert "free space or raise the quota on DST and rerun the same command to finish" in line
    rows = rows_of(dst, "full")
    done = check_stopped(rows, summary, outputs(), inputs, line)

    with FaultProxy(s3_server) as proxy:                        # the store takes writes again
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert translate(*argv, "--s3-endpoint", proxy.url, "--run-id", "rest") == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    rest = rows_of(dst, "rest")
    check_finished_once(rows + rest, rest, summary_of(dst, "rest"), inputs, done)
    assert outputs() == inputs
    assert manifest.runs(dst) == ["full", "rest"]


def _shard_and_a_full_dst(tmp_path, monkeypatch, n: int, refuse: str):
    """(DST, a shard of n inputs, their ok rows, a switch [True]) with manifest.<refuse> failing with ENOSPC for as
    long as the switch is on."""
    dst = str(tmp_path / "dst")
    p = plan.Planner.__new__(plan.Planner)            # just its shard builder: no listing thread
    p.dst, p.ext, p.suffix, p.run_id, p.recipe, p.exts = dst, ".png", "", "r1", "R", (".png",)
    shard = p._shard([listing.Item(str(tmp_path / f"{i}.png"), f"{i}.png", 10) for i in range(n)], "plain", set())
    rows = [{**r, "status": "ok"} for b in shard.tables() for r in b.to_pylist()]
    full, write = [True], getattr(manifest, refuse)

    def refused(*args, **kw):
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(*args, **kw)
    monkeypatch.setattr(manifest, refuse, refused)
    return dst, shard, rows, full


def test_the_book_keeps_the_rows_dst_refused_and_tries_them_once_more_at_the_end(tmp_path, monkeypatch):
    dst, shard, rows, full = _shard_and_a_full_dst(tmp_path, monkeypatch, 7, "write_part")
    marker = tmp_path / f"dst/_manifest/_shards/{shard.id}.json"
    book = ShardBook(dst, "r1", "R", every_rows=2)
    book.add_shard(shard)
    book.add(manifest.to_table(rows[:3]))             # a part is due, and refused: kept, nothing more is tried
    assert book.failure == "no space left on DST" and book.unrecorded() == 3 and not marker.exists()
    book.add(manifest.to_table(rows[3:]))             # the shard is complete: still kept
    assert shard.id in book.open and book.unrecorded() == 7
    assert book.last_try() == 7 and book.failure == "no space left on DST"      # still full
    full[0] = False                                   # (the reserve freed)
    assert book.last_try() == 0 and shard.id not in book.open
    assert json.loads(marker.read_text())["complete"]
    assert sorted(r["key"] for r in manifest.read_run(dst, "r1").to_pylist()) == [f"{i}.png" for i in range(7)]

    summary = {"counts": {"ok": 30, "write_error": 2}, "stopped": "no space left on DST", "dst": dst,
               "not_started": 8, "listed_all": False, "unrecorded": 5}
    e = DstFailed(summary)
    assert e.exit_code == EXIT_DST_FAILED and f"{e}; {e.advice}" == (
        f"stopped: no space left on DST ({dst}): 30 outputs written, 2 writes failed; 5 of these rows could not be "
        f"recorded (a rerun does their inputs again); at least 8 inputs not started; free space on DST and rerun the "
        f"same command to finish")


def _s3_error(code: str, status: int) -> OSError:
    """What s3fs raises for an S3 error answer it has no errno for: OSError(EIO), chained to botocore's error."""
    from botocore.exceptions import ClientError

    e = OSError(errno.EIO, f"{code}: {code}")
    e.__context__ = ClientError({"Error": {"Code": code, "Message": code},
                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    return e


def test_an_error_about_one_output_is_not_dst_failing():
    # A file name with "503" or "500 " in it is no server error; a name the store refuses is that output's error.
    assert storage.dst_failure(OSError(errno.EINVAL, "Invalid argument", "/dst/IMG_5031:a.png")) is None
    assert not storage.is_transient(OSError(errno.EINVAL, "Invalid argument", "/dst/500 photos/a.png"))
    assert storage.is_transient(RuntimeError("503 Service Unavailable")) and storage.is_transient(
        RuntimeError("An error occurred (SlowDown)"))
    assert storage.dst_failure(_s3_error("XMinioInvalidObjectName", 400)) is None
    assert storage.dst_failure(_s3_error("InternalError", 500)) == "the store kept failing after retries"
    assert storage.dst_failure(_s3_error("XMinioStorageFull", 507)).startswith("the store refused the write")
    assert storage.dst_failure(OSError(errno.ENOSPC, "No space left on device", "/d/a.png")) == "no space left on DST"
    assert storage.dst_failure(OSError(errno.EIO, "Input/output error", "/d/a.png")) == "I/O error on DST"


def test_the_reserve_takes_the_summary_when_dst_fills_at_the_very_end(tmp_path, ray_local, monkeypatch):
    write_tree(tmp_path / "src", {f"i{k}.png": png(np.full((8, 8, 3), k * 20, np.uint8)) for k in range(3)})
    real, calls = manifest.write_summary, []

    def full_once(*a, **kw):                            # DST is full when the run writes its summary
        calls.append(a)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)
    monkeypatch.setattr(manifest, "write_summary", full_once)
    assert translate(tmp_path / "src", tmp_path / "dst", "--scale", "2", "--run-id", "r1") == 0
    assert len(calls) == 2 and summary_of(tmp_path / "dst", "r1")["counts"] == {"ok": 3}
    assert not list((tmp_path / "dst" / "_manifest").glob(RESERVE + "*"))


def test_rows_in_a_part_whose_marker_was_refused_count_as_unrecorded(tmp_path, monkeypatch):
    # the part fits, its marker does not
    dst, shard, rows, full = _shard_and_a_full_dst(tmp_path, monkeypatch, 4, "write_shard_marker")
    book = ShardBook(dst, "r1", "R", every_rows=2)
    book.add_shard(shard)
    book.add(manifest.to_table(rows[:2]))
    assert book.failure == "no space left on DST" and book.unrecorded() == 2      # a rerun would not find them
    full[0] = False
    assert book.last_try() == 0 and json.loads(
        (tmp_path / f"dst/_manifest/_shards/{shard.id}.json").read_text())["parts"] == ["r1/part-" + shard.id +
                                                                                          "-000.parquet"]
