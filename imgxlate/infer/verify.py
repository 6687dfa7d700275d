"""``imgxlate verify DST``: prove that a finished run is complete, from its manifest, and say what is not.

For every shard marker (one listing of ``DST/_manifest/_shards``), the parts it names are read, the latest row
of each input is kept (by the plan's rule: the last row in part order decides; a legacy ``skipped_done`` row
leaves the row before it standing), and each input is checked:

    latest row not ok                   not_ok:<status>     (a rerun retries it anyway)
    ok, output gone                     missing
    ok, output of another size          size_mismatch       (the size the row records)
    ok, other bytes (--checksums)       checksum_mismatch   (the sha256 the row records)
    ok, output cannot be read           unreadable_output   (an error after retries; not marked for --redo)
    ok, its shard object cannot be      damaged_output      (--output-format webdataset / parquet: a tar header
        parsed                                               or Parquet page damaged; marked, the shard redone)

and each shard: a marker that cannot be read (``unreadable_marker``), a part it names that is gone or cannot
be read (``missing_part``, ``unreadable_part``), inputs of the shard with no row at all (``no_row``: a run
stopped before them, or their part is gone). Parts that no marker names (DSTs written before markers, or a
run killed between a part and its marker) are not read. Outputs are checked in the DST given: a copied or
moved DST (its runs' summaries say where they wrote it) has its rows' ``output_uri`` read inside the copy,
never at the original; an output recorded outside the DST with no summary to place it is ``elsewhere``.

Memory is bounded by one shard (10,000-20,000 inputs) whatever the number of inputs, beyond the shard ids (one
short name per shard: 100,000 for a billion inputs). A shard's rows are read, checked (outputs in a pool of
THREADS: a stat on a local disk, a HEAD on S3, never a listing of DST; with --checksums each output is read in
1 MiB chunks) and dropped before the next shard is read. Problems go to
``DST/_manifest/_verify/<verify id>.parquet`` as one row group per shard that has any (PROBLEM_SCHEMA).

``--redo`` makes the next ``imgxlate translate`` of the same SRC, DST and options redo exactly the inputs
whose output is bad (missing, size or checksum mismatch), under the lease: for each such shard it writes a
manifest part ``DST/_manifest/<verify id>/part-<shard>-redo.parquet`` with one ``write_error`` row per input
(error ``marked for redo by imgxlate verify: <problem>``), appends it to the marker's parts (so those rows are
the inputs' latest) and updates the marker's counts (and ``complete``, when inputs have no row), so that the
rerun reads the shard's parts instead of skipping it. Inputs that are not ok, or have no row, are redone by a
rerun already. Its summary.json says what it did and when (runs are ordered by when they started: manifest.in_order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import posixpath
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from imgxlate.errors import CannotRun
from imgxlate.io import manifest, shards, storage
from imgxlate.io.lease import Lease, LeaseHeld, LeaseUnsafe
from imgxlate.io.listing import redact

VERIFY_DIR = "_verify"            # under DST/_manifest: one problems file per verify
THREADS = 16                      # outputs checked at once (stat / HEAD / read)
CHUNK = 1 << 20                   # bytes read at a time for --checksums
COLUMNS = ["source_uri", "key", "output_uri", "status", "error", "output_bytes", "output_sha256", "attempt",
           "recipe", "model_id", "model_sha256", "task"]
REDONE = ("missing", "size_mismatch", "checksum_mismatch", "damaged_output")   # what --redo marks: an ok row's
                                                                                # output is bad
REDO_STATUS = "write_error"       # not done, so a rerun sends the input through again
REDO_ERROR = "marked for redo by imgxlate verify: "

PROBLEM_SCHEMA = pa.schema([
    ("shard", pa.string()),        # the shard (its marker: _manifest/_shards/<shard>.json)
    ("source_uri", pa.string()),   # the input (null for a problem of the shard: a marker, a part, no_row)
    ("output_uri", pa.string()),
    ("problem", pa.string()),      # not_ok:<status>, missing, size_mismatch, checksum_mismatch, ...
    ("detail", pa.string()),       # what was found, against what the row records
])


class VerifyError(CannotRun, RuntimeError):
    """DST cannot be verified (not a translate DST, markers unreadable, the lease held for --redo)."""


@dataclass
class VerifyConfig:
    dst: str
    checksums: bool = False       # also read every output and compare its sha256 with its row's
    redo: bool = False            # mark the inputs with a bad output so that the next translate redoes them
    lease: str = "on"             # --redo holds DST's lease (as translate does); "off": at the user's risk
    s3_endpoint: str | None = None


@dataclass
class ShardCheck:
    """What one shard's check found."""

    shard: str
    n: int = 0                                          # inputs the marker counts
    ok: int = 0                                         # inputs proven done
    problems: list[dict] = field(default_factory=list)  # PROBLEM_SCHEMA rows
    counts: Counter = field(default_factory=Counter)    # problems by kind (inputs; parts/markers for theirs)
    statuses: Counter = field(default_factory=Counter)  # the latest status of each input with a row
    redo: list[tuple[dict, str]] = field(default_factory=list)   # (latest row, problem) to mark for redo
    without_row: int = 0                                # inputs of the shard with no row

    def add(self, problem: str, detail: str, row: dict | None = None, inputs: int = 1) -> None:
        row = row or {}
        self.problems.append({"shard": self.shard, "source_uri": row.get("source_uri"),
                              "output_uri": row.get("output_uri"), "problem": problem, "detail": detail})
        self.counts[problem] += inputs


