"""The sharded plan: cuts never split rivals for an output key, the S3 listing pages key ranges in parallel and
yields them in key order, processing starts before the listing ends, and a rerun resumes by shard markers."""

import hashlib
import io
import json
import os
import posixpath
import random
import threading

import boto3
import pytest
from PIL import Image

from imgxlate.cli import main
from imgxlate.infer import plan
from imgxlate.io import listing, manifest
from imgxlate.io.keys import output_keys

from conftest import photo
from fixtures import wait_for


def _png(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _names_after_cuts(keys: list[str], size: int) -> list[str]:
    """Every input's output key when ``keys`` (in listing order) are cut into shards, as the planner does."""
    items = [listing.Item(f"/src/{k}", k) for k in keys]
    names, seen = [], []
    for shard, kind in plan.cut(items, size):
        seen += [it.key for it in shard]
        outs = output_keys([it.key for it in shard], ".png", "", [it.source_uri for it in shard],
                           min_level=[3] * len(shard) if kind == "hashed" else None)
        names += [o for o in outs if isinstance(o, str)]
    assert sorted(seen) == sorted(keys)                          # every input in exactly one shard
    return names


def test_cuts_never_split_rivals_for_an_output_key():
    rng = random.Random(14)
    crafted = f"a.png-{hashlib.sha256(b'/src/a.png').hexdigest()[:10]}.png"   # a.png's hashed name, as an input
    parts = ["a", "a.png", "a.jpg", "a.jpg.png", "a.PNG", "a.b", ".", "", "_manifest", "_manifest_", "b c.png",
             "ü.png", "a\\b.png", "a-0123456789.png", "a.png.png", "z.png", "0.jpg", "a.tar", crafted, ".png",
             "..png", ".png.png", "v1.0.png", "v1.1", "a.jpg.jpg"]
    for trial in range(600):
        keys = {"/".join(rng.choice(parts) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 40))}
        keys = [k for k in keys if k.lower().endswith((".png", ".jpg"))]
        for order in (sorted(keys, key=lambda k: k.encode()),              # S3: UTF-8 byte order
                      sorted(keys, key=lambda k: k.split("/"))):           # a local walk, folder by folder
            names = _names_after_cuts(order, rng.choice([1, 2, 3]))
            assert len(set(names)) == len(names), (trial, order)
    assert len(set(_names_after_cuts(["a.jpg", "a.png", crafted], 1))) == 3
    # Rivals are kept together whatever the cut points; held back when a cut falls inside their prefix range.
    keys = ["a.jpg", "a.jpg.png", "a.jpg/x.png", "a.png", "b.png"] + [f"c/{i:03d}.png" for i in range(300)]
    shards = [[it.key for it in s] for s, _ in plan.cut([listing.Item(k, k) for k in keys], 4)]
    assert next(s for s in shards if "a.jpg" in s)[:3] == ["a.jpg", "a.jpg.png", "a.png"] or \
        {"a.jpg", "a.jpg.png", "a.png"} <= set(next(s for s in shards if "a.jpg" in s))
    assert max(map(len, shards)) <= 16 and sum(map(len, shards)) == len(keys)
    # A folder "v1.1/" under a file "v1.0.png" does not keep a group open: shards stay bounded.
    keys = ["v1.0.png"] + [f"v1.{d}/{i:04d}.png" for d in range(1, 4) for i in range(2000)]
    assert max(len(s) for s, _ in plan.cut([listing.Item(k, k) for k in keys], 100)) <= 400


def test_s3_listing_pages_key_ranges_in_parallel_and_yields_key_order(bucket, s3_server, monkeypatch):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = [" lead.png", "!.png", "0.png", "00.png", "A/b.png", "Z.png", "a.png", "a/b.png", "a.b/c.png", "é.png",
             "日本.png", "~t.png", "~é.png", "z.txt", "out/x.png"] + [f"many/{i:03d}.png" for i in range(23)]
    for k in names:
        s3.put_object(Bucket=bucket, Key=f"in/{k}", Body=b"x")
    s3.put_object(Bucket=bucket, Key="other.png", Body=b"x")                # outside the prefix
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setattr(listing, "S3_PAGE", 4)                             # many pages per range
    got = [it.key for it in listing.iter_inputs(f"s3://{bucket}/in", exclude=f"s3://{bucket}/in/out")]
    want = sorted((k for k in names if k.endswith(".png") and not k.startswith("out/")), key=lambda k: k.encode())
    assert got == want
    assert sorted(got) == sorted(it.key for it in listing.list_inputs(f"s3://{bucket}/in", exclude=f"s3://{bucket}/in/out"))
    with pytest.raises(listing.SourceError):
        list(listing.iter_inputs(f"s3://{bucket}/missing"))


