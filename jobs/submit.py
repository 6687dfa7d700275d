"""Submit an imgxlate job to a Ray cluster, idempotently.

    python jobs/submit.py --address http://127.0.0.1:8265 -- \\
        python jobs/translate.py s3://archive/scans s3://archive/restored --model s3://models/sr-x4

What it adds to `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- ...`:

- A deterministic submission id, ``imgxlate-<script>-<hash of the entrypoint>``. Submitting the same command
  again never starts a duplicate: a job with that id that is PENDING or RUNNING is followed instead; one
  that SUCCEEDED is reported and left alone (``--again`` runs it once more as ``<id>-2``, ``-3``, ...); one
  that FAILED or was STOPPED is resubmitted as the next ``<id>-N``. The work itself resumes from storage:
  the batch job skips inputs its manifest has done, training resumes from the latest checkpoint of the
  same --name and --storage.
- The runtime_env: this checkout as the working_dir, minus data, `.git`, virtual environments and
  outputs (cluster/runtime_env.yaml), plus the non-secret S3 settings of this shell
  (``imgxlate.io.storage.FORWARDED_ENV``: AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION, IMGXLATE_DURABLE).
  Credentials are never shipped: the cluster's nodes use their own environment or instance role, and an
  entrypoint or forwarded setting that carries a secret (a key's name, or a URL with user:password@) is refused.
- It follows the job: prints its logs as they come and exits 0 when it SUCCEEDED (1 otherwise);
  ``--no-wait`` returns after submitting.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = re.compile(r"(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|aws_secret_access_key|secret[_-]?key|"
                    r"X-Amz-Signature|X-Amz-Credential|password|://[^/\s:@]+:[^/\s@]+@)", re.IGNORECASE)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submission_id(entrypoint: list[str], env: dict | None = None) -> str:
    """``imgxlate-<script>-<12 hex>``: the same command (same script and arguments) from the same working
    directory, with the same forwarded settings (``env``'s env_vars: the S3 endpoint, the region), gives the same
    id; the same command against another store, or from another checkout, is another job."""
    script = next((os.path.splitext(os.path.basename(a))[0] for a in entrypoint if a.endswith(".py")), "job")
    env = env or {}
    where = [env.get("working_dir", ""), *(f"{k}={v}" for k, v in sorted(env.get("env_vars", {}).items()))]
    digest = hashlib.sha256("\0".join([*entrypoint, "\1", *where]).encode()).hexdigest()[:12]
    return f"imgxlate-{script.replace('_', '-')}-{digest}"


def runtime_env(working_dir: str = ROOT) -> dict:
    import yaml

    from imgxlate.io import storage  # lazily: a client without fsspec can still run --help

    with open(os.path.join(ROOT, "cluster", "runtime_env.yaml")) as f:
        env = yaml.safe_load(f) or {}
    env["working_dir"] = working_dir
    forwarded = storage.forwarded_env()
    if forwarded:
        env.setdefault("env_vars", {}).update(forwarded)
    return env


def check_no_secrets(entrypoint: list[str], env: dict) -> None:
    for text in [*entrypoint, *(str(t) for kv in env.get("env_vars", {}).items() for t in kv)]:   # names, values
        if SECRET.search(text):
            raise SystemExit("submit: refusing to send a credential on the command line or in the runtime_env "
                             f"({SECRET.search(text).group(0)!r}): the cluster's nodes use their own "
                             "environment or instance role")


def _status(client, sid: str):
    try:
        return client.get_job_info(sid).status.value
    except Exception as e:          # RuntimeError / 404 from the Jobs API: no such job
        if "does not exist" in str(e) or "404" in str(e) or "not found" in str(e).lower():
            return None
        raise


def plan(client, base: str, again: bool = False) -> tuple[str, str]:
    """(action, id): 'follow' an active job, 'done' for a succeeded one, or 'submit' under the next free id."""
    n, last = 1, None
    while True:
        sid = base if n == 1 else f"{base}-{n}"
        status = _status(client, sid)
        if status is None:
            break
        last = (sid, status)
        n += 1
    if last is None:
        return "submit", base
    sid, status = last
    if status in ("PENDING", "RUNNING"):
        return "follow", sid
    if status == "SUCCEEDED" and not again:
        return "done", sid
    return "submit", f"{base}-{n}"


def follow(client, sid: str, poll_s: float = 1.0, patience_s: float = 120.0) -> str:
    """Print the job's logs as they come until it ends; its last status. The poll slows to every 10 s as the log
    grows (each poll fetches the whole log), and a dashboard that does not answer (a port-forward's blip) is
    retried for ``patience_s`` before giving up with one line: the job itself goes on either way."""
    printed, lost_since = 0, None
    while True:
        try:
            status = client.get_job_status(sid).value
            logs = client.get_job_logs(sid)
            lost_since = None
        except Exception as e:
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > patience_s:
                raise SystemExit(f"submit: the Jobs API at {client.get_address()} has not answered for "
                                 f"{patience_s:.0f} s ({type(e).__name__}); job {sid} goes on: the same command "
                                 f"follows it again") from None
            time.sleep(min(10.0, poll_s * 5))
            continue
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(min(10.0, poll_s * (1 + printed // 1_000_000)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=os.environ.get("RAY_JOBS_ADDRESS", "http://127.0.0.1:8265"),
                    help="the cluster's dashboard / Jobs API (default: $RAY_JOBS_ADDRESS or %(default)s)")
    ap.add_argument("--again", action="store_true", help="run a command that already SUCCEEDED once more")
    ap.add_argument("--no-wait", action="store_true", help="return after submitting; do not follow the logs")
    ap.add_argument("--working-dir", default=ROOT, help="code shipped with the job (default: this checkout)")
    ap.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- python jobs/<job>.py ARGS...")
    args = ap.parse_args(argv)
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    if not entrypoint:
        ap.error("give the job command after --, e.g. -- python jobs/translate.py SRC DST --model M")
    env = runtime_env(os.path.abspath(args.working_dir))
    check_no_secrets(entrypoint, env)

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    base = submission_id(entrypoint, env)
    action, sid = plan(client, base, args.again)
    if action == "done":
        print(f"submit: {sid} already SUCCEEDED; nothing to do (--again runs it once more)")
        return 0
    if action == "follow":
        print(f"submit: {sid} is already {_status(client, sid)}: following it instead of starting a duplicate")
    else:
        client.submit_job(entrypoint=shlex.join(entrypoint), submission_id=sid, runtime_env=env,
                          metadata={"imgxlate_base_id": base})
        print(f"submit: submitted {sid}")
    if args.no_wait:
        return 0
    status = follow(client, sid)
    print(f"submit: {sid} {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
