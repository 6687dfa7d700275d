"""The GPU and cluster path, shown on CPU (issue 26): resource planning on clusters that grow, the device a model
actor picks, GPU actors where CUDA is unusable (Ray's logical GPUs), a sticky CUDA error, and the cluster
manifests' images and memory. The same code on a real GPU: tests/test_gpu.py (marker gpu)."""

import os
import subprocess
import sys

import pyarrow as pa
import pytest
import torch
import yaml

from imgxlate.infer import predictor
from imgxlate.infer.config import TranslateConfig
from imgxlate.infer.raydata import resolve_resources
from imgxlate.infer.stages import ModelStage

from conftest import photo
from fixtures import png, write_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(resources, **kw):
    r = resolve_resources(TranslateConfig(src="a", dst="b", model="bicubic", **kw), resources=resources)
    return r.pipeline, r.actors, r.max_actors, r.gpus_per_actor


def test_the_actor_pool_follows_a_cluster_that_grows():
    # An autoscaling cluster with no GPU node yet: one GPU actor to start, as many as the cluster will give.
    assert _plan({"CPU": 8}, gpus_per_actor=1) == ("split", 1, None, 1)
    assert _plan({"CPU": 32, "GPU": 4}) == ("split", 4, None, 1)
    assert _plan({"CPU": 32, "GPU": 4}, max_actors=16) == ("split", 4, 16, 1)
    assert _plan({"CPU": 32, "GPU": 4}, actors=2) == ("split", 2, 2, 1)            # --actors alone: a fixed pool
    assert _plan({"CPU": 32, "GPU": 4}, actors=2, max_actors=8) == ("split", 2, 8, 1)
    # CPU actors on a GPU cluster: --gpus-per-actor 0 (a fixed pool, one actor per CPU, fused)
    assert _plan({"CPU": 32, "GPU": 4}, gpus_per_actor=0) == ("fused", 32, 32, 0)
    assert _plan({"CPU": 4}, max_actors=12) == ("fused", 4, 12, 0)
    fit = resolve_resources(TranslateConfig(src="a", dst="b", model="bicubic", actors=8), fit=True,
                            resources={"CPU": 32, "GPU": 2})
    assert (fit.actors, fit.max_actors) == (2, 2)                # the lost-block retry: what the cluster holds now


