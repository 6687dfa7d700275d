"""The DST lease: one run at a time, on a local folder and on the S3 test server (conditional writes); a store
that does not enforce conditional writes is refused, and --lease off runs without a lease, saying so."""

import json
import os
import threading
import time

import boto3
import pytest

from imgxlate.io import storage
from imgxlate.io.lease import Lease, LeaseHeld, LeaseUnsafe

from conftest import photo
from faultproxy import FaultProxy
from fixtures import png, summary_of, translate, wait_for, write_tree

NOT_IMPLEMENTED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
                   b"<Message>A header you provided implies functionality that is not implemented</Message></Error>")


@pytest.fixture(params=["local", "s3"])
def dst(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "dst")
    return f"s3://{request.getfixturevalue('bucket')}/out"


def test_a_second_run_is_refused_naming_the_holder_until_the_first_releases(dst):
    first = Lease(dst, "run-one").acquire()
    with pytest.raises(LeaseHeld, match="run run-one"):
        Lease(dst, "run-two").acquire()
    first.release()
    with Lease(dst, "run-two") as second:
        assert not second.lost
    holder, _ = Lease(dst, "probe")._read()
    assert holder is None or holder["expires"] == 0            # released: gone, or a tombstone anyone may take


def test_an_empty_or_garbled_lease_does_not_lock_dst_forever(dst):
    storage.write_bytes(storage.join(dst, "_manifest", "LEASE"), b"")       # a writer killed mid-write
    with Lease(dst, "next") as lease:
        assert json.loads(storage.read_bytes(lease.uri))["run_id"] == "next"


def test_a_killed_runs_lease_expires_and_is_taken_over(dst):
    dead = Lease(dst, "killed", ttl_s=0.5).acquire()
    dead._stop.set()                           # its heartbeat stops, as when the process is killed
    dead._thread.join()                        # (a renewal it had begun is written)
    expires = json.loads(storage.read_bytes(dead.uri))["expires"]
    wait_for(lambda: time.time() > expires, "the lease's expiry", 30)
    with Lease(dst, "next") as lease:
        holder = json.loads(storage.read_bytes(lease.uri))
        assert holder["run_id"] == "next"
    dead.release()                             # the old holder's release does not remove the new lease


def test_a_waiting_run_starts_when_the_holder_finishes(dst):
    first = Lease(dst, "first").acquire()
    released = []                              # when the holder began to release

    def finish():
        released.append(time.time())
        first.release()
    threading.Timer(0.5, finish).start()
    with Lease(dst, "second", wait_s=10, poll_s=0.1):
        assert released and time.time() - released[0] < 5     # not before the release, and soon after it


def test_the_heartbeat_keeps_a_long_run_alive_and_notices_a_takeover(dst):
    lease = Lease(dst, "long", ttl_s=2.0).acquire()     # heartbeat every 0.5 s
    expires = json.loads(storage.read_bytes(lease.uri))["expires"]
    wait_for(lambda: time.time() > expires, "the first ttl to pass", 30)   # only the heartbeat holds it now
    with pytest.raises(LeaseHeld):
        Lease(dst, "other").acquire()
    storage.write_bytes(lease.uri, json.dumps({"run_id": "thief", "token": "x", "heartbeat": time.time(),
                                               "expires": time.time() + 60}).encode())
    wait_for(lambda: lease.lost, "the heartbeat to notice the takeover", 30, every_s=0.1)
    lease.release()
    assert json.loads(storage.read_bytes(lease.uri))["run_id"] == "thief"


def test_a_renewal_never_overwrites_a_lease_another_run_took_meanwhile(dst, monkeypatch):
    lease = Lease(dst, "slow", ttl_s=600).acquire()            # its heartbeat waits 150 s: this renewal is the test's
    body, taken = lease._body, []
    thief = json.dumps({"run_id": "thief", "token": "x", "heartbeat": time.time(), "expires": time.time() + 60})

    def body_while_taken():                                     # while the renewal is under way, another run takes it
        if not taken:
            taken.append(storage.write_bytes(lease.uri, thief.encode()))
        return body()
    monkeypatch.setattr(lease, "_body", body_while_taken)
    assert lease._renew() is False                              # lost, and the other run's lease is left as it was
    assert json.loads(storage.read_bytes(lease.uri))["run_id"] == "thief"
    lease.release()


def test_a_lease_of_a_killed_process_on_this_machine_is_taken_over_at_once(dst):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage.write_bytes(storage.join(dst, "_manifest", "LEASE"), json.dumps(
        {"run_id": "killed", "host": socket.gethostname(), "pid": int(dead.stdout), "token": "t",
         "heartbeat": time.time(), "expires": time.time() + 600}).encode())
    with Lease(dst, "rerun") as lease:                          # no 10-minute wait
        assert json.loads(storage.read_bytes(lease.uri))["run_id"] == "rerun"


