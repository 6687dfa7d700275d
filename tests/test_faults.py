"""Killing the job midway: the driver (SIGKILL) or a model actor's process. A rerun (or Ray's
restart of the actor) ends with exactly one ok output per input and no partial files."""

import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from imgxlate.artifact import save
from imgxlate.infer import inprocess, job
from imgxlate.io import manifest
from imgxlate.models import build

from conftest import photo
from fixtures import wait_for


def make_inputs(src, n, size=96):
    src.mkdir(parents=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(photo(size, size, seed=i)).save(buf, "PNG")
        (src / f"img_{i:03d}.png").write_bytes(buf.getvalue())


def outputs(dst):
    return sorted(p for p in dst.rglob("*") if p.is_file() and "_manifest" not in p.parts)


def check_exactly_one_ok_output_per_input(src, dst, summary):
    inputs = sorted(p.name for p in src.iterdir())
    outs = outputs(dst)
    assert [p.name for p in outs] == inputs                        # one each, no temporaries
    # Every input's latest row, over every run (a rerun writes rows only for what it processes), is done.
    latest = {}
    for r in sorted(manifest.read_all(str(dst)).to_pylist(), key=lambda r: r["run_id"]):
        latest[r["key"]] = r
    assert sorted(latest) == inputs
    assert {r["status"] for r in latest.values()} <= set(manifest.DONE)
    assert summary["counts"].get("ok", 0) + summary["counts"].get("skipped_done", 0) == len(inputs)
    for p in outs:
        Image.open(p).load()                                       # every output is complete


@pytest.mark.parametrize("pipeline", ["fused", "auto"])     # auto: this small run goes in-process (no Ray)
def test_driver_killed_midway_then_rerun(tmp_path, ray_local, pipeline):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_inputs(src, 80)
    model = tmp_path / "sr"
    save(build("sr", nf=32, n_blocks=4, scale=2), str(model))
    cmd = [sys.executable, "-m", "imgxlate.cli", "translate", str(src), str(dst), "--model", str(model),
           "--batch-size", "2", "--pipeline", pipeline]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(outputs(dst)) >= 5 or proc.poll() is not None, "the job's first 5 outputs", 240)
        assert proc.poll() is None, "the job finished before it could be killed"
        written = len(outputs(dst))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)                        # the driver and the Ray it started
        proc.wait()
    assert 5 <= written < 80
    # a killed in-process run is known, so that auto's rerun runs on Ray (an input that kills it gets a row there)
    assert bool(inprocess.killed_runs(str(dst))) == (pipeline == "auto")
    summary = job.run(job.TranslateConfig(src=str(src), dst=str(dst), model=str(model), progress_every_s=60))
    check_exactly_one_ok_output_per_input(src, dst, summary)
    assert summary["counts"].get("ok", 0) >= 80 - written   # the rest was done now


def model_actor_pids():
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if "ModelStage" in cmd or "FusedStage" in cmd:     # the split or the fused pipeline's model actor
            pids.append(int(pid))
    return pids


def test_model_actor_killed_midway_is_replaced(tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_inputs(src, 60)
    model = tmp_path / "sr"
    save(build("sr", nf=32, n_blocks=4, scale=2), str(model))
    result = {}

    def work():
        result["summary"] = job.run(job.TranslateConfig(src=str(src), dst=str(dst), model=str(model), batch_size=2,
                                                        progress_every_s=60))

    t = threading.Thread(target=work)
    t.start()
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and t.is_alive() and killed is None:
        pids = model_actor_pids()
        if pids and len(outputs(dst)) >= 3:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    t.join(300)
    assert killed is not None, "no model actor was found to kill"
    check_exactly_one_ok_output_per_input(src, dst, result["summary"])
    assert result["summary"]["counts"] == {"ok": 60}
