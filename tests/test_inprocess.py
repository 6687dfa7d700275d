"""A small run in the driver's process, without Ray (imgxlate/infer/inprocess.py): chosen as users get it, the
same bytes and recipe as a run on Ray, resume across the two, and a stage that raises costs one input, not its
block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from imgxlate.artifact import save
from imgxlate.cli import main
from imgxlate.infer import inprocess, pieces, stages
from imgxlate.models import build

from conftest import photo
from fixtures import png, rows_of, summary_of, wait_for, write_tree

USER_RUN = ("import sys, ray; from imgxlate.cli import main; rc = main(sys.argv[1:]); "
            "print('ray started' if ray.is_initialized() else 'no ray'); sys.exit(rc)")


def _run_as_a_user(*argv) -> subprocess.CompletedProcess:
    """`imgxlate translate ARGV` in a fresh process, as a user's shell runs it (no Ray running, no RAY_ADDRESS)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-c", USER_RUN, "translate", *map(str, argv)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_a_small_run_goes_in_process_and_makes_the_bytes_a_run_on_ray_makes(tmp_path, ray_local):
    src = tmp_path / "src"
    write_tree(src, {f"p{i}.png": png(photo(40 + 8 * i, 48, seed=i)) for i in range(6)})
    write_tree(src, {"broken.png": b"\x89PNG not really"})
    model = tmp_path / "sr"
    save(build("sr", nf=16, n_blocks=2, scale=2), str(model))
    opts = ["--model", model, "--amp", "bf16", "--run-id", "r1"]

    r = _run_as_a_user(src, tmp_path / "here", *opts)
    assert r.returncode == 0, r.stderr[-3000:]          # (the broken input gets its row, as on Ray)
    assert r.stdout.strip() == "no ray"
    assert "runs in this process without Ray" in r.stderr
    summary = summary_of(tmp_path / "here", "r1")
    assert summary["resources"]["pipeline"] == "in-process" and summary["counts"] == {"ok": 6, "decode_error": 1}
    assert summary["precision"] == "bf16"
    assert summary["resources"]["actors"] == min(7, inprocess.cpus())   # tiny inputs: a block per CPU, in threads
    assert main(["translate", str(src), str(tmp_path / "ray"), *map(str, opts), "--pipeline", "fused"]) == 0
    assert summary_of(tmp_path / "ray", "r1")["resources"]["pipeline"] == "fused"

    here = {r["key"]: r for r in rows_of(tmp_path / "here", "r1")}
    on_ray = {r["key"]: r for r in rows_of(tmp_path / "ray", "r1")}
    assert here.keys() == on_ray.keys() and len(here) == 7
    for key, row in here.items():
        for col in ("status", "output_sha256", "output_bytes", "recipe", "precision", "output_width"):
            assert row[col] == on_ray[key][col], (key, col)
        if row["status"] == "ok":
            assert (tmp_path / "here" / row["output_uri"].rsplit("/", 1)[-1]).read_bytes() == \
                (tmp_path / "ray" / row["output_uri"].rsplit("/", 1)[-1]).read_bytes()
    assert here["broken.png"]["error"] == on_ray["broken.png"]["error"]

    # a rerun, in this process or on Ray, finds the other path's outputs done
    r = _run_as_a_user(src, tmp_path / "ray", *opts[:-1], "r2")
    assert r.returncode == 0 and summary_of(tmp_path / "ray", "r2")["counts"] == {"skipped_done": 6, "decode_error": 1}
    assert summary_of(tmp_path / "ray", "r2")["resources"]["pipeline"] == "in-process"
    assert main(["translate", str(src), str(tmp_path / "here"), *map(str, opts[:-1]), "r2",
                 "--pipeline", "fused"]) == 0
    assert summary_of(tmp_path / "here", "r2")["counts"] == {"skipped_done": 6, "decode_error": 1}


