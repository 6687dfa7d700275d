"""Damaged resume state never blocks or deceives a rerun: a shard marker or a manifest part that exists but cannot
be read (truncated) is warned about by name and treated as absent, so its inputs are done again and the next
marker replaces it. A complete marker records its parts' sizes, checked with one listing per earlier run folder,
so a truncated part under a complete marker is found without reading every part."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from imgxlate.artifact import save
from imgxlate.infer import plan
from imgxlate.io import manifest
from imgxlate.models import build

from conftest import photo
from fixtures import own, png, rows_of, translate, write_tree

NAMES = [f"{c}{i}.png" for c in "abc" for i in range(2)]


def _first_run(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {n: png(photo(10, 12, seed=i)) for i, n in enumerate(NAMES)})
    assert translate(src, dst, "--scale", "2", "--shard-size", "2", "--run-id", "r1") == 0
    markers = {p: json.loads(p.read_text()) for p in sorted((dst / "_manifest/_shards").glob("*.json"))}
    assert len(markers) >= 2 and all(m["complete"] for m in markers.values())
    return src, dst, markers


def _keys_of(dst, parts) -> set[str]:
    table, missing = manifest.read_parts(str(dst), parts, ["key"])
    assert not missing
    return set(table.column("key").to_pylist())


def test_a_truncated_marker_is_named_and_its_inputs_are_done_again(tmp_path, ray_local, capsys):
    src, dst, markers = _first_run(tmp_path)
    path, marker = next(iter(markers.items()))
    inputs = _keys_of(dst, marker["parts"])
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])      # a marker cut off mid-write
    capsys.readouterr()
    assert translate(src, dst, "--scale", "2", "--shard-size", "2", "--run-id", "r2") == 0
    err = capsys.readouterr().err
    assert f"warning: shard marker {path} cannot be read (JSONDecodeError" in err, err
    assert {r["key"]: r["status"] for r in rows_of(dst, "r2")} == {k: "ok" for k in inputs}
    again = json.loads(path.read_text())                                    # replaced by a readable one
    assert again["complete"] and again["counts"] == {"ok": len(inputs)} and again["run_id"] == "r2"
    assert translate(src, dst, "--scale", "2", "--shard-size", "2", "--run-id", "r3") == 0   # nothing left
    assert rows_of(dst, "r3") == [] and "warning" not in capsys.readouterr().err


def test_a_truncated_part_under_a_complete_marker_is_found_by_its_size(tmp_path, ray_local, capsys, monkeypatch):
    src, dst, markers = _first_run(tmp_path)
    for m in markers.values():                   # every part's size is recorded
        assert set(m["sizes"]) == set(m["parts"])
        assert all(m["sizes"][p] == (dst / "_manifest" / p).stat().st_size for p in m["parts"])
    path, marker = next(iter(markers.items()))
    damaged = marker["parts"][0]
    inputs = _keys_of(dst, [damaged])
    part = dst / "_manifest" / damaged
    part.write_bytes(part.read_bytes()[:100])
    listed, read = [], []
    real_sizes, real_read = manifest.part_sizes, manifest.read_parts
    monkeypatch.setattr(manifest, "part_sizes", lambda d, run: listed.append(run) or real_sizes(d, run))
    monkeypatch.setattr(manifest, "read_parts", lambda d, names, cols: read.append(list(names)) or
                        real_read(d, names, cols))
    capsys.readouterr()
    assert translate(src, dst, "--scale", "2", "--shard-size", "2", "--run-id", "r2") == 0
    err = capsys.readouterr().err
    assert listed == ["r1"]                      # one listing of r1's folder for all its markers, no read per part
    assert read == [marker["parts"]]             # only the damaged shard is read, part by part
    assert f"warning: manifest part {part} cannot be read (ArrowInvalid" in err, err
    assert {r["key"]: (r["status"], r["attempt"]) for r in rows_of(dst, "r2")} == {k: ("ok", 1) for k in inputs}
    again = json.loads(path.read_text())
    assert damaged not in again["parts"] and again["complete"] and again["counts"] == {"ok": marker["n"]}
    assert set(again["sizes"]) == set(again["parts"]) and again["parts"][-1].startswith("r2/")
    listed.clear()
    read.clear()
    assert translate(src, dst, "--scale", "2", "--shard-size", "2", "--run-id", "r3") == 0
    assert rows_of(dst, "r3") == [] and read == [] and sorted(listed) == ["r1", "r2"]


def test_markers_without_sizes_are_trusted_as_before_and_damaged_files_raise_damaged(tmp_path, capsys):
    dst = str(tmp_path / "dst")
    old = {"shard": "s1", "n": 2, "complete": True, "recipe": "R", "run_id": "r0", "counts": {"ok": 2},
           "parts": ["r0/part-s1-000.parquet"]}
    marker = manifest.ShardMarker.from_json(json.dumps(old).encode())
    assert marker.sizes == {} and marker.all_done("R")
    p = plan.Planner.__new__(plan.Planner)       # just its resume logic: no listing thread
    p.dst, p.recipe = dst, "R"
    assert p._changed_parts(marker) == []       # a marker written before sizes: its parts are not checked
    marker.sizes = {"r0/part-s1-000.parquet": 10}
    assert p._changed_parts(marker) == ["r0/part-s1-000.parquet"]          # gone: r0's folder does not exist
    for bad in (b"", b'{"shard": "s1", "n": 2, "parts": [', b"[]", b'{"n": 2}', b'{"shard": "s1", "n": "x"}'):
        (tmp_path / "dst/_manifest/_shards").mkdir(parents=True, exist_ok=True)
        (tmp_path / "dst/_manifest/_shards/s1.json").write_bytes(bad)
        try:
            manifest.read_shard_marker(dst, "s1")
            raise AssertionError(f"{bad!r} was read as a marker")
        except manifest.Damaged as e:
            assert str(tmp_path / "dst/_manifest/_shards/s1.json") in str(e)
    # A part is written, its size noted, and the next marker naming it records it; a complete marker forgets it.
    name = manifest.write_part(dst, "r1", "s2-000", [{"source_uri": "x", "status": "ok"}])
    manifest.write_shard_marker(dst, manifest.ShardMarker("s2", 1, False, "R", "r1", {"ok": 1}, [name]))
    size = (tmp_path / "dst/_manifest" / name).stat().st_size
    assert manifest.read_shard_marker(dst, "s2").sizes == {name: size} == manifest.part_sizes(dst, "r1")
    manifest.write_shard_marker(dst, manifest.ShardMarker("s2", 1, True, "R", "r1", {"ok": 1}, [name]))
    manifest.write_shard_marker(dst, manifest.ShardMarker("s2", 1, True, "R", "r1", {"ok": 1}, [name]))
    assert manifest.read_shard_marker(dst, "s2").sizes == {}
    (tmp_path / "dst/_manifest" / name).write_bytes(b"PAR1 not really")
    table, missing = manifest.read_parts(dst, [name, "r1/part-gone.parquet"], ["source_uri"])
    assert missing == [name, "r1/part-gone.parquet"] and table.num_rows == 0
    assert f"warning: manifest part {tmp_path / 'dst/_manifest' / name} cannot be read" in capsys.readouterr().err


def test_on_s3_sizes_come_from_one_listing_and_damaged_files_are_named(bucket, s3_server, capsys):
    import boto3

    dst = f"s3://{bucket}/out"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = [manifest.write_part(dst, "r1", f"s{i}-000", [{"source_uri": f"x{i}", "status": "ok"}]) for i in range(3)]
    sizes = manifest.part_sizes(dst, "r1")
    assert sizes == {n: s3.head_object(Bucket=bucket, Key=f"out/_manifest/{n}")["ContentLength"] for n in names}
    assert manifest.part_sizes(dst, "r9") == {}
    s3.put_object(Bucket=bucket, Key=f"out/_manifest/{names[1]}", Body=b"PAR1")
    s3.put_object(Bucket=bucket, Key="out/_manifest/_shards/s1.json", Body=b'{"shard": "s1", "n"')
    table, missing = manifest.read_parts(dst, names, ["source_uri"])
    assert missing == [names[1]] and table.column("source_uri").to_pylist() == ["x0", "x2"]
    assert f"warning: manifest part {dst}/_manifest/{names[1]} cannot be read" in capsys.readouterr().err
    assert [r["source_uri"] for r in manifest.read_run(dst, "r1").to_pylist()] == ["x0", "x2"]
    assert f"warning: manifest part {dst}/_manifest/{names[1]} cannot be read" in capsys.readouterr().err
    try:
        manifest.read_shard_marker(dst, "s1")
        raise AssertionError("a truncated marker was read")
    except manifest.Damaged as e:
        assert f"shard marker {dst}/_manifest/_shards/s1.json cannot be read (JSONDecodeError" in str(e)


def test_a_marker_or_part_this_run_may_not_read_is_treated_as_absent(tmp_path, monkeypatch, capsys):
    # Tests run as root, for whom no mode bit denies a read: the denial is the store's answer, made here.
    dst = str(tmp_path / "dst")
    name = manifest.write_part(dst, "r1", "s1-000", [{"source_uri": "x", "status": "ok"}])
    manifest.write_shard_marker(dst, manifest.ShardMarker("s1", 1, True, "R", "r1", {"ok": 1}, [name]))
    real = manifest.storage.read_bytes

    def denied(uri, *a, **kw):
        if "_shards" in uri or "part-" in uri:
            raise PermissionError(13, "Permission denied", uri)
        return real(uri, *a, **kw)
    monkeypatch.setattr(manifest.storage, "read_bytes", denied)
    try:
        manifest.read_shard_marker(dst, "s1")
        raise AssertionError("an unreadable marker was read")
    except manifest.Damaged as e:
        assert "s1.json" in str(e) and "Permission denied" in str(e)
    table, missing = manifest.read_parts(dst, [name], ["source_uri"])
    assert missing == [name] and table.num_rows == 0
    assert "cannot be read (PermissionError" in capsys.readouterr().err


# The model artifact replaced or removed between the driver's check of it and a model stage's load (a model
# retrained to the same path, a copy over it): this process's check is wrapped to do so right after it passes.
SWAP = """import os, shutil, sys
from imgxlate.infer import job
real, calls = job.model_info, []
def swapped(cfg):
    calls.append(cfg.model)
    if len(calls) == 2 and os.environ["ORIGINAL_MODEL"]:     # the driver's copy is the first again: an actor's
        shutil.rmtree(cfg.model)                             # node held another copy
        shutil.copytree(os.environ["ORIGINAL_MODEL"], cfg.model)
    meta = real(cfg)
    if len(calls) == 1:
        shutil.rmtree(cfg.model)
        if os.environ["OTHER_MODEL"]:
            shutil.copytree(os.environ["OTHER_MODEL"], cfg.model)
    return meta
