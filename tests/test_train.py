"""Training on Ray Train with 2 workers (gloo on CPU), on scikit-image's photos and generated masks."""

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imgxlate import metrics
from imgxlate.artifact import load, read_meta
from imgxlate.cli import main
from imgxlate.io import storage
from imgxlate.samples import write_sample_photos
from imgxlate.train import ray_train
from imgxlate.train.loop import LoopConfig
from imgxlate.train.run import parse_stages, train
from imgxlate.train.tasks import RunConfig, Stage

from conftest import photo
from fixtures import own

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    paths = write_sample_photos(str(root / "all"), max_side=256)
    (root / "train").mkdir()
    (root / "val").mkdir()
    for p in paths:
        dst = root / ("val" if "coffee" in p else "train") / os.path.basename(p)
        os.replace(p, dst)
    return root


def sr_config(photos, tmp_path, **kw):
    base = dict(task="sr", data=str(photos / "train"), val=str(photos / "val"), name="sr",
                storage=str(tmp_path / "runs") if tmp_path else None,
                preset="tiny", loop=LoopConfig(epochs=3, lr=1e-3), batch_size=8, workers=2, hr_crop=64,
                samples_per_image=12)
    base.update(kw)
    return RunConfig(**base)


def history(cfg):
    text = storage.read_bytes(storage.join(ray_train.run_dir(cfg), "imgxlate", "metrics.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def test_tiny_sr_run_beats_bicubic_and_writes_a_usable_artifact(photos, tmp_path, ray_local):
    cfg = sr_config(photos, tmp_path, loop=LoopConfig(epochs=4, lr=1e-3))
    out = train(cfg)
    h = out["history"]
    assert len(h) == 4 and h[-1]["val_psnr"] > h[-1]["val_psnr_bicubic"] + 0.01
    assert h[-1]["val_psnr"] > h[0]["val_psnr"]
    model = load(out["artifact"])
    assert model.scale == 2 and model.meta["provenance"]["workers"] == 2
    assert model.meta["provenance"]["global_batch"] == 16 and model.meta["metrics"]["val_psnr"] > 0
    cost = model.meta["precision_cost"]["bf16"]          # measured at export on the held-out images: --amp auto
    assert abs(cost["psnr_db"]) < 0.5 and "held-out" in cost["on"]
    assert os.path.getsize(out["curves"]) > 5000
    # The batch job takes the artifact as it is.
    assert main(["translate", str(photos / "val"), str(tmp_path / "up"), "--model", out["artifact"]]) == 0
    w, h = Image.open(photos / "val" / "coffee.png").size
    assert Image.open(tmp_path / "up" / "coffee.png").size == (2 * w, 2 * h)


@pytest.fixture(scope="module")
def t91_like(tmp_path_factory):
    """Ten crops of scikit-image's photos with T91's spread of sizes, its smallest (78 x 78) twice."""
    root = tmp_path_factory.mktemp("t91")
    photos = [Image.open(p).convert("RGB") for p in write_sample_photos(str(root / "photos"), max_side=512)]
    sizes = [(78, 78), (114, 119), (150, 132), (197, 176), (245, 195), (291, 198), (336, 240), (435, 348),
             (78, 78), (218, 330)]
    (root / "T91").mkdir()
    for i, (w, h) in enumerate(sizes):
        im = photos[i % len(photos)]
        scale = max(w / im.width, h / im.height, 1.0)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        im.crop((0, 0, w, h)).save(root / "T91" / f"t{i:02d}.png")
    return root / "T91"


def test_t91_like_command_skips_small_images_and_beats_bicubic_on_held_out_images(t91_like, tmp_path, ray_local,
                                                                                    capsys):
    # The command (default 96 px HR crop), with batches small enough for a few steps per epoch.
    assert main(["train", "sr", str(t91_like), "--preset", "tiny", "--scale", "2", "--workers", "2", "--epochs", "3",
                 "--batch-size", "8", "--samples-per-image", "16", "--name", "t91", "--storage",
                 str(tmp_path / "runs")]) == 0
    assert "smaller than the 96 px HR crop and are skipped" in capsys.readouterr().err
    model = load(str(tmp_path / "runs" / "t91" / "model"))
    prov = model.meta["provenance"]
    h = history(RunConfig(task="sr", data=str(t91_like), name="t91", storage=str(tmp_path / "runs")))
    assert len(prov["held_out"]) == 1 and prov["held_out"][0] not in prov["skipped_small"]
    small = {"t00.png", "t08.png"} - set(prov["held_out"])
    assert set(prov["skipped_small"]) == small
    assert [e["data_skipped_small"] for e in h] == [len(small)] * 3
    assert all(e["data_train_images"] == 10 - 1 - len(small) and e["data_val_images"] == 1 for e in h)
    assert h[-1]["val_psnr"] > h[-1]["val_psnr_bicubic"] + 0.01     # on the held-out image (+0.05 dB when written)
    assert all(len(e["worker_peak_rss_mb"]) == 2 and min(e["worker_peak_rss_mb"]) > 50 for e in h)


def test_no_training_image_left_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "small").mkdir()
    for i in range(3):
        Image.fromarray(photo(60, 70, seed=i)).save(tmp_path / "small" / f"s{i}.png")
    assert main(["train", "sr", str(tmp_path / "small"), "--name", "small", "--storage", str(tmp_path / "runs")]) == 2
    err = own(capsys.readouterr().err)
    assert "smaller than the 96 px HR crop" in err and "--hr-crop" in err and "Traceback" not in err


RAY_NOISE = ("Traceback", "PlacementGroupCleaner", "Failed to query Ray Train Controller", "core_worker.cc",
             "gcs", "GCS", "(RayTrainWorker", "(TrainController", "Error in training function")


def test_console_shows_imgxlate_progress_and_names_the_file_ray_writes_to(photos, tmp_path):
    # A user's run, as a subprocess: Ray starts in it, its own messages go to a log file.
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "imgxlate.cli", "train", "sr", str(photos / "train"), "--preset", "tiny",
                        "--name", "quiet", "--storage", str(tmp_path / "runs"), "--workers", "2", "--epochs", "2",
                        "--batch-size", "4", "--hr-crop", "48", "--samples-per-image", "2"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    console = r.stdout + r.stderr
    assert r.returncode == 0, console[-3000:]
    log = tmp_path / "runs" / "quiet" / "imgxlate" / "ray.log"
    assert f"Ray's own messages: {log}" in console
    assert not [p for p in RAY_NOISE if p in console], console
    assert "[imgxlate] stage 1/1 epoch 1/2" in console and "[imgxlate] stage 1/1 epoch 2/2" in console  # rank 0
    assert console.count("[imgxlate] stage 1/1 epoch 2/2") == 1 and "final metrics" in console
    assert "(RayTrainWorker" in log.read_text()


def test_gpu_run_on_a_cluster_without_gpus_stops_with_a_clear_message(photos, tmp_path, ray_local, capsys):
    args = ["train", "sr", str(photos / "train"), "--preset", "tiny", "--name", "gpu", "--storage",
            str(tmp_path / "runs"), "--gpu", "--hr-crop", "48"]
    t0 = time.time()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "need {'CPU': 4.0, 'GPU': 1.0} each" in err and "0 GPUs" in err and "drop --gpu" in err   # --gpu: 4 CPUs
    assert "--wait-for-resources" in err and time.time() - t0 < 60
    t0 = time.time()
    assert main([*args, "--wait-for-resources", "3"]) == 2                 # no autoscaler here: gives up
    assert "did not grow within 3 s" in capsys.readouterr().err and 3 <= time.time() - t0 < 60
    assert not (tmp_path / "runs" / "gpu" / "model").exists()


def test_report_of_a_training_run(photos, tmp_path, ray_local, capsys):
    cfg = sr_config(photos, tmp_path, name="rep", samples_per_image=4, loop=LoopConfig(epochs=2, lr=1e-3))
    train(cfg)
    run = os.path.join(cfg.storage, "rep")
    capsys.readouterr()
    assert main(["report", run]) == 0
    text = capsys.readouterr().out
    assert "# Training run `rep`" in text and "best val_psnr" in text and "| 2 | 0 | 2 |" in text
    assert (tmp_path / "runs" / "rep" / "imgxlate" / "report.md").read_text() == text.rstrip("\n") + "\n"
    assert (tmp_path / "runs" / "rep" / "imgxlate" / "curves.png").stat().st_size > 1000


def test_progressive_x2_to_x4(photos, tmp_path, ray_local):
    stages = parse_stages("sr", "2:1,4:1:new,4:1")
    assert stages[1] == Stage(epochs=1, scale=4, train="new")
    out = train(sr_config(photos, tmp_path, stages=stages, samples_per_image=4))
    h = out["history"]
    assert [r["stage"] for r in h] == [0, 1, 2] and load(out["artifact"]).scale == 4
    assert h[1]["val_psnr_bicubic"] < h[0]["val_psnr_bicubic"]      # x4 is harder than x2


def test_rerun_with_the_same_name_resumes(photos, tmp_path, ray_local, capsys):
    cfg = sr_config(photos, tmp_path, loop=LoopConfig(epochs=1, lr=1e-3), samples_per_image=4, name="resume")
    first = ray_train.fit(cfg)
    steps = first.metrics["step"]
    cfg.loop = LoopConfig(epochs=2, lr=1e-3)
    second = ray_train.fit(cfg)
    assert second.metrics["epoch"] == 2 and second.metrics["step"] == 2 * steps   # the step counter continued
    assert [r["epoch"] for r in history(cfg)] == [1, 2]                           # epoch 1 was not redone
    # The same command passes the driver's check against the checkpoint; one asking for another model stops with
    # exit 2 before any worker.
    from imgxlate.train.run import check_data, check_resume, resume_point
    check_resume(cfg, check_data(cfg, resuming=True), resume_point(cfg))
    args = ["train", "sr", cfg.data, "--val", cfg.val, "--name", "resume", "--storage", cfg.storage, "--preset", "tiny"]
    assert main([*args, "--model-config", '{"nf": 8}']) == 2
    assert "resuming would ignore" in capsys.readouterr().err


def test_a_source_that_is_not_there_stops_training_with_one_line(tmp_path, capsys):
    for task in ("sr", "seg"):
        assert main(["train", task, str(tmp_path / "nothing"), "--storage", str(tmp_path / "runs")]) == 2
        err = own(capsys.readouterr().err)          # (an earlier test's Ray Train controller may still print)
        assert "is not a folder, prefix or manifest file" in err and "Traceback" not in err, err


def test_a_rerun_that_would_build_another_model_stops_instead_of_resuming_the_old_one(tmp_path, capsys):
    from imgxlate.models import make_config
    from imgxlate.train.run import check_resume, resume_point
    from imgxlate.train.tasks import DataError

    def check(cfg, first):                   # as train() does
        check_resume(cfg, first, resume_point(cfg))

    run = tmp_path / "r[1]"                  # glob characters in a run's name
    cfg = RunConfig(task="sr", data="x", name="r[1]", storage=str(tmp_path), stages=parse_stages("sr", "2:1,4:1"))
    tiny = make_config("sr", preset="tiny", scale=2, res_scale=1.0)
    check(cfg, ("sr", tiny))                 # no checkpoint: nothing to compare
    run.mkdir()

    def checkpoint(when: str, stage: int, config: dict, meta: bool = True, register: bool = True):
        folder = run / f"checkpoint_{when}"
        folder.mkdir()
        saved = {"stage": stage, "arch": "sr", "model_config": config}
        torch.save({**saved, "trainer": {}}, folder / "state.pt")
        if meta:
            (folder / "meta.json").write_text(json.dumps(saved))
        if register:                         # Ray Train's snapshot names the checkpoint a rerun resumes
            (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
                {"latest_checkpoint_result": {"checkpoint_dir_name": folder.name}}))

    old = dataclasses.asdict(tiny)
    del old["nf"]                            # from before a field existed, and before meta.json: defaults filled in
    checkpoint("2026-12-07_10-00-00.000000", 0, {**old, "nf": tiny.nf, "res_scale": 1}, meta=False)
    check(cfg, ("sr", tiny))                 # res_scale 1 is 1.0
    checkpoint("2026-12-07_10-05-00.000000", 1, {**dataclasses.asdict(tiny), "scale": 4})   # stage 2
    checkpoint("2026-12-07_10-09-00.000000", 1, {"nf": 99}, register=False)      # never registered: Ray ignores it
    check(cfg, ("sr", tiny))                 # what it holds is the first model grown to x4 by the plan
    wider = dataclasses.replace(tiny, nf=tiny.nf * 2)
    for rerun, words in (((cfg, ("sr", wider)), f"(stage 2); this command asks for nf {tiny.nf * 2}, which resuming"),
                         ((dataclasses.replace(cfg, stages=parse_stages("sr", "2:1,8:1")), ("sr", tiny)),
                          "resumes a model with scale 4 (stage 2); this command asks for scale 8"),
                         ((dataclasses.replace(cfg, stages=parse_stages("sr", "2:3")), ("sr", tiny)),
                          "is in stage 2; this command plans 1")):
        with pytest.raises(DataError, match=re.escape(words)):
            check(*rerun)
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-12-07_10-00-00.000000"}}))
    check(dataclasses.replace(cfg, stages=parse_stages("sr", "2:3")), ("sr", tiny))   # the one the snapshot names
    # A resumed --init run is built from its checkpoint: its --init is not read (gone since: no matter), and the
    # --model-config fields given are what is compared.
    gone = dataclasses.replace(cfg, init=str(tmp_path / "deleted-model"), stages=parse_stages("sr", "2:3"))
    check(gone, None)
    with pytest.raises(DataError, match=re.escape(f"resumes a model with nf {tiny.nf} (stage 1); this command "
                                                  f"asks for nf 64")):
        check(dataclasses.replace(gone, model={"nf": 64}), None)
    with pytest.raises(DataError, match=re.escape("this version of imgxlate cannot build (sr: unknown config")):
        (run / "checkpoint_2026-12-07_10-00-00.000000" / "meta.json").write_text(json.dumps(
            {"stage": 0, "arch": "sr", "model_config": {"gone": 1}}))
        check(cfg, ("sr", tiny))
    (run / "checkpoint_2026-12-07_10-00-00.000000" / "meta.json").write_text("cut")
    check(cfg, ("sr", wider))                # unreadable: a warning; the workers fail on it and say why
    assert "checkpoint cannot be read" in capsys.readouterr().err
    (run / "checkpoint_manager_snapshot.json").unlink()
    assert resume_point(cfg) is None         # no snapshot: Ray Train starts the run afresh