def test_a_folder_of_small_tars_runs_in_process(tmp_path):
    """A tar is a shard of its own and the listing waits for room after a few ready shards, so the listing of a
    folder of tars never ended while auto waited for it: such a run always started Ray. Auto now takes the ready
    shards while it waits."""
    import io
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    for t in range(6):
        with tarfile.open(src / f"s{t}.tar", "w") as tf:
            for i in range(2):
                data = png(photo(10, 12, seed=10 * t + i))
                info = tarfile.TarInfo(f"{t}{i}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    r = _run_as_a_user(src, tmp_path / "dst", "--model", "bicubic", "--scale", "2", "--input-format", "webdataset",
                       "--run-id", "r1")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = summary_of(tmp_path / "dst", "r1")
    assert summary["counts"] == {"ok": 12} and summary["resources"]["pipeline"] == "in-process"


def _run(pipeline="auto", listed=5, source_bytes=1000, done=True, device="cpu", unknown=0, dst="/nonexistent",
         **cfg):
    plan = SimpleNamespace(listing_done=done, listed=listed, source_bytes=source_bytes, unknown_sizes=unknown,
                           take=lambda n, timeout: time.sleep(timeout) or [])
    config = SimpleNamespace(pipeline=pipeline, ray_address=None, gpus_per_actor=None, actors=None, max_actors=None,
                             dst=dst)
    vars(config).update(cfg)
    return SimpleNamespace(cfg=config, plan=plan, meta={"device_kind": device})


def _chosen(run):
    return inprocess.chosen(run, [])


def test_auto_runs_in_process_only_a_small_run_that_joins_no_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))
    assert _chosen(_run()) and _chosen(_run(listed=inprocess.MAX_INPUTS))
    assert _chosen(_run(listed=inprocess.MAX_INPUTS + 1)) is None
    assert _chosen(_run(source_bytes=inprocess.MAX_SOURCE_BYTES + 1)) is None
    assert _chosen(_run(done=False)) is None               # still listing: not known to be small
    assert _chosen(_run(unknown=1)) is None                # a manifest of URIs: sizes not known
    assert _chosen(_run(device="cuda")) is None
    assert _chosen(_run(gpus_per_actor=1)) is None
    assert _chosen(_run(actors=2)) is None                 # asking for actors asks for Ray
    assert _chosen(_run(ray_address="ray://head:10001")) is None
    assert _chosen(_run(pipeline="fused")) is None and _chosen(_run(pipeline="split")) is None
    assert _chosen(_run(pipeline="in-process", listed=10**9, done=False))
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")           # `ray job submit` sets it
    assert _chosen(_run()) is None
    monkeypatch.delenv("RAY_ADDRESS")
    # an in-process run of this DST was killed (no summary): an input may kill every rerun, so Ray isolates it
    dst = tmp_path / "dst"
    write_tree(dst, {f"_manifest/old/{inprocess.MARK}": b"", f"_manifest/done/{inprocess.MARK}": b"",
                     "_manifest/done/summary.json": b"{}"})
    assert inprocess.killed_runs(str(dst)) == ["old"] and _chosen(_run(dst=str(dst))) is None
    (dst / "_manifest/old/summary.json").write_bytes(b"{}")
    assert _chosen(_run(dst=str(dst)))
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: True))
    assert _chosen(_run()) is None                         # a notebook's (or a test session's) Ray
    assert main(["translate", str(tmp_path), str(tmp_path / "o"), "--model", "bicubic", "--scale", "2",
                 "--pipeline", "in-process", "--actors", "2"]) == 2          # an option that would do nothing


def test_small_inputs_run_a_block_per_cpu_larger_ones_two_at_most():
    plan = SimpleNamespace(listed=100, source_bytes=100 * inprocess.SMALL_INPUT_BYTES)
    cfg = SimpleNamespace(compile=False, threads_per_actor=None)
    assert inprocess.workers(cfg, plan, 4) == 4 and inprocess.workers(cfg, plan, 1) == 1
    assert inprocess.workers(cfg, SimpleNamespace(listed=3, source_bytes=3), 16) == 3    # no more than inputs
    large = SimpleNamespace(listed=100, source_bytes=plan.source_bytes + 1)
    assert inprocess.workers(cfg, large, 16) == inprocess.LARGE_BLOCKS == 2             # their memory: two at once
    assert inprocess.workers(cfg, large, 2) == 2 and inprocess.workers(cfg, large, 1) == 1
    assert inprocess.workers(cfg, SimpleNamespace(listed=1, source_bytes=10 << 20), 16) == 1
    assert inprocess.workers(SimpleNamespace(compile=True, threads_per_actor=None), plan, 4) == 1
    assert inprocess.workers(SimpleNamespace(compile=False, threads_per_actor=2), plan, 4) == 1


