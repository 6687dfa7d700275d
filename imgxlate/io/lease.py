"""An exclusive lease on a batch job's DST, so two runs never process one destination at once (and on a
training run's folder, so two trainings of one run never write its checkpoints at once).

The lease is ``DST/_manifest/LEASE``: a small JSON object with the holder's run id, host, pid, heartbeat
and expiry. It is taken with a conditional write where the store has one: on S3, ``PutObject`` with
``If-None-Match: *`` (a second writer gets 412 Precondition Failed) and renewed with ``If-Match`` on the
holder's ETag, so a run whose lease was taken over finds out at its next heartbeat; in a local folder,
a hard link (which fails when the lease exists) and an atomic rename, each change made holding an exclusive
``flock`` on ``LEASE.lock`` beside it, so that no run changes it between another's read and write. A
lease whose expiry has passed was left by a run that was killed (its heartbeat stopped) and is taken over; so
is one whose holder ran on this machine (the same host name, and pid namespace where recorded: containers that
share the host's network share its name) and whose process is gone, or whose last heartbeat came before this
machine booted, without waiting for the expiry. Other fsspec
stores get a check-then-write, which narrows the race but does not close it.

An S3-compatible store is not trusted to enforce conditional writes (Backblaze B2 answers 501, GCS's
interoperability API ignores them, some stores let concurrent ones all succeed): before taking the lease, a
probe object next to it is written with ``If-None-Match: *``, then again (it must be refused with 412), then
with ``If-Match`` on a wrong ETag (likewise), and deleted. Any other answer raises :class:`LeaseUnsafe`,
naming it. :class:`NoLease` (``--lease off``) has a Lease's interface and holds nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid

from imgxlate.io import storage

NAME = "LEASE"
LOCK_FILE = NAME + ".lock"              # a local lease's changes are made holding a flock on this file
TOMBSTONE = b'{"released": true, "expires": 0}'


def _identity() -> dict:
    """Where this process runs: host name and pid, and (Linux) the boot and the pid namespace, since containers
    that share the host's network share its name, not its processes."""
    found = {"host": socket.gethostname(), "pid": os.getpid()}
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            found["boot_id"] = f.read().strip()
    with contextlib.suppress(OSError):
        found["pid_ns"] = os.stat("/proc/self/ns/pid").st_ino
    return found


BOOT_SKEW_S = 60.0                      # clocks of a lease's holder and reader may differ this much