# ------------------------------------------------------------------------------------------- one output
def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_output(row: dict, checksums: bool, dst: str | None = None) -> tuple[str, str] | None:
    """(problem, detail) for an ok row's output, or None when it is there as recorded (and inside ``dst``)."""
    if not row.get("output_uri"):
        return "missing", "the row records no output_uri"
    if dst and not row["output_uri"].startswith(dst + "/"):
        return "elsewhere", (f"recorded at {redact(row['output_uri'])}, outside this DST (a copy or a move whose "
                             f"runs left no summary): not checked")
    fs, path = storage.filesystem(row["output_uri"])
    try:
        info = storage.retry(fs.info, path)
        if info.get("type") == "directory":
            return "missing", "a folder stands where the output should be"
        size, recorded = info.get("size"), row.get("output_bytes")
        if recorded is not None and size != recorded:
            return "size_mismatch", f"{size} bytes, the row records {recorded}"
        if checksums and row.get("output_sha256"):
            digest = storage.retry(_sha256, fs, path)
            if digest != row["output_sha256"]:
                return "checksum_mismatch", f"sha256 {digest}, the row records {row['output_sha256']}"
    except FileNotFoundError:
        return "missing", "the output is gone"
    except Exception as e:
        return "unreadable_output", redact(f"{type(e).__name__}: {e}")
    return None


def check_members(obj: str, rows: list[dict], checksums: bool, name: str | None = None
                  ) -> list[tuple[dict, tuple[str, str] | None]]:
    """check_output for rows whose outputs are members of one object (--output-format webdataset / parquet), named
    ``name`` under DST: the object's index is read once. An object that was read but cannot be parsed (a tar
    header's checksum, a Parquet page) is damaged, which --redo marks; an error reading it is not."""
    try:
        index = shards.container_members(obj, checksums, name)
    except FileNotFoundError:
        return [(r, ("missing", f"the shard's object {redact(obj)} is gone")) for r in rows]
    except Exception as e:
        kind = "damaged_output" if _damaged(e) else "unreadable_output"
        return [(r, (kind, redact(f"{obj}: {type(e).__name__}: {e}"))) for r in rows]
    out = []
    for r in rows:
        member = r["output_uri"][len(obj) + 1:]
        size, digest = index.get(member, (None, None))
        if size is None:
            out.append((r, ("missing", f"{member!r} is not in {redact(obj)}")))
        elif r.get("output_bytes") is not None and size != r["output_bytes"]:
            out.append((r, ("size_mismatch", f"{size} bytes, the row records {r['output_bytes']}")))
        elif checksums and r.get("output_sha256") and digest != r["output_sha256"]:
            out.append((r, ("checksum_mismatch", f"sha256 {digest}, the row records {r['output_sha256']}")))
        else:
            out.append((r, None))
    return out


def _damaged(e: BaseException) -> bool:
    """Whether reading a shard's object failed on its contents (they will fail the same way each time), not on
    the read: tarfile's and Arrow's parse errors, bytes that do not decode (a damaged string column) or end too
    soon, and the OSError without an errno that Arrow raises for a corrupt Parquet page."""
    import tarfile

    parse = (tarfile.TarError, pa.ArrowException, ValueError, EOFError)
    return isinstance(e, parse) or isinstance(e.__cause__, tarfile.TarError) or type(e) is OSError and e.errno is None