def test_a_halt_stops_a_tiled_image_between_rows_of_tiles_and_is_no_input_failure():
    from imgxlate.infer.predictor import PredictOptions, Predictor
    from imgxlate.infer.tiling import Halted

    pred = Predictor("bicubic", scale=2, device="cpu", options=PredictOptions(tile=64))
    asked = []
    pred.halt = lambda: asked.append(1) or len(asked) > 2     # two rows of tiles, then a second Ctrl-C
    with pytest.raises(Halted):                                # not an Exception: no stage makes it a failure row
        pred.run([(photo(256, 256), None)])
    assert len(asked) == 3 and not issubclass(Halted, Exception)
    pred.halt = None
    assert pred.run([(photo(256, 256), None)])[0].pixels.shape == (512, 512, 3)


def test_a_halt_stops_small_images_between_model_calls():
    from imgxlate.infer.predictor import PredictOptions, Predictor
    from imgxlate.infer.tiling import Halted

    pred = Predictor("bicubic", scale=2, device="cpu", options=PredictOptions(batch_pixels=32 * 32))
    asked = []
    pred.halt = lambda: asked.append(1) or len(asked) > 2     # two model calls of one image, then a 2nd Ctrl-C
    with pytest.raises(Halted):
        pred.run([(photo(32, 32, seed=i), None) for i in range(6)])
    assert len(asked) == 3


def test_blocks_at_once_share_out_every_cpu_as_their_own_torch_threads(tmp_path, monkeypatch):
    import threading

    import torch

    assert inprocess.thread_shares(3, 2) == [2, 1] and inprocess.thread_shares(2, 2) == [1, 1]
    assert inprocess.thread_shares(16, 2) == [8, 8] and inprocess.thread_shares(5, 3) == [2, 2, 1]
    src = tmp_path / "src"
    write_tree(src, {f"p{i}.png": png(photo(256, 256, seed=i)) for i in range(6)})    # large: two blocks at once
    real, seen = stages.FusedStage.__call__, {}

    def noted(self, batch):
        seen[threading.get_ident()] = torch.get_num_threads()
        time.sleep(0.3)                                        # (the other block starts meanwhile, in its thread)
        return real(self, batch)

    monkeypatch.setattr(stages.FusedStage, "__call__", noted)
    before = torch.get_num_threads()
    assert main(["translate", str(src), str(tmp_path / "dst"), "--model", "bicubic", "--scale", "2",
                 "--pipeline", "in-process", "--num-cpus", "3", "--run-id", "r1"]) == 0
    assert sorted(seen.values()) == [1, 2]                    # 3 CPUs: 2 + 1 torch threads, none idle
    assert torch.get_num_threads() == before                  # (the caller's own count comes back)


@pytest.mark.skipif(inprocess.cpus() < 2, reason="two blocks at once need two CPUs")
def test_a_second_ctrl_c_stops_large_inputs_between_rows_of_tiles_and_every_output_has_its_row(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"p0.png": png(photo(96, 96))})           # done at once: the first output
    write_tree(src, {f"p{i}.png": png(photo(1024, 1024, seed=i)) for i in (1, 2, 3)})    # large: 2 blocks at once
    model = tmp_path / "sr"
    save(build("sr", nf=64, n_blocks=4, scale=2), str(model))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "imgxlate.cli", "translate", src, dst, "--model", model,
                             "--amp", "off", "--tile", "128", "--run-id", "r1", "--pipeline", "in-process"],
                            start_new_session=True,
                            stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        wait_for(lambda: (dst / "p0.png").exists() or proc.poll() is not None, "the first output", 240, every_s=0.05)
        assert proc.poll() is None, "the job finished before it could be signalled"
        os.killpg(proc.pid, signal.SIGINT)                     # drain: the blocks in flight would go on
        time.sleep(0.5)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)                     # stop at once: they stop between rows of tiles
        _, err = proc.communicate(timeout=300)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "second SIGINT: stopping without draining; a rerun does every input that has no row" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in dst.glob("*.png")) == ["p0.png"]      # the stopped inputs wrote nothing
    assert [(r["key"], r["status"]) for r in rows_of(dst, "r1")] == [("p0.png", "ok")]   # (no summary: stopped)
    assert not list(dst.rglob("*imgxlate-tmp*"))
    assert took < 25, took                                     # a 1024 px input takes ~30 s here on one thread
    assert inprocess.killed_runs(str(dst)) == []               # stopped, not killed: auto may run here again