def _boot_time() -> float | None:
    """When this machine booted (Linux: /proc/stat's btime), or None."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    return None


def _dead_here(holder: dict) -> bool:
    """The holder ran on this machine and its process is gone (killed, or its last heartbeat was before this
    machine booted): no need to wait for its expiry. A holder in another container of the same host name
    (another pid namespace), or on another machine of that name, cannot be judged so: its lease is waited out."""
    me = _identity()
    if holder.get("host") != me["host"] or not isinstance(holder.get("pid"), int):
        return False
    if holder.get("boot_id") and me.get("boot_id") and holder["boot_id"] != me["boot_id"]:
        # Another boot: this machine rebooted since, or another machine has the same host name (a fixed
        # container host name on two machines). Only a heartbeat from before this boot tells the first apart.
        booted = _boot_time()
        return booted is not None and holder.get("heartbeat", booted) < booted - BOOT_SKEW_S
    if holder.get("pid_ns", me.get("pid_ns")) != me.get("pid_ns"):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _parse(data: bytes) -> dict:
    try:
        holder = json.loads(data)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"expires": 0}


class LeaseHeld(RuntimeError):
    """Another live run holds the lease."""

    def __init__(self, holder: dict, uri: str):
        age = time.time() - holder.get("heartbeat", 0)
        super().__init__(
            f"destination in use: run {holder.get('run_id')} on {holder.get('host')} (pid {holder.get('pid')}) "
            f"holds {uri}, last heartbeat {age:.0f}s ago, expires in {holder.get('expires', 0) - time.time():.0f}s. "
            f"Wait for it to finish (or pass --wait-for-lease SECONDS); a killed run's lease expires by itself")
        self.holder = holder


class LeaseUnsafe(RuntimeError):
    """The store does not enforce the conditional writes the lease relies on: it cannot keep two runs apart."""

    def __init__(self, dst: str, what: str, answer: str, expected: str = "refused with 412 PreconditionFailed"):
        endpoint = storage.endpoint_from_env()
        super().__init__(
            f"the store behind {dst}{f' (endpoint {endpoint})' if endpoint else ''} does not enforce conditional "
            f"writes, so a lease on it cannot keep two runs apart: {what} was answered {answer}, where it must be "
            f"{expected}. Use a store that enforces them (AWS S3, R2, MinIO, Ceph RGW), "
            f"or pass --lease off to run without a lease, at your risk (never start two runs on this DST)")
        self.answer = answer


REFUSED = ("PreconditionFailed", "ConditionalRequestConflict")
WRONG_ETAG = '"00000000000000000000000000000000"'


def _answer(e: Exception) -> tuple[int | None, str]:
    """(HTTP status, "status Code") of a botocore ClientError."""
    r = getattr(e, "response", None) or {}
    status = r.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status, f"{status} {r.get('Error', {}).get('Code') or type(e).__name__}"


def _put(client, bucket: str, key: str, **condition) -> tuple[int | None, str, bool]:
    """PUT a probe under a condition: (status, answer, refused as a conditional write must be). A store that
    cannot be reached or denies access raises as it came (the destination's problem, not the lease's)."""
    try:
        r = client.put_object(Bucket=bucket, Key=key, Body=b"imgxlate lease probe", **condition)
    except client.exceptions.ClientError as e:
        status, answer = _answer(e)
        if status in (403, 404) or ((status or 0) >= 500 and status != 501):
            raise
        code = e.response.get("Error", {}).get("Code")
        return status, answer, code in REFUSED or status == 412
    status = r.get("ResponseMetadata", {}).get("HTTPStatusCode", 200)
    return status, f"{status} (the write was made)", False


class NoLease:
    """``--lease off``: a Lease's interface, holding nothing. Two runs on one DST would both write it."""

    kind = "off (unchecked: at the user's risk)"
    lost = False

    def __init__(self, dst: str):
        self.uri = storage.join(dst.rstrip("/"), "_manifest", NAME)

    def acquire(self) -> NoLease:
        self.taken_at = time.time()
        return self

    def release(self) -> None:
        pass

    def __enter__(self) -> NoLease:
        return self

    def __exit__(self, *exc) -> None:
        pass