def test_the_plan_hands_out_shards_before_the_listing_ends(tmp_path, monkeypatch):
    release = threading.Event()

    def slow_listing(src, extensions, exclude=None):
        for i in range(12):
            if i == 8:
                release.wait(30)                     # the rest of the listing is still to come
            yield listing.Item(f"{src}/{i:02d}.png", f"{i:02d}.png", 10)

    monkeypatch.setattr(listing, "iter_inputs", slow_listing)
    p = plan.Planner(str(tmp_path / "src"), str(tmp_path / "dst"), listing.IMAGE_EXTS, None, "png", "", "r1",
                     "recipe", shard_size=3)
    first = p.take(1)
    assert first and first[0].todo >= 1 and not p.listing_done and p.listed < 12
    release.set()
    rest = []
    while (got := p.take(100)) is not None:
        rest += got
    assert sum(s.n for s in first + rest) == 12 and p.listing_done and p.listed == 12


class WatchedRoom:
    """Stands in for a Planner's ``room`` (the semaphore its listing thread takes before it reads a shard's
    inputs), to see the listing wait: ``waiting`` is true from when the thread asks for room and finds none
    until it gets some. That is the point past which it would have read on, were it not waiting for a take."""

    def __init__(self, room):
        self.room, self.waiting = room, False

    def acquire(self, blocking=True, timeout=None):
        got = self.room.acquire(blocking=False)
        if not got:
            self.waiting = True
            got = self.room.acquire(blocking, timeout)
        if got:
            self.waiting = False
        return got

    def release(self, n=1):
        self.room.release(n)


def watch_room(p: plan.Planner) -> WatchedRoom:
    p.room = watched = WatchedRoom(p.room)     # the thread looks its room up on each try
    return watched


def test_the_plan_reads_no_further_than_its_ready_shard(tmp_path, monkeypatch):
    """The driver holds the ready shard and the one being cut, not the listing: the listing waits for a take."""
    monkeypatch.setattr(listing, "iter_inputs", lambda src, extensions, exclude=None: (
        listing.Item(f"{src}/{i:02d}.png", f"{i:02d}.png", 10) for i in range(40)))
    p = plan.Planner(str(tmp_path / "src"), str(tmp_path / "dst"), listing.IMAGE_EXTS, None, "png", "", "r1",
                     "recipe", shard_size=3, ready=1)
    room = watch_room(p)
    taken = []
    for _ in range(3):
        wait_for(lambda: p.queue.qsize() and room.waiting, "the listing to wait for a take", 30)
        assert p.queue.qsize() == 1
        # beyond what was taken: the ready shard and what the cut read ahead, each at most 2 x 3 + 1
        assert p.listed - sum(s.n for s in taken) <= 14
        taken += p.take(1)
    while (got := p.take(100)) is not None:
        taken += got
    assert p.listed == 40 and sum(s.n for s in taken) == 40


