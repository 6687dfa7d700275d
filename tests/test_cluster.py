"""Cluster configs and multi-node runs: a head and a worker node on 127.0.0.1 (cluster/dev-cluster.sh),
jobs submitted through the Ray Jobs API with a working_dir (jobs/submit.py), data in the S3 test server."""

import copy
import datetime
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import time

import boto3
import numpy as np
import pytest
import yaml
from PIL import Image

from imgxlate.artifact import save
from imgxlate.io import manifest
from imgxlate.models import build

from conftest import photo
from fixtures import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = os.path.join(ROOT, "cluster", "dev-cluster.sh")
SUBMIT = os.path.join(ROOT, "jobs", "submit.py")


# ------------------------------------------------------------------------------------------ configs
def test_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(ROOT, "cluster", "aws.yaml")) as f:
        cfg = yaml.safe_load(f)
    validate_config(prepare_config(copy.deepcopy(cfg)))          # what `ray up` runs first
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["train_gpu"]["node_config"]["InstanceType"].startswith("g") and types["train_gpu"]["max_workers"] > 0
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    broken = copy.deepcopy(cfg)
    del broken["available_node_types"]["infer_gpu"]["resources"]
    with pytest.raises(Exception, match="resources"):
        validate_config(prepare_config(broken))
    assert not any(k in yaml.safe_dump(cfg) for k in ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"))


def _entry_args(entrypoint: str) -> tuple[str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1].startswith("jobs/")
    assert os.path.exists(os.path.join(ROOT, argv[1])), argv[1]
    return argv[1], argv[2:]


@pytest.mark.parametrize("name", ["rayjob-train-sr.yaml", "rayjob-translate.yaml"])
def test_kuberay_rayjob_manifests(name):
    import argparse

    from imgxlate.cli import add_train_arguments, add_translate_arguments

    with open(os.path.join(ROOT, "cluster", "kuberay", name)) as f:
        doc = yaml.safe_load(f)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["backoffLimit"], int)
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode")
    assert int(yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.58.0"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["template"]["spec"]["containers"][0]["image"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups
    for g in cluster["workerGroupSpecs"]:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert "rayStartParams" in g
    for g in gpu_groups:
        pod = g["template"]["spec"]
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The entrypoint is a real job script whose arguments its own parser accepts.
    script, args = _entry_args(spec["entrypoint"])
    p = argparse.ArgumentParser()
    if script.endswith("translate.py"):
        add_translate_arguments(p)
    else:
        add_train_arguments(p, script.split("_")[-1].removesuffix(".py"))
    p.parse_args(args)
    text = open(os.path.join(ROOT, "cluster", "kuberay", name)).read()
    assert "SECRET" not in text.upper().replace("SECRETS", "") and "backoffLimit" in text


def test_submission_ids_and_runtime_env():
    sys.path.insert(0, os.path.join(ROOT, "jobs"))
    import submit

    a = submit.submission_id(["python", "jobs/translate.py", "s3://a/in", "s3://a/out", "--model", "m"])
    assert a == submit.submission_id(["python", "jobs/translate.py", "s3://a/in", "s3://a/out", "--model", "m"])
    assert a.startswith("imgxlate-translate-")
    assert a != submit.submission_id(["python", "jobs/translate.py", "s3://a/in", "s3://b/out", "--model", "m"])
    env = submit.runtime_env()
    assert {".git", ".venv", "out", "data"} <= set(env["excludes"]) and env["working_dir"] == ROOT
    assert "AWS_SECRET_ACCESS_KEY" not in env.get("env_vars", {})
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60      # `ray job stop` leaves the job time to drain
    with pytest.raises(SystemExit, match="credential"):
        submit.check_no_secrets(["python", "jobs/translate.py", "--x", "AWS_SECRET_ACCESS_KEY=abc"], env)
    for leaky in ({"env_vars": {"AWS_ENDPOINT_URL": "https://minio:s3cret@store:9000"}}, {}):
        cmd = ["python", "jobs/translate.py"] + ([] if leaky else ["--s3-endpoint", "http://u:pw@127.0.0.1:9000"])
        with pytest.raises(SystemExit, match="credential"):         # a value, not only a name, is checked
            submit.check_no_secrets(cmd, leaky)
    submit.check_no_secrets(["python", "jobs/translate.py", "s3://a/in", "--s3-endpoint", "http://127.0.0.1:9"], env)
    # The same command against another store, or from another checkout, is another job.
    cmd = ["python", "jobs/translate.py", "in", "out", "--model", "m"]
    here = {"working_dir": ROOT, "env_vars": {"AWS_ENDPOINT_URL": "http://a:9000"}}
    assert submit.submission_id(cmd, here) == submit.submission_id(cmd, dict(here))
    assert submit.submission_id(cmd, here) != submit.submission_id(cmd, {**here, "env_vars": {}})
    assert submit.submission_id(cmd, here) != submit.submission_id(cmd, {**here, "working_dir": "/elsewhere"})
    # Every file the package ships travels with a job (the upload is first on the job's PYTHONPATH): the shipped
    # models' weights too, which the "*.pt" exclude once dropped.
    from ray._private.thirdparty.pathspec import PathSpec  # ray: how Ray matches runtime_env excludes

    spec = PathSpec.from_lines("gitwildmatch", env["excludes"])
    shipped = subprocess.run(["git", "ls-files", "imgxlate", "jobs", "cluster", "pyproject.toml"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert any(f.endswith("zoo/sr-x2/weights.pt") for f in shipped)
    assert not [f for f in shipped if spec.match_file(f)]
    assert spec.match_file("runs/sr/model/weights.pt") and spec.match_file("out/x.parquet")


def test_following_a_job_rides_out_a_dashboard_that_does_not_answer(capsys):
    sys.path.insert(0, os.path.join(ROOT, "jobs"))
    import submit

    class Client:
        def __init__(self, fail):
            self.fail, self.calls = fail, 0

        def get_address(self):
            return "http://127.0.0.1:8265"

        def get_job_status(self, sid):
            self.calls += 1
            if self.calls <= self.fail:
                raise ConnectionError("port-forward dropped")
            return type("S", (), {"value": "SUCCEEDED" if self.calls > self.fail + 1 else "RUNNING"})()

        def get_job_logs(self, sid):
            return "epoch 1\n" if self.calls <= self.fail + 1 else "epoch 1\nepoch 2\n"

    assert submit.follow(Client(fail=3), "j", poll_s=0.001, patience_s=30) == "SUCCEEDED"
    assert capsys.readouterr().out == "epoch 1\nepoch 2\n"
    with pytest.raises(SystemExit, match="has not answered for 0 s .*job j goes on"):
        submit.follow(Client(fail=10**9), "j", poll_s=0.001, patience_s=0.05)


# -------------------------------------------------------------------------------------- multi-node
def _free_port_block() -> int:
    """A base port with the block dev-cluster.sh uses (base .. base + 40, base + 1875) free."""
    for base in range(16390, 30000, 97):
        try:
            for p in (base, base + 1, *range(base + 10, base + 40), base + 1875):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block")


@pytest.fixture(scope="module")
def dev_cluster(s3_server):
    """Head + 1 worker node, 2 logical CPUs each, started with the project's script. Ray Data's actor pools
    start once all their actors are up (the nodes' processes, jobs' drivers included, inherit this), so a
    slow-starting actor cannot find the work already done by the other."""
    port = _free_port_block()
    env = {**os.environ, "DEV_CLUSTER_PORT": str(port), "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env.pop("AWS_ENDPOINT_URL", None)         # the endpoint reaches jobs through their runtime_env
    env.pop("RAY_ADDRESS", None)

    def dev(*args, check=True):
        return subprocess.run(["bash", DEV, *args], env=env, capture_output=True, text=True, check=check,
                              timeout=180)
    try:
        out = dev("start", "1")
    except subprocess.CalledProcessError as e:
        pytest.fail(f"dev cluster did not start:\n{e.stdout}\n{e.stderr}")
    assert "head + 1 worker node(s)" in out.stdout
    yield {"dashboard": f"http://127.0.0.1:{port + 1875}", "address": f"127.0.0.1:{port}", "dev": dev, "env": env}
    dev("stop", check=False)


def submit(cluster, *entry, extra=(), timeout=600):
    """jobs/submit.py as a user runs it (follows the job to its end)."""
    return subprocess.run([sys.executable, SUBMIT, "--address", cluster["dashboard"], *extra, "--", *entry],
                          capture_output=True, text=True, timeout=timeout, env={**cluster["env"],
                                                                               "AWS_ENDPOINT_URL": _endpoint()})


def _endpoint() -> str:
    return os.environ["AWS_ENDPOINT_URL"]


def _alive_nodes(cluster) -> set[str]:
    code = (f"import ray, json; ray.init(address={cluster['address']!r}, logging_level='ERROR'); "
            "print('alive:', json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cluster["env"],
                         timeout=60, check=True)
    # Ray may print after it (a dead node's "lagging heartbeats" notice, say)
    line = next(line for line in out.stdout.splitlines() if line.startswith("alive: "))
    return set(json.loads(line.removeprefix("alive: ")))


def test_a_local_folder_is_looked_for_on_each_node(dev_cluster, tmp_path):
    """rayenv.check_shared on two nodes: a folder of this machine is seen by both (one machine), a path that is
    nowhere by neither; no marker is left behind."""
    code = (f"import ray; from imgxlate import rayenv; ray.init(address={dev_cluster['address']!r}, "
            f"logging_level='ERROR'); rayenv.check_shared({str(tmp_path)!r}, 'DST'); "
            f"print('without:', len(rayenv.nodes_without({str(tmp_path / 'nowhere')!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dev_cluster["env"],
                         timeout=120, cwd=ROOT)
    assert "without: 2" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert not list(tmp_path.iterdir())


def test_batch_job_runs_model_actors_on_both_nodes(dev_cluster, bucket, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    n = 24
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(photo(96, 128, seed=i)).save(buf, "PNG")
        s3.put_object(Bucket=bucket, Key=f"src/batch {i // 8}/img_{i:02d}.png", Body=buf.getvalue())
    local_model = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"model-{bucket}")
    save(build("sr", nf=16, n_blocks=2, scale=2), local_model, provenance={"note": "random weights (test)"})
    for name in os.listdir(local_model):
        s3.upload_file(os.path.join(local_model, name), bucket, f"models/sr/{name}")
    # Two actors of 1.5 CPUs on nodes of 2 CPUs: no node holds both (SPREAD alone is best effort), and each
    # node keeps 0.5 CPU for the read / write tasks.
    entry = ["python", "jobs/translate.py", f"s3://{bucket}/src", f"s3://{bucket}/dst", "--model",
             f"s3://{bucket}/models/sr", "--actors", "2", "--cpus-per-actor", "1.5", "--batch-size", "1"]
    r = submit(dev_cluster, *entry)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="dst/")["Contents"]}
    assert {f"dst/batch {i // 8}/img_{i:02d}.png" for i in range(n)} <= keys
    rows = manifest.read_all(f"s3://{bucket}/dst").to_pylist()
    assert len(rows) == n and {r["status"] for r in rows} == {"ok"}
    nodes = {r["node_id"] for r in rows}
    assert len(nodes) == 2 and nodes <= _alive_nodes(dev_cluster), nodes
    # The same command again: the same submission id, found finished; nothing is run twice.
    again = submit(dev_cluster, *entry)
    assert again.returncode == 0 and "already SUCCEEDED" in again.stdout
    assert len(manifest.runs(f"s3://{bucket}/dst")) == 1


def _s3_keys(s3, bucket, prefix):
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def test_training_across_two_nodes_survives_losing_the_worker_node(dev_cluster, bucket, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    rng = np.random.default_rng(0)
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(photo(96, 96, seed=100 + int(rng.integers(1000)))).save(buf, "PNG")
        s3.put_object(Bucket=bucket, Key=f"train/p{i}.png", Body=buf.getvalue())
    entry = ["python", "jobs/train_sr.py", f"s3://{bucket}/train", "--name", "two-nodes", "--storage",
             f"s3://{bucket}/runs", "--preset", "tiny", "--workers", "2", "--placement", "STRICT_SPREAD",
             "--epochs", "8", "--batch-size", "4", "--hr-crop", "48", "--samples-per-image", "8",
             "--max-failures", "3"]
    r = submit(dev_cluster, *entry, extra=("--no-wait",))
    assert r.returncode == 0, r.stdout + r.stderr
    sid = r.stdout.strip().split()[-1]
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dev_cluster["dashboard"])
    deadline = time.time() + 300
    # Wait until Ray Train has registered a checkpoint (its snapshot is written after that): a checkpoint
    # still being reported when the node dies is lost, and the run would restart from scratch.
    snapshot = "runs/two-nodes/checkpoint_manager_snapshot.json"

    def checkpointed():
        assert client.get_job_status(sid).value in ("PENDING", "RUNNING"), client.get_job_logs(sid)[-3000:]
        return snapshot in _s3_keys(s3, bucket, "runs/two-nodes/")
    wait_for(checkpointed, "Ray Train's first checkpoint", 300, every_s=0.5)
    assert client.get_job_status(sid).value == "RUNNING", "the run ended before it could be interrupted"
    killed = dev_cluster["dev"]("kill-worker", "1")
    assert "killed worker node 1" in killed.stdout
    # The head notices the node is gone (about 3 s with dev-cluster.sh's health checks) and is left alone.
    wait_for(lambda: len(_alive_nodes(dev_cluster)) == 1, "the head to notice the worker node is gone", 180,
             every_s=1)
    dev_cluster["dev"]("add-worker", "1")
    while time.time() < deadline + 300 and client.get_job_status(sid).value not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(1)
    logs = client.get_job_logs(sid)
    assert client.get_job_status(sid).value == "SUCCEEDED", logs[-4000:]
    assert "resuming run 'two-nodes' from its latest checkpoint" in logs
    history = [json.loads(line) for line in s3.get_object(Bucket=bucket, Key="runs/two-nodes/imgxlate/metrics.jsonl")
               ["Body"].read().decode().splitlines()]
    epochs = [h["epoch"] for h in history]
    assert epochs[-1] == 8 and epochs == sorted(set(epochs)), epochs      # resumed: no epoch trained twice
    steps = [h["global_step"] for h in history]
    assert steps == sorted(steps)
    assert "runs/two-nodes/model/config.json" in _s3_keys(s3, bucket, "runs/two-nodes/model/")
    # Submitting the same command again finds the finished job; nothing is retrained.
    again = submit(dev_cluster, *entry)
    assert "already SUCCEEDED" in again.stdout


# ---------------------------------------------------------------------------------- a node taken away
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _put_inputs(s3, bucket: str, n: int) -> list[str]:
    """``n`` PNGs under src/ (96 x 128); returns their keys relative to src/."""
    keys = [f"set {i // 10}/img_{i:02d}.png" for i in range(n)]
    for i, key in enumerate(keys):
        buf = io.BytesIO()
        Image.fromarray(photo(96, 128, seed=200 + i)).save(buf, "PNG")
        s3.put_object(Bucket=bucket, Key=f"src/{key}", Body=buf.getvalue())
    return keys


def _put_model(s3, bucket: str) -> str:
    """A random-weights SR model in the bucket; returns its URI."""
    local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"model-{bucket}")
    save(build("sr", nf=32, n_blocks=4, scale=2), local, provenance={"note": "random weights (test)"})
    for name in os.listdir(local):
        s3.upload_file(os.path.join(local, name), bucket, f"models/sr/{name}")
    return f"s3://{bucket}/models/sr"


def _translate_entry(bucket: str, model: str, *extra: str) -> list[str]:
    # One actor of 1.5 CPUs per node of 2 CPUs (see test_batch_job_runs_model_actors_on_both_nodes).
    return ["python", "jobs/translate.py", f"s3://{bucket}/src", f"s3://{bucket}/dst", "--model", model,
            "--actors", "2", "--cpus-per-actor", "1.5", "--batch-size", "1", *extra]


def _outputs(s3, bucket) -> list[str]:
    return [k for k in _s3_keys(s3, bucket, "dst/") if not k.startswith("dst/_manifest/")]


def _rows(s3, bucket) -> list[dict]:
    """Every manifest row under dst/, read from the store itself (no client-side listing cache)."""
    import pyarrow.parquet as pq

    parts = [k for k in _s3_keys(s3, bucket, "dst/_manifest/") if k.rsplit("/", 1)[-1].startswith("part-")]
    return [r for k in parts for r in pq.read_table(io.BytesIO(
        s3.get_object(Bucket=bucket, Key=k)["Body"].read())).to_pylist()]


def _check_outputs(s3, bucket, rows: list[dict]) -> None:
    """Each ok row's output is in the bucket with the size and checksum the row records."""
    import hashlib

    for r in rows:
        body = s3.get_object(Bucket=bucket, Key=r["output_uri"].removeprefix(f"s3://{bucket}/"))["Body"].read()
        assert (len(body), hashlib.sha256(body).hexdigest()) == (r["output_bytes"], r["output_sha256"]), r["key"]


def _model_actor_titles(cluster, node: int) -> list[str]:
    """Process titles of the model actors on dev node ``node`` (Ray's: `ray::<actor>.<method>` while in a call)."""
    titles = []
    for pid in cluster["dev"]("pids", str(node)).stdout.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().decode(errors="replace")
        except OSError:
            continue
        if "FusedStage" in title:
            titles.append(title)
    return titles


def _job_ended(client, sid: str):
    status = client.get_job_status(sid).value
    return status if status in TERMINAL else None


def test_batch_job_finishes_after_losing_the_worker_node(dev_cluster, bucket, s3_server):
    """A worker node dies (spot preemption, a failed host) while its model actor holds blocks, and nothing
    replaces it. Either Ray's retries of those blocks fail at once (the node is gone) and the driver retries
    their inputs on what is left of the cluster, which cannot hold --actors 2 any more; or the actor is
    restarted on the head once the head's own actor is let go, and runs them there. Either way every input
    ends with exactly one ok row and its output."""
    from ray.job_submission import JobSubmissionClient

    s3 = boto3.client("s3", endpoint_url=s3_server)
    n = 32
    keys = _put_inputs(s3, bucket, n)
    entry = _translate_entry(bucket, _put_model(s3, bucket))
    r = submit(dev_cluster, *entry, extra=("--no-wait",))
    assert r.returncode == 0, r.stdout + r.stderr
    sid = r.stdout.strip().split()[-1]
    client = JobSubmissionClient(dev_cluster["dashboard"])
    nodes = _alive_nodes(dev_cluster)

    def worker_actor_busy():
        assert not _job_ended(client, sid), client.get_job_logs(sid)[-3000:]
        in_call = any(t.split("\0")[0].endswith(".submit") for t in _model_actor_titles(dev_cluster, 1))
        return in_call and len(_outputs(s3, bucket)) >= 2
    wait_for(worker_actor_busy, "the worker node's model actor in a call, after the first outputs", 240,
             every_s=0.2)
    killed = dev_cluster["dev"]("kill-worker", "1")
    written = len(_outputs(s3, bucket))
    assert "killed worker node 1" in killed.stdout
    try:
        status = wait_for(lambda: _job_ended(client, sid), "the job to end", 300, every_s=1)
        logs = client.get_job_logs(sid)
        assert status == "SUCCEEDED", logs[-4000:]
        lost = nodes - _alive_nodes(dev_cluster)
    finally:
        dev_cluster["dev"]("add-worker", "1")      # for the tests after this one
    assert written < n, "the run was over before the node was lost"
    rows = _rows(s3, bucket)
    assert sorted(r["key"] for r in rows) == sorted(keys)           # one row per input, none twice
    assert {r["status"] for r in rows} == {"ok"}
    assert len(lost) == 1 and lost <= {r["node_id"] for r in rows}  # the lost node had done part of the work
    assert sorted(_outputs(s3, bucket)) == sorted(f"dst/{k}" for k in keys)
    _check_outputs(s3, bucket, rows)
    run_id = rows[0]["run_id"]
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"dst/_manifest/{run_id}/summary.json")["Body"].read())
    assert summary["counts"] == {"ok": n} and summary["failed"] == 0


