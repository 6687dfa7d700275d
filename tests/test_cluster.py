"""Cluster configs and multi-node runs: a head and a worker node on 127.0.0.1 (cluster/dev-cluster.sh),
jobs submitted through the Ray Jobs API with a working_dir (jobs/submit.py), data in the S3 test server."""

import copy
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
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
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
    with pytest.raises(SystemExit, match="credential"):
        submit.check_no_secrets(["python", "jobs/translate.py", "--x", "AWS_SECRET_ACCESS_KEY=abc"], env)


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