def test_a_resume_walks_past_done_shards_while_the_ready_slot_is_full(tmp_path, monkeypatch):
    """Shards complete from an earlier run hold no inputs: they wait apart (up to DONE_READY), so a resume's
    walk past done work does not go one shard per take while the Feeder is full."""
    monkeypatch.setattr(listing, "iter_inputs", lambda src, extensions, exclude=None: (
        listing.Item(f"{src}/{i:02d}.png", f"{i:02d}.png", 10) for i in range(60)))
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")

    def planner(ready):
        return plan.Planner(src, dst, listing.IMAGE_EXTS, None, "png", "", "r1", "recipe", shard_size=3,
                            ready=ready)

    first, shards = planner(3), []
    while (got := first.take(100)) is not None:
        shards += got
    assert len(shards) > 10
    for sh in shards[:8]:                        # an earlier run finished the first 8 shards
        manifest.write_shard_marker(dst, manifest.ShardMarker(shard=sh.id, n=sh.n, complete=True, recipe="recipe",
                                                              run_id="r0", counts={"ok": sh.n}, parts=[]))
    p = planner(1)
    room = watch_room(p)
    wait_for(lambda: room.waiting, "the listing to wait for the ready slot", 30)
    assert p.queue.qsize() == 9                  # 8 done shards and the one ready shard, none taken yet
    got = p.take(1)
    assert p.listed <= sum(s.n for s in got) + 2 * 3 + 1     # and the listing waits for the ready slot
    assert [s.todo for s in got] == [0] * 8 + [got[8].n] and [s.skipped for s in got[:8]] == [s.n for s in shards[:8]]
    rest = []
    while (more := p.take(100)) is not None:
        rest += more
    assert [s.id for s in got + rest] == [s.id for s in shards] and p.listed == 60


def test_ray_data_per_block_stats_stay_bounded(ray_local):
    """Ray Data keeps a stats record per output block for a dataset's life (ray-project/ray#66016); the job's
    execution callback trims them. This also fails if a Ray upgrade moves the fields it trims."""
    import ray.data

    from imgxlate.infer import raydata

    seen = []

    class Probe(raydata.bounded_block_stats()):
        KEEP = 5

        def on_execution_step(self, executor):
            before = [len(op._output_blocks_stats) for op in executor._topology if hasattr(op, "_output_blocks_stats")]
            super().on_execution_step(executor)
            after = [len(op._output_blocks_stats) for op in executor._topology if hasattr(op, "_output_blocks_stats")]
            seen.append((before, after))

    ctx = ray.data.DataContext.get_current()
    saved = ctx.custom_execution_callback_classes
    ctx.custom_execution_callback_classes = [*saved, Probe]
    try:
        ds = ray.data.range(400, override_num_blocks=200).map_batches(lambda b: b)
        rows = sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None))
    finally:
        ctx.custom_execution_callback_classes = saved
    assert rows == 400 and seen and all(after for _, after in seen)       # the map operator has the field
    assert max(max(b) for b, _ in seen) > 2 * Probe.KEEP       # Ray still appends to it (200 blocks went through)
    assert max(max(a) for _, a in seen) <= 2 * Probe.KEEP      # and after each step, 10 at most were kept
    assert ctx.custom_execution_callback_classes == saved


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="the knobs are glibc's")
def test_the_driver_heap_hands_mid_sized_blocks_back_when_freed():
    """heap.steady() fixes glibc's mmap threshold at 64 KB: a 100 KB block the heap has no room for is mapped on
    its own and unmapped when freed (glibc's default, once a 1 MB block was freed, grows the heap for it, where
    such blocks fragment), heap.trim() trims at most once per every_s, and heap.compute() undoes the threshold for
    a run in this process."""
    import subprocess
    import sys

    script = """
import ctypes
from imgxlate.infer import heap

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
libc.malloc.argtypes = [ctypes.c_size_t]
big = libc.malloc(1 << 20)            # freeing an mmapped 1 MB block raises glibc's dynamic threshold to 1 MB
libc.free(big)

def grow():                           # a 100 KB block once the heap has no free room (as after a trim)
    libc.malloc_trim(0)
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(100 << 10)
    mapped = libc.mallinfo2().hblkhd - before
    libc.free(p)
    return mapped, libc.mallinfo2().hblkhd == before

print("default", *grow())
print("steady", heap.steady())
for _ in range(3):
    print("mapped", *grow())
print("trim", heap.trim(every_s=0.0), heap.trim(every_s=3600.0))
heap.compute()                        # a run in this process: the model's tensors come from the heap again
print("compute", *grow())
"""
    # in a fresh process: no other thread allocates between two readings
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=env).stdout.split("\n")                 # glibc's defaults, whatever the caller set
    assert out[0] == "default 0 True"                           # glibc grew the heap for it
    assert out[1] == "steady True"
    assert all(line.startswith("mapped ") and int(line.split()[1]) >= 100 << 10 and line.endswith(" True")
               for line in out[2:5]), out                      # its own mapping, handed back when freed
    assert out[5] == "trim True False"                          # trims at most once per every_s
    assert out[6] == "compute 0 True"           # (with 64 KB mmapped, an in-process model call ran 1.3-1.6x slower)