def test_a_holder_in_another_container_or_machine_of_this_host_name_is_waited_out_one_from_before_a_reboot_not():
    import subprocess
    import sys

    from imgxlate.io.lease import _boot_time, _dead_here, _identity

    me = _identity()
    if not (me.get("pid_ns") and me.get("boot_id")):          # Linux: what tells this machine's processes apart
        pytest.skip("no /proc: a lease is judged by host and pid only")
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    assert _dead_here({**me, "pid": gone})                     # this container, its process gone: dead
    assert not _dead_here({**me, "pid": os.getpid()})          # alive
    # Containers sharing the host's network share its name, not its processes: a pid there says nothing here.
    assert not _dead_here({**me, "pid": gone, "pid_ns": me["pid_ns"] + 1})
    # Another boot id: a heartbeat from before this machine booted is a reboot's; a fresh one is another machine
    # of the same host name (a fixed container host name on two machines), alive as far as anyone here can tell.
    booted = _boot_time()
    assert _dead_here({**me, "pid": os.getpid(), "boot_id": "an earlier boot", "heartbeat": booted - 3600})
    assert not _dead_here({**me, "pid": os.getpid(), "boot_id": "another machine", "heartbeat": time.time()})
    assert _dead_here({"host": me["host"], "pid": gone})       # a lease written before these were recorded


def test_a_renewal_that_cannot_be_written_keeps_the_lease(tmp_path):
    lease = Lease(str(tmp_path / "dst"), "run-one", ttl_s=600).acquire()
    try:
        os.mkdir(f"{lease.uri}.new-{lease.token}")                 # the new lease cannot be written (as a full disk)
        with pytest.raises(OSError):
            lease._renew()
        assert json.loads(storage.read_bytes(lease.uri))["token"] == lease.token      # still held, not deleted
        with pytest.raises(LeaseHeld):
            Lease(str(tmp_path / "dst"), "run-two").acquire()
        os.rmdir(f"{lease.uri}.new-{lease.token}")
        assert lease._renew()
    finally:
        lease.release()
    assert not lease.lost and not os.path.exists(lease.uri)


def test_a_new_lease_left_by_a_writer_killed_mid_change_is_removed_by_the_next_change(tmp_path):
    folder = tmp_path / "dst" / "_manifest"
    folder.mkdir(parents=True)
    stale, young = folder / "LEASE.new-0123abcd", folder / "LEASE.new-4567cdef"
    stale.write_bytes(b'{"token": "0123ab')                 # SIGKILL between write and rename, 10 minutes ago
    os.utime(stale, (time.time() - 600, time.time() - 600))
    young.write_bytes(b'{"token": "4567cd')                 # maybe being written where flock is not shared: left
    lease = Lease(f"file://{tmp_path}/dst", "run-one").acquire()          # a file:// DST: the same folder
    try:
        assert os.path.dirname(lease.uri) == str(folder)
        assert sorted(os.listdir(folder)) == ["LEASE", "LEASE.lock", young.name]
    finally:
        lease.release()
    assert not os.path.exists(folder / "LEASE")


def test_a_file_uri_dst_is_leased_in_dst_and_an_empty_run_leaves_none_of_it(tmp_path, monkeypatch):
    """Before, a file:// DST's lease went to ./file:/... under the current folder, where it kept no run out."""
    monkeypatch.chdir(tmp_path)
    write_tree(tmp_path / "src", {"a.png": png(photo(8, 8))})
    (tmp_path / "empty").mkdir()
    held = Lease(f"file://{tmp_path}/dst", "another-run", ttl_s=600).acquire()
    try:
        assert translate(f"file://{tmp_path}/src", f"file://{tmp_path}/dst", "--scale", "2") == 2   # DST in use
    finally:
        held.release()
    assert translate(f"file://{tmp_path}/src", f"file://{tmp_path}/dst", "--scale", "2") == 0
    assert (tmp_path / "dst" / "a.png").exists() and not (tmp_path / "file:").exists()
    assert translate(f"file://{tmp_path}/empty", f"file://{tmp_path}/none", "--scale", "2") == 0
    assert not (tmp_path / "none").exists() and not (tmp_path / "file:").exists()


def test_a_lease_taken_over_since_its_last_heartbeat_is_reported_lost_and_left_to_its_new_holder(dst):
    lease = Lease(dst, "run-one", ttl_s=600).acquire()
    thief = {"run_id": "thief", "host": "elsewhere", "pid": 1, "token": "theirs", "heartbeat": time.time(),
             "expires": time.time() + 600}
    storage.write_bytes(lease.uri, json.dumps(thief).encode())     # taken over between two heartbeats
    lease.release()
    assert lease.lost
    assert json.loads(storage.read_bytes(lease.uri))["token"] == "theirs"