def origins(dst: str) -> tuple[str, ...]:
    """The DSTs other than ``dst`` that its runs wrote (their summaries say), longest first: ``dst`` is a copy or
    a move of them."""
    found = set()
    for run_id in manifest.runs(dst):
        with contextlib.suppress(Exception):
            summary = json.loads(storage.read_bytes(storage.join(manifest.manifest_root(dst), run_id, "summary.json")))
            if summary.get("dst") and _normal(summary["dst"], dst) != dst:
                found.add(_normal(summary["dst"], dst))
    return tuple(sorted(found, key=len, reverse=True))


def _normal(uri: str, dst: str) -> str:
    """``uri`` spelt as verify spells a local ``dst`` (absolute, normalised: a run records the DST as it was typed,
    relative to where it ran), else as it is."""
    if storage.is_local(uri) and storage.is_local(dst):
        return os.path.normpath(storage.local_path(uri))
    return uri.rstrip("/")


def in_dst(uri: str | None, dst: str, origins: tuple[str, ...]) -> str | None:
    """A row's output_uri made one inside ``dst``: verify checks the DST it is given, so in a copied or moved DST
    (``origins``: where its runs wrote it) it checks the copy's outputs, never the originals. A row whose output
    lies neither in ``dst`` nor in an origin keeps its URI, and check_output says it is elsewhere."""
    if not uri:
        return uri
    uri = _normal(uri, dst)
    if uri.startswith(dst + "/"):
        return uri
    for origin in origins:
        if uri.startswith(origin + "/"):
            return dst + uri[len(origin):]
    return uri


# -------------------------------------------------------------------------------------------- one shard
def latest_rows(dst: str, marker: manifest.ShardMarker, check: ShardCheck) -> dict[str, dict]:
    """The latest row of each input of the shard, {source_uri: row}, from the parts its marker names, read one
    at a time (in the marker's order: the plan's); a part gone or unreadable is added to ``check``."""
    latest: dict[str, dict] = {}
    for name in marker.parts:
        try:
            table, missing = manifest.read_parts(dst, [name], COLUMNS)
        except Exception as e:
            check.add("unreadable_part", redact(f"{name}: {type(e).__name__}: {e}"))
            continue
        if missing:
            check.add("missing_part", f"{name}: gone, or cannot be read; a rerun does its inputs again")
            continue
        for row in table.to_pylist():
            if row["status"] == "skipped_done" and row["source_uri"] in latest:
                continue                        # a legacy skipped row: the row before it stands
            latest[row["source_uri"]] = row
    return latest


def check_shard(dst: str, sid: str, checksums: bool, pool: ThreadPoolExecutor, origins: tuple[str, ...] = ()
                ) -> tuple[ShardCheck, manifest.ShardMarker | None]:
    """Check one shard: (what was found, its marker or None when the marker cannot be read); ``origins``: where
    DST's runs wrote it, when that is not ``dst`` (see in_dst)."""
    check = ShardCheck(sid)
    uri = redact(manifest.shard_marker_uri(dst, sid))
    try:
        marker = manifest.read_shard_marker(dst, sid)
    except Exception as e:                      # manifest.Damaged (it names the file), or the store's error
        why = f"{type(e).__name__}: {e}"
        check.add("unreadable_marker", redact(f"{why if uri in why else f'{uri}: {why}'}; a rerun does its "
                                              f"inputs again"))
        return check, None
    check.n = marker.n
    latest = latest_rows(dst, marker, check)
    for r in latest.values():
        r["output_uri"] = in_dst(r.get("output_uri"), dst, origins)
    check.statuses = Counter(r["status"] for r in latest.values())
    done = [r for r in latest.values() if r["status"] in manifest.DONE]
    for r in latest.values():
        if r["status"] not in manifest.DONE:
            check.add(f"not_ok:{r['status']}", (r.get("error") or "")[:500], r)
    found_inside = []                           # rows whose output is a member of the shard's one object
    if marker.object:
        obj = storage.join(dst, marker.object["name"])
        inside = [r for r in done if (r.get("output_uri") or "").startswith(obj + "#")]
        done = [r for r in done if not (r.get("output_uri") or "").startswith(obj + "#")]
        found_inside = check_members(obj, inside, checksums, marker.object["name"]) if inside else []
    for row, found in [*found_inside, *zip(done, pool.map(lambda r: check_output(r, checksums, dst), done))]:
        if found is None:
            check.ok += 1
            continue
        check.add(*found, row)
        if found[0] in REDONE:
            check.redo.append((row, found[0]))
    check.without_row = max(0, marker.n - len(latest))
    if check.without_row:
        check.add("no_row", f"{check.without_row} of the shard's {marker.n} inputs have no manifest row (a run "
                            f"stopped before them, or their part is gone): a rerun does them",
                  inputs=check.without_row)
    return check, marker