def test_an_untouched_dst_left_without_files_is_removed_and_one_with_outputs_is_not_listed(tmp_path, monkeypatch):
    from imgxlate.io import storage

    empty = tmp_path / "empty"
    (empty / "_manifest" / "run" / "probe").mkdir(parents=True)
    (empty / "a" / "b").mkdir(parents=True)
    storage.remove_empty_tree(str(empty))
    assert not empty.exists()
    flat = tmp_path / "flat"                    # a flat DST: outputs next to the run's own folders
    (flat / "_manifest" / "run").mkdir(parents=True)
    for i in range(50):
        (flat / f"{i:03d}.png").write_bytes(b"x")
    read = []                                   # entries read from each folder
    real = os.scandir

    class Counting:
        def __init__(self, path):
            self.it, self.n = real(path), len(read)
            read.append(0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __iter__(self):
            return self

        def __next__(self):
            e = next(self.it)
            read[self.n] += 1
            return e

    monkeypatch.setattr(os, "scandir", Counting)
    storage.remove_empty_tree(str(flat))
    assert (flat / "_manifest" / "run").is_dir() and len(list(flat.iterdir())) == 51
    assert read and sum(read) <= 3              # stopped at the first file: DST's 51 names never read at once
    storage.remove_empty_tree(str(tmp_path / "never"))        # no DST: nothing to do

def translate(src, dst, *args):
    return main(["translate", str(src), str(dst), "--model", "bicubic", "--scale", "2", *map(str, args)])


def test_rerun_resumes_by_shard_markers_and_reads_only_unfinished_shards(tmp_path, ray_local, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    names = [f"{d}/{i:02d}.png" for d in ("a", "b", "c") for i in range(7)] + ["top.png", "z.png"]
    for i, k in enumerate(names):
        (src / k).parent.mkdir(parents=True, exist_ok=True)
        (src / k).write_bytes(_png(photo(12, 10, seed=i)))
    good = (src / "b/03.png").read_bytes()
    (src / "b/03.png").write_bytes(good[:30])                       # truncated: decode_error
    assert translate(src, dst, "--shard-size", 5, "--run-id", "r1") == 0
    markers = [json.loads(p.read_text()) for p in (dst / "_manifest/_shards").glob("*.json")]
    assert len(markers) >= 3 and sum(m["n"] for m in markers) == len(names) and all(m["complete"] for m in markers)
    # A shard's rows are in one part or several (the book also writes a part every ShardBook.every_s while the
    # shard is open, so a slow run writes -000, -001, ...): its marker names them all, and together they hold
    # each of its inputs exactly once.
    parts = sorted(p.name for p in (dst / "_manifest/r1").glob("part-*.parquet"))
    assert parts == sorted(posixpath.basename(p) for m in markers for p in m["parts"])
    for m in markers:
        assert m["parts"] and all(p.startswith(f"r1/part-{m['shard']}-") for p in m["parts"])
        table, missing = manifest.read_parts(str(dst), m["parts"], ["key", "shard"])
        keys = table.column("key").to_pylist()
        assert not missing and len(keys) == len(set(keys)) == m["n"] and set(table.column("shard").to_pylist()) \
            == {m["shard"]}
    rows = manifest.read_run(str(dst), "r1").to_pylist()
    assert len(rows) == len(names) and {r["shard"] for r in rows} == {m["shard"] for m in markers}
    failing = [m for m in markers if "decode_error" in m["counts"]]
    assert len(failing) == 1 and failing[0]["counts"] == {"decode_error": 1, "ok": failing[0]["n"] - 1}

    (src / "b/03.png").write_bytes(good)                            # fixed at the source
    read = []
    real = manifest.read_parts
    monkeypatch.setattr(manifest, "read_parts", lambda dst, names, cols: read.append(list(names)) or
                        real(dst, names, cols))
    assert translate(src, dst, "--shard-size", 5, "--run-id", "r2") == 0
    assert read == [failing[0]["parts"]]                            # complete, all-done shards: not read at all
    rows = manifest.read_run(str(dst), "r2").to_pylist()
    assert [(r["key"], r["status"], r["attempt"]) for r in rows] == [("b/03.png", "ok", 2)]
    summary = json.loads((dst / "_manifest/r2/summary.json").read_text())
    assert summary["counts"] == {"ok": 1, "skipped_done": len(names) - 1} and summary["shards"] == len(markers)
    marker = json.loads((dst / f"_manifest/_shards/{failing[0]['shard']}.json").read_text())
    assert marker["complete"] and marker["counts"] == {"ok": marker["n"]}
    assert marker["parts"][:-1] == failing[0]["parts"] and marker["parts"][-1].startswith("r2/")  # r1's, and one

    read.clear()
    assert translate(src, dst, "--shard-size", 5, "--run-id", "r3") == 0
    assert read == [] and json.loads((dst / "_manifest/r3/summary.json").read_text())["counts"] == \
        {"skipped_done": len(names)}
    assert sorted(os.listdir(dst / "b")) == [f"{i:02d}.png" for i in range(7)]


def test_manifest_sources_stream_in_key_order_with_the_same_keys_as_before(tmp_path):
    cases = {"sorted.txt": "s3://b/x/a.png\ns3://b/x/a.png\ns3://b/x/b/c.png\n# note\ns3://b/x/d.txt\n",
             "unsorted.txt": "s3://b/x/z.png\ns3://b/x/a.png\nhttps://h/p/q.png?X-Amz-Signature=s\n",
             "one.txt": "s3://b/x/a.png\n", "two-buckets.txt": "s3://b1/x/a.png\ns3://b2/y/a.png\n",
             "header.csv": "id,uri\n1,s3://b/x/z.png\n2,s3://b/x/a.png\n", "bare.csv": "s3://b/x/z.png\ns3://b/x/a.png\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        streamed = [(it.source_uri, it.key) for it in listing.iter_inputs(str(tmp_path / name))]
        whole = sorted(((it.source_uri, it.key) for it in listing._find(str(tmp_path / name), listing.IMAGE_EXTS,
                                                                         None)), key=lambda t: t[1])   # read whole
        assert streamed == whole and [k for _, k in streamed] == sorted(k for _, k in streamed), name
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n": [1, 2, 3], "source_uri": ["/d/a.png", "/d/b.png", "/d/c/x.jpg"]}),
                   tmp_path / "m.parquet", row_group_size=1)
    assert [it.key for it in listing.iter_inputs(str(tmp_path / "m.parquet"))] == ["a.png", "b.png", "c/x.jpg"]


def test_resume_follows_outputs_not_just_sources(tmp_path, ray_local, monkeypatch):
    src = tmp_path / "src"
    for i in range(30):
        (src / "sub").mkdir(parents=True, exist_ok=True)
        (src / "sub" / f"{i + 1:03d}.png").write_bytes(_png(photo(8, 6, seed=i)))

    def counts(run_id, dst):
        return json.loads((dst / "_manifest" / run_id / "summary.json").read_text())["counts"]

    # Adding one input redoes its shard only (cut points are content-defined), not every later shard.
    dst = tmp_path / "dst"
    assert translate(src, dst, "--shard-size", 5, "--run-id", "a") == 0
    (src / "sub" / "000.png").write_bytes(_png(photo(8, 6, seed=99)))
    assert translate(src, dst, "--shard-size", 5, "--run-id", "b") == 0
    assert 1 <= counts("b", dst)["ok"] <= 20 and sum(counts("b", dst).values()) == 31
    # The same sources under another SRC have other output keys: done again, at the new keys.
    assert translate(src / "sub", dst, "--shard-size", 5, "--run-id", "c") == 0
    assert counts("c", dst) == {"ok": 31} and (dst / "000.png").exists() and (dst / "sub" / "000.png").exists()
    # A relative DST, then the same folder given absolute: markers name parts relative to _manifest.
    monkeypatch.chdir(tmp_path)
    assert translate(src, "dst", "--shard-size", 5, "--run-id", "d") == 0
    assert counts("d", dst) == {"skipped_done": 31}
    # x2, then x3 over it, then x2 again: every output holds x3 pixels, so x2 is done again.
    assert translate(src, dst, "--shard-size", 5, "--run-id", "e", "--scale", 3) == 0
    assert counts("e", dst) == {"ok": 31} and Image.open(dst / "sub" / "001.png").size == (18, 24)
    assert translate(src, dst, "--shard-size", 5, "--run-id", "f") == 0
    assert counts("f", dst) == {"ok": 31} and Image.open(dst / "sub" / "001.png").size == (12, 16)


def test_inputs_of_a_dropped_batch_get_model_error_rows(tmp_path, ray_local):
    from imgxlate.infer.book import ShardBook, lost_rows

    items = [listing.Item(str(tmp_path / f"{i}.png"), f"{i}.png", 10) for i in range(7)]
    p = plan.Planner.__new__(plan.Planner)            # just its shard builder: no listing thread
    p.dst, p.ext, p.suffix, p.run_id, p.recipe, p.exts = str(tmp_path / "dst"), ".png", "", "r1", "R", (".png",)
    shard = p._shard(items, "plain", set())
    book = ShardBook(str(tmp_path / "dst"), "r1", "R", every_rows=2)
    book.add_shard(shard)
    rows = [r for b in shard.tables() for r in b.to_pylist()][:3]
    assert len(shard.blocks) == 7                                # 7 small inputs: a block each (MIN_BLOCKS)
    for r in rows:
        r["status"] = "ok"
    book.add(manifest.to_table(rows[:2]))                        # 3 of 7 came back: 2 written to a part,
    book.add(manifest.to_table(rows[2:3]))                       # 1 still buffered
    lost = book.dropped(shard.id)
    assert sorted(r["key"] for r in lost) == ["3.png", "4.png", "5.png", "6.png"]
    book.add(lost_rows({"model_id": "m", "sha256": "", "task": "sr"}, lost, max_model_retries=3))
    assert shard.id not in book.open and +book.counts == {"ok": 3, "model_error": 4}
    marker = json.loads((tmp_path / f"dst/_manifest/_shards/{shard.id}.json").read_text())
    assert marker["complete"] and marker["counts"] == {"model_error": 4, "ok": 3}
    assert sorted(r["status"] for r in manifest.read_run(str(tmp_path / "dst"), "r1").to_pylist()) == \
        ["model_error"] * 4 + ["ok"] * 3


def test_inputs_of_lost_blocks_are_retried_one_at_a_time(tmp_path, ray_local):
    """A block lost in the pipeline (its actor died every retry, or its reader died) is not failed whole: its
    inputs go through the pipeline once more, one a block, after the run; only what is lost again fails."""
    import time
    import types

    from imgxlate.infer import job
    from imgxlate.infer.book import ShardBook
    from imgxlate.infer.run import Progress, Run, SignalDrain

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.png").write_bytes(_png(photo(20 + i, 16)))
    items = [listing.Item(str(src / f"{i}.png"), f"{i}.png", 10) for i in range(6)]
    dst = str(tmp_path / "dst")
    p = plan.Planner.__new__(plan.Planner)            # just its shard builder: no listing thread
    p.dst, p.ext, p.suffix, p.run_id, p.recipe, p.exts = dst, ".png", "", "r1", "R", (".png",)
    shard = p._shard(items, "plain", set())
    blocks = list(shard.tables())
    book = ShardBook(dst, "r1", "R", every_rows=100)
    book.add_shard(shard)
    done = [r for b in blocks[:2] for r in b.to_pylist()]       # 2 came back; the other 4 were lost
    for r in done:
        r["status"] = "ok"
    book.add(manifest.to_table(done))
    cfg = job.TranslateConfig(str(src), dst, "bicubic", scale=2)
    meta = job.model_info(cfg)
    listed = types.SimpleNamespace(listed=6, listing_done=True)        # the plan, as the progress line reads it
    run = Run(cfg, meta, "r1", time.time(), types.SimpleNamespace(lost=False), plan=listed, book=book,
              progress=Progress(listed, 5.0), drain=SignalDrain(lambda: None))
    job.retry_lost(run, stop=None)
    assert shard.id not in book.open and +book.counts == {"ok": 6}
    assert sorted(os.listdir(dst)) == ["2.png", "3.png", "4.png", "5.png", "_manifest"]     # (0 and 1: pretend)
    rows = manifest.read_run(dst, "r1").to_pylist()
    assert sorted(r["key"] for r in rows) == [f"{i}.png" for i in range(6)]