# 8 px inputs run a block per CPU in threads, 256 px ones (124 KB) two blocks at most (inprocess.LARGE_BLOCKS)
@pytest.mark.parametrize("bad, px", [("p3.png", 8), ("broken.png", 8), ("p3.png", 256)])
def test_a_stage_that_raises_costs_its_input_a_row_not_its_block(tmp_path, monkeypatch, bad, px):
    src = tmp_path / "src"
    write_tree(src, {f"p{i}.png": png(photo(px, px, seed=i)) for i in range(150)})  # blocks of 2-3 (plan.MIN_BLOCKS)
    write_tree(src, {"broken.png": b"not a png"})
    real = stages.FusedStage.__call__

    def flaky(self, batch):
        if any(u.endswith("/" + bad) for u in batch.column("source_uri").to_pylist()):
            raise RuntimeError("a bug in a stage")
        return real(self, batch)

    monkeypatch.setattr(stages.FusedStage, "__call__", flaky)
    code = main(["translate", str(src), str(tmp_path / "dst"), "--model", "bicubic", "--scale", "2",
                 "--pipeline", "in-process", "--run-id", "r1"])
    assert code == 0
    assert summary_of(tmp_path / "dst", "r1")["resources"]["actors"] == min(inprocess.cpus(), 151 if px == 8 else 2)
    rows = {r["key"]: r for r in rows_of(tmp_path / "dst", "r1")}
    assert len(rows) == 151
    assert rows[bad]["status"] == "model_error" and rows[bad]["error"] == "RuntimeError: a bug in a stage"
    others = {k: r["status"] for k, r in rows.items() if k != bad}
    assert others == {k: "decode_error" if k == "broken.png" else "ok" for k in others}


def test_shard_objects_in_process_are_the_objects_a_run_on_ray_writes(tmp_path, ray_local):
    """--output-format webdataset / parquet: a shard's one object is assembled from its pieces in-process too, and
    holds the same members and bytes as on Ray."""
    src = tmp_path / "src"
    write_tree(src, {f"d/p{i}.png": png(photo(16 + 4 * i, 20, seed=i)) for i in range(5)})
    write_tree(src, {"d/broken.png": b"no"})
    for fmt, ext in (("webdataset", ".tar"), ("parquet", ".parquet")):
        made = {}
        for pipeline in ("in-process", "fused"):
            dst = tmp_path / f"{fmt}-{pipeline}"
            assert main(["translate", str(src), str(dst), "--model", "bicubic", "--scale", "2", "--output-format", fmt,
                         "--pipeline", pipeline, "--run-id", "r1"]) == 0
            assert summary_of(dst, "r1")["resources"]["pipeline"] == pipeline
            objects = sorted(p.relative_to(dst) for p in dst.rglob(f"*{ext}") if "_manifest" not in p.parts)
            assert len(objects) == 1 and not [p for p in (dst / "_manifest" / pieces.PIECES_DIR).rglob("*")
                                              if p.is_file()]                        # its pieces removed
            made[pipeline] = (objects, {r["key"]: (r["status"], r["output_uri"].rsplit("/", 1)[-1] if r["output_uri"]
                                                   else None, r["output_sha256"]) for r in rows_of(dst, "r1")})
        assert made["in-process"] == made["fused"], fmt
        assert sum(s == "ok" for s, _, _ in made["fused"][1].values()) == 5


def test_quiet_leaves_the_warning_filters_as_they_were_when_threads_overlap():
    """catch_warnings swaps process-wide state: threads entering and leaving it out of order (an in-process run's
    blocks decoding at once) left a filter that silenced every warning for good. imgxlate.log.quiet serialises."""
    import threading
    import time
    import warnings

    from imgxlate.log import quiet

    before = list(warnings.filters)

    def hold(s):
        with quiet():
            time.sleep(s)

    threads = [threading.Thread(target=hold, args=(0.05 * (i % 3),)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == before