# ------------------------------------------------------------------------------------------------ redo
def mark_for_redo(dst: str, verify_id: str, marker: manifest.ShardMarker, check: ShardCheck) -> int:
    """Make the next run redo the shard's inputs with a bad output (see the module docstring); how many."""
    complete = marker.complete and not check.without_row
    if not check.redo and complete == marker.complete:
        return 0
    now = dt.datetime.now(dt.timezone.utc)
    rows = [{"source_uri": r["source_uri"], "key": r["key"], "output_uri": r["output_uri"], "status": REDO_STATUS,
             "error": REDO_ERROR + problem, "attempt": r["attempt"], "recipe": r["recipe"],
             "model_id": r["model_id"], "model_sha256": r["model_sha256"], "task": r["task"], "shard": check.shard,
             "run_id": verify_id, "started_at": now, "finished_at": now} for r, problem in check.redo]
    parts = list(marker.parts)
    if rows:
        parts.append(manifest.write_part(dst, verify_id, f"{check.shard}-redo", rows))
    counts = Counter(check.statuses)
    for r, _ in check.redo:
        counts[r["status"]] -= 1
        counts[REDO_STATUS] += 1
    manifest.write_shard_marker(dst, dataclasses.replace(
        marker, complete=complete, run_id=verify_id, parts=parts,
        counts={k: v for k, v in sorted(counts.items()) if v > 0}))
    return len(rows)


@contextlib.contextmanager
def _lease(cfg: VerifyConfig, verify_id: str):
    """DST's lease while --redo rewrites markers (a running translate writes them too); None without --redo."""
    if not cfg.redo or cfg.lease == "off":
        yield None
        return
    try:
        lease = Lease(cfg.dst.rstrip("/"), verify_id).acquire()
    except (LeaseHeld, LeaseUnsafe) as e:
        raise VerifyError(f"--redo needs DST's lease: {e}") from e
    except Exception as e:
        raise VerifyError(redact(f"--redo could not take DST's lease: {type(e).__name__}: {e}")) from e
    try:
        yield lease
    finally:
        lease.release()


# ------------------------------------------------------------------------------------------ the whole
class ProblemWriter:
    """The problems file, written a row group at a time (opened at the first problem: none, no file)."""

    def __init__(self, uri: str):
        self.uri, self.rows, self._file, self._writer = uri, 0, None, None

    def write(self, problems: list[dict]) -> None:
        if not problems:
            return
        if self._writer is None:
            fs, path = storage.filesystem(self.uri)
            if storage.is_local(self.uri):
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = fs.open(path, "wb")
            self._writer = pq.ParquetWriter(self._file, PROBLEM_SCHEMA)
        self._writer.write_table(pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA))
        self.rows += len(problems)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()


def _markers(dst: str) -> set[str]:
    """The shard ids of DST; VerifyError when it has none (not a translate DST, or one from before markers)."""
    try:
        sids = manifest.shard_markers(dst)
    except Exception as e:
        raise VerifyError(redact(f"{dst}: cannot list its shard markers: {type(e).__name__}: {e}")) from e
    if sids:
        return sids
    shards = posixpath.join(manifest.MANIFEST_DIR, manifest.SHARD_DIR)
    try:
        runs = manifest.all_runs(dst)
    except Exception:
        runs = []
    if runs:
        raise VerifyError(f"{redact(dst)}: its manifest has no shard markers ({shards}/; written by an older "
                          f"imgxlate): rerun the same translate once to write them, then verify")
    raise VerifyError(f"{redact(dst)}: not the DST of an imgxlate translate run (no {shards}/): nothing to verify")