def test_a_second_training_of_a_run_stops_while_the_first_holds_it(photos, tmp_path, capsys):
    from imgxlate.io.lease import Lease

    args = ["train", "sr", str(photos / "train"), "--preset", "tiny", "--name", "twice", "--storage",
            str(tmp_path / "runs"), "--hr-crop", "48"]
    with Lease(str(tmp_path / "runs" / "twice"), "twice", folder="imgxlate"):     # the first training's driver
        assert main(args) == 2
    err = own(capsys.readouterr().err)
    assert "run 'twice' in" in err and "is being trained by another process" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "twice" / "imgxlate" / "LEASE").exists()            # released


def test_a_metrics_line_cut_short_is_dropped_when_the_next_epoch_is_written(tmp_path):
    cfg = RunConfig(task="sr", data="x", name="m", storage=str(tmp_path))
    (tmp_path / "m" / "imgxlate").mkdir(parents=True)
    (tmp_path / "m" / "imgxlate" / "metrics.jsonl").write_text('{"stage": 0, "global_step": 10, "epoch": 1}\n'
                                                               '{"stage": 0, "glo\n')   # a full disk
    ray_train._append_metrics(cfg, {"stage": 0, "global_step": 20, "epoch": 2})
    assert [e["epoch"] for e in history(cfg)] == [1, 2]