job.model_info = swapped
from imgxlate.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("change,pipeline", [("replaced", "fused"), ("replaced", "in-process"),
                                             ("removed", "fused"), ("another copy on a node", "fused"),
                                             ("contract edited", "fused")])
def test_a_model_replaced_during_a_run_makes_no_output_under_the_old_models_name(change, pipeline, tmp_path):
    """Before, the model actors loaded whatever the path held when they started and the rows recorded the model
    the driver had checked: another model's outputs under the first one's id and sha256."""
    torch.manual_seed(0)
    save(build("sr", preset="tiny", scale=2), str(tmp_path / "model"))
    torch.manual_seed(1)
    save(build("sr", preset="tiny", scale=2), str(tmp_path / "other"))
    shutil.copytree(tmp_path / "model", tmp_path / "original")
    if change == "contract edited":                     # the same weights, run in tiles of 32 px from now on
        shutil.rmtree(tmp_path / "other")
        shutil.copytree(tmp_path / "model", tmp_path / "other")
        meta = json.loads((tmp_path / "other" / "config.json").read_text())
        meta["contract"]["tile"] = 32
        (tmp_path / "other" / "config.json").write_text(json.dumps(meta))
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {n: png(photo(10, 12, seed=i)) for i, n in enumerate(NAMES)})
    env = {**os.environ, "OTHER_MODEL": "" if change == "removed" else str(tmp_path / "other"),
           "ORIGINAL_MODEL": str(tmp_path / "original") if change == "another copy on a node" else ""}
    r = subprocess.run([sys.executable, "-c", SWAP, "translate", str(src), str(dst), "--model", str(tmp_path / "model"),
                        "--pipeline", pipeline], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in own(r.stderr), r.stderr[-3000:]     # Ray's traceback of the actor goes to its log
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("imgxlate translate: error: "), r.stderr[-3000:]
    if change == "replaced":
        assert "changed after this run started" in last and "the run's rows record" in last, last
    elif change == "contract edited":
        assert "its inference contract (config.json) now says tile None -> 32" in last, last
    elif change == "another copy on a node":
        assert "another copy on its node" in last and f"on node {socket.gethostname()}" in last, last
    else:
        assert "no config.json" in last, last
    assert not list(dst.rglob("*.png"))                 # no output of the other model, under any name
    # The model the run started with, put back: a rerun does the run's inputs with it.
    shutil.rmtree(tmp_path / "model", ignore_errors=True)
    shutil.copytree(tmp_path / "original", tmp_path / "model")
    assert translate(src, dst, "--model", str(tmp_path / "model")) == 0
    rows = rows_of(dst)
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == len(NAMES)
    assert {r["model_id"] for r in rows} == {json.loads((tmp_path / "model" / "config.json").read_text())["model_id"]}