class Lease:
    """``with Lease(dst, run_id): ...`` holds DST for the block, renewing the heartbeat in a thread. ``kind``
    says how it keeps other runs out: ``s3-conditional`` (checked), ``local-link``, or ``check-then-write``."""

    def __init__(self, dst: str, run_id: str, ttl_s: float = 120.0, wait_s: float = 0.0, poll_s: float = 5.0,
                 folder: str = "_manifest"):
        self.dst = dst.rstrip("/")
        # a training run's: <run>/imgxlate/LEASE; a local one as a path (os calls take no file:// URI)
        where = storage.local_path(self.dst) if storage.is_local(self.dst) else self.dst
        self.uri = storage.join(where, folder, NAME)
        self.run_id, self.ttl_s, self.wait_s, self.poll_s = run_id, ttl_s, wait_s, poll_s
        self.token = uuid.uuid4().hex          # tells our own lease from a later holder's
        self.lost = False
        self._renewed = 0.0
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.kind = "s3-conditional" if self.uri.startswith("s3://") else \
            "local-link" if storage.is_local(self.uri) else "check-then-write"

    # ------------------------------------------------------------------ store-specific primitives
    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"run_id": self.run_id, **_identity(), "token": self.token, "heartbeat": now,
                           "expires": now + self.ttl_s}).encode()

    def _s3(self):
        import boto3

        bucket, key = self.uri[len("s3://"):].split("/", 1)
        return boto3.client("s3", endpoint_url=storage.endpoint_from_env()), bucket, key

    def check_store(self) -> None:
        """On S3, prove with a probe object beside the lease that the store refuses what the lease needs it to
        refuse; raise LeaseUnsafe, naming the store's answer, when it does not. The probe is deleted."""
        if self.kind != "s3-conditional":
            return
        client, bucket, key = self._s3()
        probe = f"{key.rsplit('/', 1)[0]}/.lease-probe-{self.run_id}-{self.token[:8]}"
        where = f"s3://{bucket}/{probe}"
        try:
            status, answer, refused = _put(client, bucket, probe, IfNoneMatch="*")
            if refused or not 200 <= (status or 0) < 300:      # a new key: the write must be made
                raise LeaseUnsafe(self.dst, f"a first PUT of {where} with If-None-Match: *", answer,
                                  "written (200: the key is new)")
            for what, condition in (("a second PUT of {} with If-None-Match: *", {"IfNoneMatch": "*"}),
                                    ("a PUT of {} with If-Match on a wrong ETag", {"IfMatch": WRONG_ETAG})):
                _, answer, refused = _put(client, bucket, probe, **condition)
                if not refused:
                    raise LeaseUnsafe(self.dst, what.format(where), answer)
        finally:
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=bucket, Key=probe)

    def _create(self) -> bool:
        """Write the lease only if there is none; False when one exists."""
        if self.uri.startswith("s3://"):
            client, bucket, key = self._s3()
            try:
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(), IfNoneMatch="*")["ETag"]
                return True
            except client.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
        if storage.is_local(self.uri):
            with self._locked():
                return self._link()
        if storage.exists(self.uri):
            return False
        storage.write_bytes(self.uri, self._body())
        return True

    @contextlib.contextmanager
    def _locked(self):
        """A local lease's changes are made one at a time, across processes: an exclusive flock on LEASE.lock.
        A new lease is written beside it (LEASE.new-TOKEN) and renamed into place within milliseconds while the
        lock is held, so one older than the lease's time to live was left by a process killed mid-change, and is
        removed (not a younger one: where flock is not shared, on some network file systems, or while a finished
        run removes the lock file, another process may be writing one)."""
        folder = os.path.dirname(self.uri)
        os.makedirs(folder, exist_ok=True)
        fd = os.open(storage.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            prefix = os.path.basename(self.uri) + ".new-"
            with contextlib.suppress(OSError):
                for name in os.listdir(folder):
                    path = os.path.join(folder, name)
                    if name.startswith(prefix) and os.stat(path).st_mtime < time.time() - self.ttl_s:
                        with contextlib.suppress(OSError):
                            os.remove(path)
            yield
        finally:
            os.close(fd)                        # releases the lock

    def _link(self) -> bool:
        """Link a complete new lease into place (holding _locked); False when one exists."""
        tmp = f"{self.uri}.new-{self.token}"
        try:
            with open(tmp, "wb") as f:          # complete before it is visible: never an empty lease
                f.write(self._body())
            self._place(tmp)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)                  # also when the write failed (a full disk)

    def _place(self, tmp: str, replace: bool = False) -> None:
        if replace:
            os.replace(tmp, self.uri)           # atomic, over the lease it replaces
        else:
            os.link(tmp, self.uri)              # atomic, and fails when a lease exists

    def _swap(self, holder: dict, body: bytes) -> bool:
        """A local lease (holding _locked, as every change to it is made): if the lease is still ``holder``'s, put
        ``body`` in its place in one atomic rename (a tombstone: remove it). Readers see the old lease or the new
        one, never none; a new lease that cannot be written (a full disk) leaves the old one as it was."""
        current, _ = self._read()
        if current is None or current.get("token") != holder.get("token"):
            return False                        # gone, or a newer lease: left as it is
        if body == TOMBSTONE:
            os.remove(self.uri)
            return True
        tmp = f"{self.uri}.new-{self.token}"
        try:
            with open(tmp, "wb") as f:          # complete before it is visible
                f.write(body)
            self._place(tmp, replace=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return True

    def _read(self) -> tuple[dict | None, str | None]:
        """(holder, etag) of the current lease, or (None, None) when there is none. A released lease (a
        tombstone) or an unreadable one reads as expired."""
        if self.uri.startswith("s3://"):
            client, bucket, key = self._s3()
            try:
                r = client.get_object(Bucket=bucket, Key=key)
            except client.exceptions.NoSuchKey:
                return None, None
            return _parse(r["Body"].read()), r["ETag"]
        try:
            return _parse(storage.read_bytes(self.uri)), None
        except FileNotFoundError:
            return None, None

    def _replace(self, etag: str | None, holder: dict, body: bytes) -> bool:
        """Put ``body`` in place of the lease ``holder`` / ``etag`` describes, and of nothing newer."""
        if self.uri.startswith("s3://"):
            client, bucket, key = self._s3()
            try:                                # one conditional write: never a delete that could hit a new lease
                etag = client.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=etag)["ETag"]
            except client.exceptions.ClientError:
                return False
            self._etag = etag
            return True
        if storage.is_local(self.uri):
            with self._locked():                # no other run creates or moves the lease meanwhile
                return self._swap(holder, body)
        storage.write_bytes(self.uri, body)
        return True

    def _renew(self) -> bool:
        if storage.is_local(self.uri):      # checked and replaced holding the lock: a read-then-write without it
            return self._replace(None, {"token": self.token}, self._body())   # could overwrite another run's lease
        holder, etag = self._read()
        if not holder or holder.get("token") != self.token:
            return False
        if self.uri.startswith("s3://"):
            client, bucket, key = self._s3()
            try:
                self._etag = client.put_object(Bucket=bucket, Key=key, Body=self._body(), IfMatch=etag)["ETag"]
                return True
            except client.exceptions.ClientError:
                return False
        storage.write_bytes(self.uri, self._body())           # other stores: check-then-write
        return True

    # ------------------------------------------------------------------ the lease
    def acquire(self) -> Lease:
        self.check_store()
        deadline = time.time() + self.wait_s
        while True:
            if self._create():
                break
            holder, etag = self._read()
            if holder is None:
                continue                        # released between our two calls
            if holder.get("expires", 0) < time.time() or _dead_here(holder):
                if self._replace(etag, holder, self._body()):   # a killed or released run's lease: take it
                    break
                continue                        # another run took it first: look again
            if time.time() >= deadline:
                raise LeaseHeld(holder, self.uri)
            time.sleep(min(self.poll_s, max(0.1, deadline - time.time())))
        self._renewed = self.taken_at = time.time()       # taken_at: the run's start in the order of runs
        self._thread = threading.Thread(target=self._heartbeat, name="imgxlate-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self._renew():           # taken over by another run
                    self.lost = True
                    return
                self._renewed = time.time()
            except Exception:                   # a store error: try again at the next beat, but not forever
                if time.time() - self._renewed > self.ttl_s * 0.75:
                    self.lost = True            # others may consider it expired soon
                    return

    def release(self) -> None:
        """Give the lease up (a tombstone others may take at once); never raises."""
        if self._stop.is_set():
            return                              # released already
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if storage.is_local(self.uri):      # read and removed holding the lock, as every local change
                released = self._replace(None, {"token": self.token}, TOMBSTONE)
            else:
                holder, etag = self._read()
                released = bool(holder and holder.get("token") == self.token)
                if released:
                    self._replace(etag, holder, TOMBSTONE)
            if not released and self._thread is not None:
                self.lost = True                # taken over since the last heartbeat
        except Exception:                       # the lease then expires by itself
            pass

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
