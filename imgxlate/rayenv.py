"""Ray in one place: how training and the batch job start or join Ray, and where Ray's own output goes.
Lines marked `# ray:` use Ray's API (some of it private, pinned to Ray 2.58)."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import tempfile

import ray

from imgxlate.errors import CannotRun


def cluster_address(address: str | None) -> str | None:
    """The cluster a run joins: ``address`` or RAY_ADDRESS (which `ray job submit` sets); None when Ray is to
    start here (neither, or "local")."""
    address = address or os.environ.get("RAY_ADDRESS")
    return address if address and address != "local" else None


def start_or_join(address: str | None = None, num_cpus: int | None = None, env: dict | None = None) -> bool:
    """Join the cluster at ``address`` (or RAY_ADDRESS, which `ray job submit` sets), or start Ray in this
    process with ``num_cpus`` logical CPUs; ``address="local"`` starts Ray here whatever RAY_ADDRESS says
    (the test session and the benchmarks). ``env``: settings (not credentials) the workers need, e.g. the
    S3 endpoint; inside a Ray job the submission's runtime_env already carries them. True when this call
    started or joined Ray, False when the caller had."""
    if ray.is_initialized():
        return False
    if address := cluster_address(address):
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(address=address, runtime_env={"env_vars": env} if env and not in_job else None,  # ray:
                 logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,                   # ray:
                 logging_level=logging.WARNING)
    return True


def log_path(name: str) -> str:
    """A local file for Ray's own output of a command, named on the console."""
    folder = os.path.join(tempfile.gettempdir(), f"imgxlate-logs-{os.getuid()}")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}.log")


@contextlib.contextmanager
def output_to(path: str):
    """Within the block, Ray's own output goes to the log file ``path``: what the Train workers and Ray's
    actors print (forwarded to the driver) and, when this process's stderr is the console, the C++ core
    worker's lines (GCS time-outs, core_worker.cc). Lines with ``[imgxlate]`` from any worker or task stay on the
    console, without Ray's prefix. Enter after ray.init (which installs the forwarding this replaces)."""
    from ray._private import worker as ray_worker  # ray: Ray 2.58's log forwarding (pinned; private)

    log = open(path, "a", buffering=1)
    console, saved_fd = sys.stderr, None
    if sys.stderr is sys.__stderr__:                     # not when the caller captures stderr (tests)
        sys.stderr.flush()
        saved_fd = os.dup(2)
        console = os.fdopen(os.dup(saved_fd), "w", buffering=1)
        os.dup2(log.fileno(), 2)                         # fd 2 (the C++ side, Ray's loggers) -> the log
        sys.stderr = console                             # Python's stderr (imgxlate's lines) -> the console

    shown: collections.deque = collections.deque(maxlen=64)

    def route(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        for line in data.get("lines", []):
            at = line.find("[imgxlate]")
            if at < 0:
                log.write(f"({who} pid={data.get('pid')}) {line}\n")
            elif (data.get("pid"), line) not in shown:   # a Train worker's print arrives on stdout and stderr
                shown.append((data.get("pid"), line))
                print(line[at:], file=console, flush=True)

    dispatcher = ray_worker.global_worker_stdstream_dispatcher                  # ray:
    forwarding = [h for h in dispatcher.handlers if h[0] == "ray_print_logs"]
    dispatcher.remove_handler("ray_print_logs")                                 # ray:
    dispatcher.add_handler("imgxlate", route)                                   # ray:
    # Ray Data's console handler writes to sys.stderr as it is when it writes (the console, in here): its errors
    # (an actor that failed to start, with Ray's traceback) go to the log; the command says what failed.
    import ray.data  # noqa: F401  (configures the "ray.data" logger's handlers)

    data_log = logging.getLogger("ray.data")
    to_console = [h for h in data_log.handlers if isinstance(h, logging.StreamHandler)
                  and not isinstance(h, logging.FileHandler)]
    to_log = logging.StreamHandler(log)
    if to_console:                               # as the console had them: level, format, Ray Data's own filters
        to_log.setLevel(to_console[0].level)
        to_log.setFormatter(to_console[0].formatter)
        for f in to_console[0].filters:
            to_log.addFilter(f)
    for h in to_console:
        data_log.removeHandler(h)
    data_log.addHandler(to_log)
    try:
        yield
    finally:
        data_log.removeHandler(to_log)
        for h in to_console:
            data_log.addHandler(h)
        dispatcher.remove_handler("imgxlate")                                   # ray:
        if ray.is_initialized():                # a ray.shutdown() inside removed the forwarding for good
            for name, handler in forwarding:
                dispatcher.add_handler(name, handler)                           # ray:
        if saved_fd is not None:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            sys.stderr = sys.__stderr__
            console.close()
        log.close()




def nodes_without(path: str) -> list[str]:
    """IPs of the cluster's live nodes on which ``path`` does not exist (none on a one-node cluster, where
    nothing is asked): a task of 0 CPUs pinned to each node looks."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # ray:

    nodes = [n for n in ray.nodes() if n.get("Alive")]                                          # ray:
    if len(nodes) < 2:
        return []
    look = ray.remote(num_cpus=0)(os.path.exists)                                               # ray:
    seen = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                 ).remote(path) for n in nodes], timeout=120)                   # ray:
    return [n.get("NodeManagerAddress", n["NodeID"]) for n, ok in zip(nodes, seen) if not ok]


def check_shared(path: str, what: str, write: bool = True) -> None:
    """On a cluster of more than one node, a local ``path`` (--storage, SRC, DST) must be one every node sees
    (NFS, EFS, a mounted volume). ``write``: a marker written into the folder is looked for on each node; else
    (a SRC, perhaps mounted read-only) the file itself, or one entry of the folder. SharedPathError, before any
    work, when a node does not see it; on one node, or when the nodes do not answer in time (said), nothing."""
    import uuid

    from imgxlate.log import log

    path = os.path.abspath(path)        # a task on another node runs in another working directory
    if sum(bool(n.get("Alive")) for n in ray.nodes()) < 2 or not os.path.exists(path):         # ray:
        return
    marker = os.path.join(path, f".imgxlate-shared-{uuid.uuid4().hex[:8]}") if write else path
    if not write and os.path.isdir(path):
        marker = next((os.path.join(path, e) for e in sorted(os.listdir(path))), None)
    try:
        if marker is None or write and not _touch(marker):
            return                      # an empty SRC; a DST that cannot be written (the preflight says so)
        missing = nodes_without(marker)
    except ray.exceptions.GetTimeoutError:                                                      # ray:
        log(f"warning: not every node answered whether it sees {what} {path} (2 minutes): not checked")
        return
    finally:
        if write and marker:
            with contextlib.suppress(OSError):
                os.remove(marker)
    if missing:
        raise SharedPathError(f"{what} {path} is a local folder that {len(missing)} of the cluster's nodes do "
                              f"not see ({', '.join(missing[:3])}): work done there would be lost or not found; "
                              f"use s3://... or a filesystem every node mounts")


def _touch(path: str) -> bool:
    try:
        open(path, "w").close()
        return True
    except OSError:
        return False


class SharedPathError(CannotRun):
    """A local path the cluster's nodes do not share (exit 2, before any work)."""