def test_the_lease_says_what_kind_it_is_and_leaves_no_probe(dst):
    with Lease(dst, "run-one") as lease:
        assert lease.kind == ("s3-conditional" if dst.startswith("s3://") else "local-link")
        _, root = storage.filesystem(storage.join(dst, "_manifest"))
        fs, _ = storage.filesystem(dst)
        local = ["LEASE.lock"] if lease.kind == "local-link" else []           # the local lease's flock file
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root)) == ["LEASE", *local]   # the store's probe is gone


def _keys(s3_server, bucket, prefix="out/") -> list[str]:
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


@pytest.mark.parametrize("store, answered", [
    ({"strip_headers": ("If-None-Match", "If-Match")}, "a second PUT of s3://{bucket}/out/_manifest/.lease-probe-r1-"),
    ({"answer": lambda method, path, headers: (501, NOT_IMPLEMENTED) if method == "PUT" and "If-None-Match" in headers
      else None}, "answered 501 NotImplemented"),
], ids=["ignores-conditional-headers", "answers-501"])
def test_a_store_that_does_not_enforce_conditional_writes_is_refused_before_any_output(
        store, answered, tmp_path, bucket, s3_server, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)           # restored after the run points it at the proxy
    write_tree(tmp_path / "src", {f"{i}.png": png(photo(12, 16, seed=i)) for i in range(2)})
    with FaultProxy(s3_server, **store) as proxy:
        assert translate(tmp_path / "src", f"s3://{bucket}/out", "--scale", 2, "--s3-endpoint", proxy.url,
                         "--run-id", "r1") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "conditional writes" in line]
    assert len(lines) == 1 and answered.format(bucket=bucket) in lines[0], lines
    assert "--lease off" in lines[0] and lines[0].startswith("imgxlate translate: error: ")
    if "strip_headers" in store:
        assert "answered 200 (the write was made)" in lines[0]
    assert _keys(s3_server, bucket) == []                       # no output, no lease, no probe left


def test_a_store_that_ignores_only_if_match_is_refused(bucket, s3_server, monkeypatch):
    with FaultProxy(s3_server, strip_headers=("If-Match",)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(LeaseUnsafe, match=r"a PUT of \S+ with If-Match on a wrong ETag was answered 200"):
            Lease(f"s3://{bucket}/out", "r1").acquire()
    assert _keys(s3_server, bucket) == []                       # the probe is deleted, no lease was taken


def test_lease_off_runs_on_such_a_store_and_the_summary_says_so(tmp_path, bucket, s3_server, ray_local, monkeypatch,
                                                                capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    write_tree(tmp_path / "src", {f"{i}.png": png(photo(12, 16, seed=i)) for i in range(2)})
    dst = f"s3://{bucket}/out"
    with FaultProxy(s3_server, strip_headers=("If-None-Match", "If-Match")) as proxy:
        assert translate(tmp_path / "src", dst, "--scale", 2, "--s3-endpoint", proxy.url, "--run-id", "off",
                         "--lease", "off") == 0
    assert "--lease off: no lease on DST; two runs on this DST would both write it" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert summary_of(dst, "off")["lease"] == "off (unchecked: at the user's risk)"
    assert {"out/0.png", "out/1.png"} <= set(_keys(s3_server, bucket))
    assert not any(k.startswith("out/_manifest/LEASE") for k in _keys(s3_server, bucket))
    # The same DST on a store that enforces conditional writes: the probe passes, the lease is taken and said.
    assert translate(tmp_path / "src", dst, "--scale", 2, "--s3-endpoint", s3_server, "--run-id", "on") == 0
    assert summary_of(dst, "on")["lease"] == "s3-conditional"
    assert not any(".lease-probe-" in k for k in _keys(s3_server, bucket))


def test_no_run_can_take_a_local_lease_while_its_holder_renews_it(tmp_path, monkeypatch):
    # A local renewal replaces LEASE holding the lease's lock; a run starting meanwhile must not find DST free.
    dst = str(tmp_path / "dst")
    holder = Lease(dst, "holder", ttl_s=600).acquire()
    place, outcome, asked = holder._place, {}, threading.Event()

    def newcomer():
        other = Lease(dst, "newcomer")
        locked = other._locked

        def asking():                                  # it asks for the lease's lock: the renewal holds it
            asked.set()
            return locked()
        other._locked = asking
        try:
            other.acquire()
            outcome["newcomer"] = "took it"
            other.release()
        except LeaseHeld:
            outcome["newcomer"] = "refused"

    def place_once_a_newcomer_tries(tmp, replace=False):    # the renewal is under way: a new run starts now
        outcome["thread"] = threading.Thread(target=newcomer)
        outcome["thread"].start()
        wait_for(asked.is_set, "the newcomer to ask for the lease", 10)
        return place(tmp, replace)
    monkeypatch.setattr(holder, "_place", place_once_a_newcomer_tries)
    assert holder._renew() is True
    outcome["thread"].join(10)
    assert outcome["newcomer"] == "refused"
    assert json.loads(storage.read_bytes(holder.uri))["run_id"] == "holder"
    holder.release()