def test_a_cpu_actor_on_a_gpu_node_never_takes_gpu_0(monkeypatch):
    """Ray leaves CUDA_VISIBLE_DEVICES unset for a zero-GPU worker: the actor must still run on its CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)         # a GPU node, as this actor sees it
    assert predictor.choose_device(None) == "cuda"
    stage = ModelStage(model="bicubic", scale=2, options={"amp": "off"}, threads=1, max_output_pixels=10**8,
                       batch_size=4, env={}, gpus=0)
    assert stage.predictor.device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows what a node whose CUDA is unusable does")
def test_a_gpu_actor_where_cuda_is_unusable_is_refused_not_run_on_the_cpu():
    with pytest.raises(predictor.CudaUnusable, match="cannot use a GPU here.*--gpus-per-actor 0"):
        predictor.choose_device(1)
    with pytest.raises(predictor.CudaUnusable):
        ModelStage(model="bicubic", scale=2, options={"amp": "off"}, threads=1, max_output_pixels=10**8,
                   batch_size=4, env={}, gpus=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows what a node whose CUDA is unusable does")
def test_the_job_on_logical_gpus_without_cuda_stops_with_exit_2_before_any_work(tmp_path):
    """Ray's logical GPUs on this CPU machine stand for GPU nodes whose driver the pinned CUDA build cannot use.
    Before, the actors ran the model on the CPU, on one thread, and nothing said so."""
    write_tree(tmp_path / "src", {"a.png": png(photo(16, 16))})
    code = ("import logging, sys, ray; ray.init(address='local', num_cpus=2, num_gpus=1, include_dashboard=False, "
            "logging_level=logging.WARNING); from imgxlate.cli import main; rc = main(sys.argv[1:]); "
            "ray.shutdown(); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "translate", str(tmp_path / "src"), str(tmp_path / "dst"),
                        "--model", "bicubic", "--scale", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--gpus-per-actor 1" in r.stderr and "cannot use a GPU here" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "dst" / "a.png").exists()


class _Broken(torch.nn.Module):
    """A model whose device failed for good: every call raises what CUDA raises after an illegal access."""
    task, scale = "sr", 2

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                           "asynchronously reported at some other API call")


def test_a_sticky_cuda_error_ends_the_actor_instead_of_failing_every_later_input(monkeypatch):
    model = _Broken()
    p = predictor.Predictor(model, device="cpu", options=predictor.PredictOptions(amp="off"))
    cpu = p.run([(photo(8, 8), None)])             # on a CPU the same words are one image's error
    assert isinstance(cpu[0], RuntimeError) and model.calls == 1
    p.on_gpu, model.calls = True, 0                # as on a GPU
    images = [(photo(8, 8, seed=i), None) for i in range(4)]
    with pytest.raises(predictor.DeviceFailed, match="illegal memory access"):
        p.run(images)
    assert model.calls == 1                      # not retried image by image: it is not one image's error

    stage = ModelStage(model="bicubic", scale=2, options={"amp": "off"}, threads=1, max_output_pixels=10**8,
                       batch_size=4, env={}, gpus=0)
    stage.predictor = p
    stage.die(RuntimeError("broken"))            # not a Ray actor (a notebook's MapImages): nothing ends
    died = []
    monkeypatch.setattr(ModelStage, "die", staticmethod(lambda e: died.append(e)))     # instead of os._exit
    from imgxlate.infer.stages import FLIGHT, Rows, decode_into

    rows = Rows(pa.table({"key": ["a", "b"]}))
    for row in rows:
        decode_into(row, png(photo(8, 8)), 10**6)
    with pytest.raises(predictor.DeviceFailed):
        stage(rows.table(FLIGHT))
    assert len(died) == 1                        # the actor exits: Ray restarts it and retries the block


# ------------------------------------------------------------------------------------------- manifests
def test_the_launcher_runs_the_projects_image_on_an_ami_whose_driver_runs_the_pinned_torch():
    with open(os.path.join(ROOT, "cluster", "aws.yaml")) as f:
        cfg = yaml.safe_load(f)
    kube = yaml.safe_load(open(os.path.join(ROOT, "cluster", "kuberay", "rayjob-translate.yaml")))
    image = kube["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert cfg["docker"]["image"] == image                       # one image: cluster/Dockerfile's
    for name, t in cfg["available_node_types"].items():
        ami = t["node_config"].get("ImageId", "")
        # Not the launcher's default (an old DLAMI: CUDA 11, Python < 3.10): the base DLAMI with the NVIDIA
        # driver, newest of its family; the pinned torch's CUDA 13 build needs driver 580 or later.
        assert ami.startswith("resolve:ssm:/aws/service/deeplearning/ami/") and "nvidia-driver" in ami, name
    dockerfile = open(os.path.join(ROOT, "cluster", "Dockerfile")).read()
    assert "FROM rayproject/ray:2.58.0-py311" in dockerfile and "580" in dockerfile
    pins = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert '"torch==2.14.1"' in pins                              # the build whose driver need is stated above


def test_kuberay_pods_give_the_object_store_shared_memory_and_fit_their_nodes():
    node_gib = {"g6.xlarge": 16, "g6e.12xlarge": 384}
    for name in ("rayjob-translate.yaml", "rayjob-train-sr.yaml"):
        cluster = yaml.safe_load(open(os.path.join(ROOT, "cluster", "kuberay", name)))["spec"]["rayClusterSpec"]
        for g in cluster["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            c = pod["containers"][0]
            shm = [v for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"]
            mounted = {"name": shm[0]["name"], "mountPath": "/dev/shm"} if shm else None
            assert mounted in c.get("volumeMounts", []), (name, g["groupName"])
            mem = c["resources"]["limits"]["memory"]
            assert mem.endswith("Gi") and c["resources"]["requests"]["memory"] == mem
            node = (pod.get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")
            if node in node_gib:              # the kubelet's reserve and the daemonsets take 1.5-2.5 GiB of a node
                assert int(mem[:-2]) <= node_gib[node] * 0.8, (name, g["groupName"], mem)
            store = g["rayStartParams"].get("object-store-memory")
            if store:
                assert int(store) <= int(shm[0]["emptyDir"]["sizeLimit"][:-2]) * 2**30


# -------------------------------------------------------------------------------------------- training
def test_training_feeds_a_gpu_from_several_cpus_into_pinned_memory():
    from imgxlate.cli import build_parser, train_config
    from imgxlate.train.ray_train import loader_options

    gpu = train_config(build_parser().parse_args(["train", "sr", "data", "--gpu"]), "sr")
    cpu = train_config(build_parser().parse_args(["train", "sr", "data"]), "sr")
    assert (gpu.cpus_per_worker, cpu.cpus_per_worker) == (4.0, 1.0)
    opts = loader_options(gpu, "cuda:0")
    assert {k: opts[k] for k in ("num_workers", "pin_memory", "persistent_workers")} == \
        {"num_workers": 3, "pin_memory": True, "persistent_workers": True}
    assert loader_options(cpu, "cpu") == {"num_workers": 0}      # a CPU worker's CPUs compute the model


def test_loader_processes_that_live_across_epochs_get_each_epoch_and_keep_their_cache(tmp_path):
    """Persistent DataLoader processes hold their own copy of the dataset: set_epoch in the main process never
    reaches them, so the epoch (which seeds the crops) travels with each index; each keeps its cache (a share
    of the budget) from one epoch to the next."""
    from PIL import Image
    from torch.utils.data import DataLoader, SequentialSampler

    from imgxlate.train.data import EpochSampler, ImageCache, SrDataset, split_cache

    uris = []
    for i in range(2):
        Image.fromarray(photo(40, 40, seed=i)).save(tmp_path / f"{i}.png")
        uris.append(str(tmp_path / f"{i}.png"))
    ds = SrDataset(uris, 2, 32, samples_per_image=2, cache=ImageCache(64))
    sampler = EpochSampler(SequentialSampler(ds))
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True,
                        worker_init_fn=split_cache)
    got = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        got.append(next(iter(loader))[1])
        ref = torch.stack([ds[(epoch, i)][1] for i in range(4)])
        assert torch.equal(got[-1], ref)                      # what the main process makes for that epoch
    assert not torch.equal(got[0], got[1])                    # new crops each epoch


def test_the_loop_reads_the_loss_once_per_epoch_yet_stops_on_a_non_finite_one():
    """No host sync per step (.item(), float(grad norm)): logs stay tensors, summed where they are; a loss that
    becomes NaN still stops the run, within SYNC_EVERY steps."""
    from imgxlate.train import loop

    class Objective(torch.nn.Module):
        def forward(self, model, batch):
            loss = model(batch[0]).square().mean()
            return loss, {"loss": loss.detach()}

    step = loop.Trainer(torch.nn.Linear(2, 1), Objective(), [(torch.rand(4, 2),)], loop.LoopConfig(epochs=1))
    logs = step.train_step((torch.rand(4, 2),))
    assert all(isinstance(v, torch.Tensor) for v in logs.values()) and "grad_norm" in logs
    trainer = loop.Trainer(torch.nn.Linear(2, 1), Objective(), [(torch.rand(4, 2),)] * 3, loop.LoopConfig(epochs=2))
    history = trainer.fit()
    assert isinstance(history[-1]["train_loss"], float) and isinstance(history[-1]["train_grad_norm"], float)

    batches = [(torch.rand(4, 2),)] * (loop.SYNC_EVERY + 10)
    batches[7] = (torch.full((4, 2), float("nan")),)
    with pytest.raises(FloatingPointError, match=f"between steps 1 and {loop.SYNC_EVERY}"):
        loop.Trainer(torch.nn.Linear(2, 1), Objective(), batches, loop.LoopConfig(epochs=1)).fit()


def test_validation_is_shared_by_the_workers_and_gives_the_same_scores(tmp_path):
    """Each worker scores its own share of the held-out images (gathered after), instead of rank 0 scoring them all
    while the others wait in a collective; the shares are the whole set, and each image keeps its degradation."""
    from PIL import Image

    from imgxlate.infer.predictor import Predictor
    from imgxlate.models import build
    from imgxlate.train.tasks import FP32, RunConfig, SrTask, Stage

    (tmp_path / "train").mkdir()
    for i in range(40):
        Image.fromarray(photo(40, 36, seed=i)).save(tmp_path / "train" / f"{i}.png")
    cfg = RunConfig(task="sr", data=str(tmp_path / "train"), hr_crop=32, degradations="restore")
    td = SrTask().stage_data(cfg, Stage(epochs=1), "cpu")
    torch.manual_seed(0)
    model = build("sr", preset="tiny", scale=2)
    p = Predictor(model, device="cpu", contract=td.contract, options=FP32)
    n = len(td.plan.val)
    whole = td._validate(p, 0, n)
    shares = [r for k in range(3) for r in td._validate(p, n * k // 3, n * (k + 1) // 3)]
    assert n >= 4 and shares == whole
    assert td.evaluate(model) == pytest.approx(td.summarise(whole))


def test_gram_matrices_survive_fp16_autocast():
    """fp16 style training overflowed to inf at its first step: a Gram matrix sums h*w products (here ~900 each,
    3.7M in all, past fp16's 65504) before it is divided. It is computed in fp32 whatever the autocast."""
    from imgxlate.losses import gram

    x = torch.full((1, 4, 64, 64), 30.0)
    with torch.autocast("cpu", dtype=torch.float16):
        g = gram(x.half())
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert torch.allclose(g, gram(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA works here: the probe passes")
def test_training_on_logical_gpus_without_cuda_stops_with_exit_2_before_any_worker(tmp_path):
    """`imgxlate train --gpu` probes CUDA on a GPU as the batch job does: on GPU nodes whose driver the pinned build
    cannot use, one line and exit 2 instead of every worker failing and being retried."""
    from imgxlate.samples import write_sample_photos

    write_sample_photos(str(tmp_path / "photos"), max_side=96)
    code = ("import logging, sys, ray; ray.init(address='local', num_cpus=8, num_gpus=2, include_dashboard=False, "
            "logging_level=logging.WARNING); from imgxlate.cli import main; rc = main(sys.argv[1:]); "
            "ray.shutdown(); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "train", "sr", str(tmp_path / "photos"), "--gpu", "--preset",
                        "tiny", "--hr-crop", "32", "--storage", str(tmp_path / "runs"), "--epochs", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--gpu: " in r.stderr and "train without --gpu" in r.stderr, r.stderr[-3000:]
    assert not list((tmp_path / "runs").glob("*/checkpoint_*"))