def _worker_pids():
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if b"RayTrainWorker" in open(f"/proc/{pid}/cmdline", "rb").read():
                    pids.append(int(pid))
            except OSError:
                pass
    return pids


def test_killed_worker_is_recovered(photos, tmp_path, ray_local):
    cfg = sr_config(photos, tmp_path, loop=LoopConfig(epochs=6, lr=1e-3), samples_per_image=6, name="kill")
    result, killed = {}, []
    t = threading.Thread(target=lambda: result.setdefault("r", ray_train.fit(cfg)))
    t.start()
    run = tmp_path / "runs" / "kill"
    deadline = time.time() + 300
    while t.is_alive() and time.time() < deadline and not killed:
        if any(run.glob("checkpoint_*")) and _worker_pids():
            killed.append(_worker_pids()[-1])
            os.kill(killed[0], signal.SIGKILL)
        time.sleep(0.1)
    t.join(600)
    assert killed, "no worker was killed"
    r = result["r"]
    assert r.error is None and r.metrics["epoch"] == 6
    assert [h["epoch"] for h in history(cfg)][-1] == 6


def test_checkpoints_land_in_the_s3_test_server(photos, bucket, s3_server, ray_local):
    import boto3

    cfg = sr_config(photos, None, storage=f"s3://{bucket}/runs", name="s3run", samples_per_image=2,
                    loop=LoopConfig(epochs=1, lr=1e-3))
    out = train(cfg)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("runs/s3run/checkpoint_") and k.endswith("state.pt") for k in keys)
    assert "runs/s3run/model/config.json" in keys and "runs/s3run/imgxlate/curves.png" in keys
    assert load(out["artifact"]).scale == 2