def verify(cfg: VerifyConfig) -> dict:
    """Check every shard of DST (see the module docstring); returns the counts (JSON-able): ``inputs`` (that
    the markers count), ``ok`` (proven), ``problems`` {kind: count}, ``problems_uri`` (None when none),
    ``redo`` (inputs marked) and ``verify_id``."""
    if cfg.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = cfg.s3_endpoint
    dst = cfg.dst.rstrip("/")
    if storage.is_local(cfg.dst):                       # file:, file://, ~ and relative paths too
        dst = os.path.normpath(storage.local_path(cfg.dst))  # rows' local paths are compared so spelt (_normal)
    storage.filesystem(dst)[0].invalidate_cache()       # sizes as they are now, not as a listing left them
    sids = _markers(dst)
    verify_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-verify-") + uuid.uuid4().hex[:6]
    writer = ProblemWriter(storage.join(manifest.manifest_root(dst), VERIFY_DIR, f"{verify_id}.parquet"))
    out = {"dst": redact(dst), "verify_id": verify_id, "checksums": cfg.checksums, "shards": len(sids),
           "inputs": 0, "ok": 0, "problems": Counter(), "problems_uri": None, "redo": 0}
    try:
        with _lease(cfg, verify_id) as lease:
            _check_all(cfg, dst, sorted(sids), verify_id, lease, writer, out)
    finally:
        writer.close()
    out["problems"] = dict(sorted(out["problems"].items()))
    out["problems_uri"] = redact(writer.uri) if writer.rows else None
    return out


def _check_all(cfg: VerifyConfig, dst: str, sids: list[str], verify_id: str, lease, writer: ProblemWriter,
               out: dict) -> None:
    """Check the shards one at a time into ``out`` and ``writer``; with --redo, mark each shard's bad outputs."""
    moved_from = origins(dst)
    with ThreadPoolExecutor(THREADS, thread_name_prefix="imgxlate-verify") as pool:
        for sid in sids:
            check, marker = check_shard(dst, sid, cfg.checksums, pool, moved_from)
            out["inputs"] += check.n
            out["ok"] += check.ok
            out["problems"].update(check.counts)
            writer.write(check.problems)
            if cfg.redo and marker is not None:
                if lease is not None and lease.lost:
                    raise VerifyError("--redo lost DST's lease to another run: verify again once it is done")
                out["redo"] += mark_for_redo(dst, verify_id, marker, check)
    if out["redo"]:
        manifest.write_summary(dst, verify_id, _redo_summary(dst, out))


def _redo_summary(dst: str, out: dict) -> dict:
    """summary.json of a --redo (imgxlate report lists it among the runs), with the model and SRC of the latest
    translate run's summary."""
    last: dict = {}
    for run_id in reversed(manifest.runs(dst)):
        with contextlib.suppress(Exception):
            last = json.loads(storage.read_bytes(storage.join(manifest.manifest_root(dst), run_id, "summary.json")))
        if last and "verify" not in last:
            break
    return {"run_id": out["verify_id"], "command": "imgxlate verify --redo", "inputs": out["redo"],
            "counts": {REDO_STATUS: out["redo"]}, "failed": out["redo"], "wall_s": None, "images_per_s": None,
            "output_bytes": 0, "dst": out["dst"], "src": last.get("src", "?"), "model_id": last.get("model_id"),
            "task": last.get("task"), "verify": {**out, "problems": dict(out["problems"])},
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")}


def report(out: dict) -> str:
    """The counts as one block of lines."""
    lines = [f"verified {out['dst']}: {out['shards']} shards, {out['inputs']} inputs, {out['ok']} ok"
             + ("" if out["checksums"] else " (sizes checked; --checksums also compares every output's sha256)")]
    lines += [f"  {kind:<22}{n}" for kind, n in out["problems"].items()]
    if out["problems_uri"]:
        lines.append(f"problems: {out['problems_uri']}")
    if out["redo"]:
        lines.append(f"marked for redo: {out['redo']} inputs (run {out['verify_id']})")
    return "\n".join(lines)


def verdict(out: dict) -> str | None:
    """The one line for stderr when there are problems (exit 1), else None."""
    n = sum(out["problems"].values())
    if not n:
        return None
    then = (f"{out['redo']} inputs with a bad output are marked for redo: rerun translate with the same SRC, DST "
            f"and options" if out["redo"] else
            "rerun with --redo to mark the bad outputs, then rerun translate with the same SRC, DST and options "
            "(failed inputs are retried by a rerun already)")
    return f"imgxlate verify: {n} problems (see {out['problems_uri']}); {then}"