def _drivers_of(bucket: str) -> list[int]:
    """PIDs of this machine's processes that run a translate job on ``bucket``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "jobs/translate.py" in argv and f"s3://{bucket}/src" in argv:
            pids.append(int(pid))
    return pids


def test_batch_job_driver_node_lost_then_rerun_finishes_the_rest(dev_cluster, bucket, s3_server):
    """The head node dies mid-run with the job's driver on it (and with it the cluster: its GCS is there). The
    cluster is started again and the same command submitted: the killed run's lease is taken over at once (its
    holder's process is gone from this machine), and the rerun does exactly the inputs the killed run had not
    recorded."""
    from ray.job_submission import JobSubmissionClient

    s3 = boto3.client("s3", endpoint_url=s3_server)
    n = 36
    keys = _put_inputs(s3, bucket, n)
    entry = _translate_entry(bucket, _put_model(s3, bucket), "--shard-size", "6")
    r = submit(dev_cluster, *entry, extra=("--no-wait",))
    assert r.returncode == 0, r.stdout + r.stderr
    sid = r.stdout.strip().split()[-1]
    client = JobSubmissionClient(dev_cluster["dashboard"])

    def a_shard_recorded():                 # a shard's part and its complete marker are in DST
        assert not _job_ended(client, sid), client.get_job_logs(sid)[-3000:]
        markers = _s3_keys(s3, bucket, "dst/_manifest/_shards/")
        return any(json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read())["complete"] for k in markers)
    wait_for(a_shard_recorded, "the first shard to be recorded", 240, every_s=0.2)
    drivers = _drivers_of(bucket)
    assert len(drivers) == 1, drivers
    killed = dev_cluster["dev"]("kill-head")
    assert "killed the head node" in killed.stdout
    wait_for(lambda: not _drivers_of(bucket), "the driver to be gone", 30)
    before = _rows(s3, bucket)              # what the killed run recorded
    recorded = {r["key"] for r in before}
    assert {r["status"] for r in before} == {"ok"} and len(recorded) == len(before)
    assert 0 < len(recorded) < n, "the run was over before its node was lost"
    lease = json.loads(s3.get_object(Bucket=bucket, Key="dst/_manifest/LEASE")["Body"].read())
    assert lease["pid"] == drivers[0] and lease["expires"] > time.time() + 30   # left behind, far from expiry

    dev_cluster["dev"]("stop")              # the worker node (it would end by itself once the GCS is gone)
    dev_cluster["dev"]("start", "1")
    again = submit(dev_cluster, *entry)
    assert again.returncode == 0 and "SUCCEEDED" in again.stdout, again.stdout[-4000:] + again.stderr[-2000:]
    rows = _rows(s3, bucket)
    first, second = sorted({r["run_id"] for r in rows})
    redone = [r for r in rows if r["run_id"] == second]
    assert sorted(r["key"] for r in redone) == sorted(set(keys) - recorded)   # the rest, each once; no more
    assert {r["status"] for r in redone} == {"ok"}
    summary = json.loads(s3.get_object(Bucket=bucket, Key=f"dst/_manifest/{second}/summary.json")["Body"].read())
    assert summary["counts"] == {"ok": n - len(recorded), "skipped_done": len(recorded)}
    started = datetime.datetime.fromisoformat(summary["finished_at"]).timestamp() - summary["wall_s"]
    assert started < lease["expires"]       # the killed run's lease was taken over, not waited out
    assert sorted(_outputs(s3, bucket)) == sorted(f"dst/{k}" for k in keys)
    _check_outputs(s3, bucket, rows)