def make_seg_data(root, n_cars=6, angles=2, size=64):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for car in range(n_cars):
        for a in range(angles):
            yy, xx = np.mgrid[0:size, 0:size]
            cy, cx = rng.uniform(20, 44, 2)
            ry, rx = rng.uniform(8, 16, 2)
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            img = photo(size, size, seed=car * 10 + a) // 3
            img[mask] = np.clip(img[mask].astype(int) + 150, 0, 255)
            Image.fromarray(img).save(root / f"car{car:02d}_{a:02d}.jpg")
            Image.fromarray(mask.astype(np.uint8)).convert("P").save(root / f"car{car:02d}_{a:02d}_mask.gif")


def test_tiny_segmentation_run_dice_rises(tmp_path, ray_local):
    make_seg_data(tmp_path / "seg")
    cfg = RunConfig(task="seg", data=str(tmp_path / "seg"), name="seg", storage=str(tmp_path / "runs"),
                    model={"encoder_weights": "none"}, stages=parse_stages("seg", "64:3:frozen,64:3"),
                    loop=LoopConfig(epochs=3, lr=2e-3), batch_size=4, workers=2, val_fraction=0.34)
    out = train(cfg)
    h = out["history"]
    assert h[-1]["val_dice"] > h[0]["val_dice"] and h[-1]["val_dice"] > 0.6
    assert cfg.stages[1].bn_freeze and cfg.stages[1].lr_ratios == (0.1, 1.0)
    # `eval seg` on the held-out cars (the run's own split) agrees with the run's last validation Dice, which
    # is measured in fp32 (bf16's cost is measured apart, at export: precision_cost).
    assert abs(read_meta(out["artifact"])["precision_cost"]["bf16"]["dice"]) < 0.05
    ev = tmp_path / "eval"
    assert main(["eval", "seg", "--model", out["artifact"], "--data", str(tmp_path / "seg"), "--split", "val",
                 "--worst", "2", "--out", str(ev), "--amp", "off"]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["images"] == 4 and summary["size"] == 64
    assert summary["mean"]["dice"] == pytest.approx(h[-1]["val_dice"], abs=1e-4)
    # The batch job's masks for the same held-out images score the same Dice (one inference contract).
    rows = list(csv.DictReader((ev / "seg.csv").open()))
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{tmp_path / 'seg' / r['image']}\n" for r in rows))
    assert main(["translate", str(listing), str(tmp_path / "masks"), "--model", out["artifact"], "--amp", "off"]) == 0
    job_dice = [metrics.dice(np.asarray(Image.open(tmp_path / "masks" / r["image"].replace(".jpg", ".png"))) > 0,
                             np.asarray(Image.open(tmp_path / "seg" / r["mask"])) > 0) for r in rows]
    assert np.mean(job_dice) == pytest.approx(h[-1]["val_dice"], abs=1e-4)
    assert (ev / "worst.png").exists() and len(list((ev / "overlays").glob("*.png"))) == 2


def test_resume_inside_a_frozen_stage_with_two_workers(tmp_path, ray_local):
    # Two steps per epoch and worker: DDP must not wait for gradients of the frozen encoder, in a stage
    # resumed from its checkpoint and in the unfrozen stage after it.
    make_seg_data(tmp_path / "seg")
    cfg = RunConfig(task="seg", data=str(tmp_path / "seg"), name="frozen", storage=str(tmp_path / "runs"),
                    model={"encoder_weights": "none"}, stages=parse_stages("seg", "48:1:frozen"),
                    loop=LoopConfig(epochs=1, lr=2e-3), batch_size=2, workers=2, val_fraction=0.34, max_failures=0)
    first = ray_train.fit(cfg)
    assert first.error is None and first.metrics["step"] == 2
    cfg.stages = parse_stages("seg", "48:2:frozen,48:1")
    second = ray_train.fit(cfg)
    assert second.error is None, second.error
    assert [(h["stage"], h["epoch"], h["global_step"]) for h in history(cfg)] == [(0, 1, 2), (0, 2, 4), (1, 1, 2)]
    saved = ray_train.read_checkpoint(second.checkpoint)
    assert saved["stage"] == 1 and saved["stage_done"]


def test_tiny_style_run_style_loss_falls(photos, tmp_path, ray_local):
    style = tmp_path / "style.png"
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::8] = (255, 40, 0)
    stripes[::8, :] = (0, 60, 255)
    Image.fromarray(stripes).save(style)
    cfg = RunConfig(task="style", data=str(photos / "train"), val=str(photos / "val"), name="style",
                    storage=str(tmp_path / "runs"), model={"norm": "instance"}, style_image=str(style),
                    vgg_weights="random", content_size=64, samples_per_image=4, batch_size=4, workers=2,
                    loop=LoopConfig(epochs=3, lr=2e-3))
    out = train(cfg)
    h = out["history"]
    assert "style_loss" in read_meta(out["artifact"])["precision_cost"]["bf16"]
    style_terms = [k for k in h[0] if k.startswith("val_style_")]
    assert len(style_terms) == 4
    assert sum(h[-1][k] for k in style_terms) < sum(h[0][k] for k in style_terms)


