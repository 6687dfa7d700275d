"""The DST lease: one run at a time, on a local folder and on the S3 test server (conditional writes)."""

import json
import threading
import time

import pytest

from imgxlate.io import storage
from imgxlate.io.lease import Lease, LeaseHeld

from fixtures import wait_for


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
