"""Stopping and starting again on one DST: SIGTERM or SIGINT drains (every output written has its row, no Ray
process is left) and the rerun does only the rest; a resume compares the recipe, so other settings do the work
again; a second run on a DST in use stops with a clear message or waits for it; and a run killed before its
summary is reported as such. Resume by shard markers is in test_shards.py, a killed driver or actor in
test_faults.py."""

import json
import os
import posixpath
import signal
import subprocess
import sys

import pytest
from PIL import Image

from imgxlate.cli import main
from imgxlate.infer import inprocess

from conftest import photo
from fixtures import alive, descendants, png, rows_of, summary_of, translate, wait_for, write_tree


def test_resume_compares_the_recipe(tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {f"{i}.png": png(photo(10, 12, seed=i)) for i in range(2)})
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


# auto: this small run goes in-process (no Ray): 160 px PNGs (48 KB) a block per CPU, 256 px ones (124 KB) two
# blocks at most (inprocess.LARGE_BLOCKS)
@pytest.mark.parametrize("pipeline, px", [("auto", 160), ("fused", 160), ("auto", 256)])
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_drain_record_every_output_and_leave_no_ray_process(sig, code, pipeline, px, tmp_path,
                                                                               ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {f"img{i:03d}.png": png(photo(px, px, seed=i)) for i in range(60)})
    cmd = [sys.executable, "-m", "imgxlate.cli", "translate", str(src), str(dst), "--model", "bicubic",
           "--scale", "4", "--batch-size", "1", "--pipeline", pipeline]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def written():
        return sorted(p.name for p in dst.glob("*.png"))
    try:
        wait_for(lambda: len(written()) >= 3 or proc.poll() is not None, "the job's first 3 outputs", 240)
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.poll() is None, "the job finished before it could be signalled"
    tree = descendants(proc.pid)
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
    assert summary["resources"]["pipeline"] == {"auto": "in-process"}.get(pipeline, pipeline)
    assert pipeline == "fused" or summary["resources"]["actors"] == min(inprocess.cpus(), 60 if px == 160 else 2)
    rows = rows_of(dst)
    ok = sorted(posixpath.basename(r["output_uri"]) for r in rows if r["status"] == "ok")
    assert ok == written() and 3 <= len(ok) < 60                 # every written output has its row
    assert summary["not_started"] == 60 - len(rows)
    assert not list(dst.rglob("*imgxlate-tmp*"))
    wait_for(lambda: not alive(tree), "the interrupted run's Ray processes to exit", 60, every_s=0.5)
    assert translate(src, dst, "--scale", "4") == 0                # the rerun finishes the rest
    assert written() == [f"img{i:03d}.png" for i in range(60)]
    last = rows_of(dst)                                              # only what was left to do
    assert len(last) == 60 - len(ok) and all(r["status"] == "ok" for r in last)
    assert json.loads(next(p for p in (dst / "_manifest").glob("*/summary.json") if p.parent.name == last[0][
        "run_id"]).read_text())["counts"] == {"ok": 60 - len(ok), "skipped_done": len(ok)}


def test_a_second_run_on_the_same_dst_waits_or_stops_with_a_clear_message(tmp_path, capsys, ray_local):
    from imgxlate.io.lease import Lease

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {f"img{i}.png": png(photo(32, 32, seed=i)) for i in range(4)})
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


def test_a_killed_runs_dst_is_reported_and_a_dry_run_checks_dst(tmp_path, capsys, s3_server, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {f"img{i}.png": png(photo(24, 24, seed=i)) for i in range(3)})
    assert translate(src, dst, "--scale", "2", "--run-id", "first") == 0
    rows = rows_of(dst, "first")
    (dst / "_manifest" / "first" / "summary.json").unlink()          # as a SIGKILL leaves it: parts, no summary
    capsys.readouterr()
    assert main(["report", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "first (killed: no summary)" in out and len(rows) == 3
    assert translate(src, f"s3://no-such-bucket-{os.getpid()}/out", "--scale", "2", "--dry-run") == 2
    assert "does not exist" in capsys.readouterr().err