def test_lr_finder_writes_a_plot_and_a_finite_suggestion(photos, tmp_path, capsys):
    plot = tmp_path / "lr.png"
    assert main(["lr-find", "sr", str(photos / "train"), "--preset", "tiny", "--hr-crop", "48", "--batch-size", "4",
                 "--steps", "30", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    lr = float(text.split("suggested lr:")[1].split()[0])
    assert np.isfinite(lr) and 1e-6 <= lr <= 1.0
    assert Image.open(plot).size[0] > 300


def test_a_first_new_stage_after_a_grown_init_trains_what_the_growth_added():
    from imgxlate.train.tasks import SrTask

    cfg = RunConfig(task="sr", data="unused", init="sr-x2", model={"scale": 2, "nf": 40, "n_blocks": 9})
    model, new = SrTask().build_model(cfg, Stage(epochs=1, scale=2, train="new"), None)
    assert "body.8.body.0.weight" in new and "head.weight" in new and "upsample.0.0.weight" in new
    _, grown = SrTask().build_model(cfg, Stage(epochs=1, scale=4, train="new"), None)   # wider, then x4
    assert set(new) < set(grown) and "upsample.1.0.weight" in grown
    plain = RunConfig(task="sr", data="unused", init="sr-x2", model={"scale": 2})
    assert SrTask().build_model(plain, Stage(epochs=1, scale=2, train="new"), None)[1] == []


def test_init_of_a_style_model_takes_its_config_and_refuses_another(tmp_path):
    from imgxlate.artifact import save
    from imgxlate.cli import train_config
    from imgxlate.flags import build_parser
    from imgxlate.models import build
    from imgxlate.train.tasks import DataError
    from imgxlate.train.warmstart import initial_model

    trained = build("style", {"n_blocks": 2, "norm": "batch"})      # not the command's default norm (instance)
    save(trained, str(tmp_path / "style"))

    def first_model(*options):
        args = build_parser().parse_args(["train", "style", "x", "--style-image", "s.jpg",
                                          "--init", str(tmp_path / "style"), *options])
        return initial_model(train_config(args, "style"), "style")

    # Without a config, or with one that repeats the trained model's, it gets the trained model, weights and all.
    for options in ((), ("--norm", "batch", "--model-config", '{"n_blocks": 2}')):
        model, new = first_model(*options)
        assert new == [] and model.config == trained.config
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    # A config its weights do not fix it to is an error, never silently dropped (it was, before).
    for options, words in ((("--model-config", '{"n_blocks": 3}'), "n_blocks 3 (the trained model has 2)"),
                           (("--norm", "instance"), "norm 'instance' (the trained model has 'batch')"),
                           (("--model-config", '{"nf": 64}'), "nf 64 (no such field)")):
        with pytest.raises(DataError, match=re.escape(words)):
            first_model(*options)


def test_init_fine_tunes_a_shipped_model_grown_wider_and_a_wrong_one_stops_before_any_worker(photos, tmp_path,
                                                                                              ray_local, capsys):
    from imgxlate import zoo
    from imgxlate.artifact import read_meta

    # --model-config beside --init grows the shipped model (32 channels, 8 blocks) keeping what it computes.
    cfg = sr_config(photos, tmp_path, preset=None, init="sr-x2", loop=LoopConfig(epochs=1, lr=2e-4), hr_crop=96,
                    samples_per_image=8, name="finetune", model={"scale": 2, "nf": 40, "n_blocks": 9})
    out = train(cfg)
    tuned, shipped = read_meta(out["artifact"]), read_meta(zoo.path("sr-x2"))
    assert not (tmp_path / "runs" / "finetune" / "imgxlate" / "LEASE").exists()   # the run's lease, released
    assert tuned["config"] == {**shipped["config"], "nf": 40, "n_blocks": 9}
    assert tuned["provenance"]["config"]["init"] == "sr-x2"
    # It starts where sr-x2 is: its first validation is already well above bicubic (a random start is not).
    h = out["history"]
    assert h[0]["val_psnr"] > h[0]["val_psnr_bicubic"] + 0.3
    # A model of another task, one that cannot load, or a config its weights cannot take stops the run with exit 2
    # before Ray starts.
    for bad, config, words in (("bicubic", "{}", "a sr run starts from a trained sr model"),
                               (str(tmp_path / "nothing"), "{}", "--init"),
                               ("sr-x2", '{"nf": 16}', "a model can only grow: it has 32 channels"),
                               ("sr-x2", '{"global_residual": "none"}', "which its weights fix"),
                               ("sr-x2", '{"nf": 64.5}', "nf 64.5: a whole number"),
                               ("sr-x2 --preset edsr", "{}", "--preset / --arch cannot go with it"),
                               ("sr-x4 --scale 2", "{}", "can only grow to a larger scale than x4")):
        assert main(["train", "sr", str(photos / "train"), "--init", *bad.split(), "--model-config", config,
                     "--storage", str(tmp_path / "r2"), "--name", "bad"]) == 2
        assert words in capsys.readouterr().err
