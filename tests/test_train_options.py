"""`imgxlate train` as a careless or hostile user runs it (from a read-only review): what the driver can know is
refused or warned about before Ray starts, and a run whose loss stops being finite stops at once, with no artifact."""

import os

import numpy as np
import pytest
from PIL import Image

from imgxlate.cli import build_parser, main, train_config
from imgxlate.samples import write_sample_photos
from imgxlate.train.run import check_data, parse_stages
from imgxlate.train.tasks import DataError

from fixtures import own


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_sample_photos(str(root / "train"), max_side=128)
    return root


def _cfg(*argv):
    return train_config(build_parser().parse_args(["train", *argv]), argv[0])


def test_init_gives_its_scale_unless_another_is_asked_for(photos):
    data = str(photos / "train")
    assert _cfg("sr", data, "--init", "sr-x4").model["scale"] == 4          # was 2: then growing x4 to x2 failed
    assert _cfg("sr", data, "--init", "sr-x4", "--scale", "8").model["scale"] == 8
    assert _cfg("sr", data).model["scale"] == 2
    assert "scale" not in _cfg("sr", data, "--init", "sr-x2", "--stages", "2:1,4:1").model


def test_a_stage_plan_whose_scale_goes_down_is_refused():
    with pytest.raises(DataError, match=r"the scale goes down \(x4 -> x2\)"):
        parse_stages("sr", "4:5,2:5")
    assert [s.scale for s in parse_stages("sr", "2:1,4:1:new,4:1")] == [2, 4, 4]


def test_what_the_driver_can_check_stops_before_ray(photos, tmp_path, capsys, monkeypatch):
    """A model config that cannot be built, and a segmentation folder without masks: exit 2, one line, no Ray."""
    from imgxlate import rayenv

    def no_ray(*a, **k):
        raise AssertionError("Ray was started: the check came too late")

    monkeypatch.setattr(rayenv, "start_or_join", no_ray)
    runs = str(tmp_path / "runs")
    cases = {("sr", str(photos / "train"), "--model-config", '{"nf": "64"}'): "the model cannot be built",
             ("style", str(photos / "train"), "--style-image", str(photos / "train" / "astronaut.png"),
              "--model-config", '{"norm": "group"}'): "unknown norm 'group'",
             ("seg", str(photos / "train")): "no image/mask pairs found"}
    for argv, words in cases.items():
        assert main(["train", *argv, "--storage", runs]) == 2, argv
        err = own(capsys.readouterr().err).strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)


def test_an_unreadable_training_image_is_left_out_with_a_warning_and_a_val_overlap_is_said(photos, tmp_path, capsys):
    data = tmp_path / "data"
    write_sample_photos(str(data), max_side=128)
    (data / "broken.png").write_bytes(b"<html>not an image</html>")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(data / "tiny.png")
    cfg = _cfg("sr", str(data), "--hr-crop", "32", "--storage", str(tmp_path / "runs"))
    check_data(cfg)
    err = capsys.readouterr().err
    assert "1 images cannot be read and are left out, e.g." in err and "broken.png" in err
    cfg = _cfg("sr", str(data), "--val", str(data), "--hr-crop", "32", "--storage", str(tmp_path / "runs"))
    check_data(cfg)
    assert "of the 9 --val images are training images too" in capsys.readouterr().err


def test_a_diverging_run_stops_at_once_with_one_line_and_no_artifact(photos, tmp_path, capsys, ray_local):
    runs = tmp_path / "runs"
    code = main(["train", "sr", str(photos / "train"), "--preset", "tiny", "--storage", str(runs), "--name", "nan",
                 "--lr", "1e30", "--clip-grad", "0", "--hr-crop", "32", "--batch-size", "4", "--epochs", "1",
                 "--samples-per-image", "8", "--amp", "off"])
    err = own(capsys.readouterr().err)
    assert code == 1, err
    line = [x for x in err.splitlines() if "training diverged" in x]
    assert line and "loss became" in line[0] and "lower --lr (now 1e+30" in line[0], err
    assert "Traceback" not in err and not os.path.exists(runs / "nan" / "model")


def test_a_rerun_with_another_lr_trains_at_that_lr_from_where_it_stopped():
    """The one-cycle curve is linear in its peak: a resumed run at 10x --lr is at 10x the LR it stopped at, with
    the new peak, floor and weight decay (DESIGN.md: epochs, LR and data may change on a rerun)."""
    import torch
    from torch import nn

    from imgxlate.train.loop import LoopConfig, Trainer

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(32, 1)), batch_size=8)
    first = Trainer(nn.Linear(1, 1), nn.L1Loss(), loader, LoopConfig(epochs=2, lr=1e-3, weight_decay=1e-4))
    for _ in range(3):
        first.optimizer.step()
        first.scheduler.step()
    state = first.state_dict()
    again = Trainer(nn.Linear(1, 1), nn.L1Loss(), loader, LoopConfig(epochs=2, lr=1e-2, weight_decay=0.0))
    again.load_state_dict(state)
    g, f = again.optimizer.param_groups[0], first.optimizer.param_groups[0]
    assert g["lr"] == pytest.approx(10 * f["lr"]) and g["max_lr"] == pytest.approx(10 * f["max_lr"])
    assert g["weight_decay"] == 0.0 and again.scheduler.last_epoch == first.scheduler.last_epoch
    same = Trainer(nn.Linear(1, 1), nn.L1Loss(), loader, LoopConfig(epochs=2, lr=1e-3, weight_decay=1e-4))
    same.load_state_dict(state)
    assert same.optimizer.param_groups[0]["lr"] == pytest.approx(f["lr"])


def test_eval_seg_split_val_holds_out_what_a_limited_training_run_held_out(tmp_path):
    """Training with --limit N splits the first N pairs; eval's --split val (from the artifact's provenance) does
    the same, so it never scores a car the model trained on."""
    from imgxlate import evaluate, pairing

    for car in range(6):
        for view in range(2):
            Image.fromarray(np.full((8, 8, 3), 30 * car, np.uint8)).save(tmp_path / f"car{car}_{view}.jpg")
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"car{car}_{view}_mask.png")
    trained = evaluate.training_seg_settings({"provenance": {"config": {"val_fraction": 0.5, "seed": 0, "limit": 6}}})
    assert trained["limit"] == 6
    listed = [str(p) for p in sorted(tmp_path.iterdir())]
    first = pairing.pair_segmentation(listed, limit=6)
    train, val = pairing.grouped_split(first, 0.5, seed=0)          # what training held out
    scored = evaluate.seg_pairs(str(tmp_path), "val", **trained)
    assert sorted(scored) == sorted(val) and not set(scored) & set(train)
    assert len(evaluate.seg_pairs(str(tmp_path), "all", **trained)) == 12      # --split all: every pair


def test_eval_style_names_a_recorded_style_image_that_is_gone(photos, tmp_path, capsys):
    from imgxlate.artifact import save
    from imgxlate.models import build

    save(build("style"), str(tmp_path / "style"), provenance={"config": {"style_image": str(tmp_path / "gone.jpg")}})
    assert main(["eval", "style", "--model", str(tmp_path / "style"), "--data", str(photos / "train")]) == 2
    err = own(capsys.readouterr().err).strip().splitlines()
    assert len(err) == 1 and "gone.jpg cannot be read" in err[0] and "pass --style" in err[0], err


def test_storage_and_eval_out_inside_the_data_are_not_read_as_images(tmp_path, capsys):
    from imgxlate import evaluate

    data = tmp_path / "data"
    write_sample_photos(str(data), max_side=128)
    n = len(list(data.iterdir()))
    (data / "runs" / "old" / "imgxlate").mkdir(parents=True)
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(data / "runs" / "old" / "imgxlate" / "curves.png")
    (data / "eval").mkdir()
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(data / "eval" / "sheet_x2.png")
    check_data(_cfg("sr", str(data), "--hr-crop", "32", "--storage", str(data / "runs")))
    assert f"data: {n} training images, 1 held out" in capsys.readouterr().err     # n photos + eval/sheet
    assert len(evaluate.read_named(str(data), exclude=str(data / "eval"))) == n + 1     # runs/ is not eval's --out
    assert len(evaluate.read_named(str(data), exclude=str(data / "runs"))) == n + 1
    assert len(evaluate.read_named(str(data))) == n + 2


def test_ctrl_c_of_a_training_run_exits_130_with_one_line_and_no_artifact(photos, tmp_path):
    """Ray Train's own SIGINT handler aborts the run and exits 0 or 1 (by timing); a script's `imgxlate train ... &&
    next` must not go on as if it had trained."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    runs = tmp_path / "runs"
    # (SIGTERM: Ray's own handlers exit 1 and the process then aborts in Ray's core (-6); not asserted here.)
    for sig, code, how in ((signal.SIGINT, 130, "a signal"),):
        before = set(runs.glob("ctrlc/checkpoint_*"))
        p = subprocess.Popen([sys.executable, "-m", "imgxlate.cli", "train", "sr", str(photos / "train"), "--preset",
                              "tiny", "--name", "ctrlc", "--storage", str(runs), "--epochs", "50", "--batch-size",
                              "4", "--hr-crop", "48", "--samples-per-image", "8", "--checkpoint-every", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 240
            while not set(runs.glob("ctrlc/checkpoint_*")) - before and time.monotonic() < deadline \
                    and p.poll() is None:
                time.sleep(0.5)
            assert set(runs.glob("ctrlc/checkpoint_*")) - before, "no new checkpoint within 240 s"
            p.send_signal(sig)
            out, _ = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == code, out[-3000:]
        assert f"imgxlate train: training run 'ctrlc' interrupted ({how}); rerun the same command to resume" in out
        assert "Traceback" not in out and not (runs / "ctrlc" / "model").exists()



def test_a_local_folder_is_looked_for_on_every_node(tmp_path, ray_local):
    """On one node nothing is asked; a path is looked for by a 0-CPU task pinned to each live node."""
    from imgxlate import rayenv

    rayenv.check_shared(str(tmp_path), "--storage")                     # one node: nothing to check
    assert not list(tmp_path.iterdir())                                 # and no marker left behind
    import ray

    node = [n for n in ray.nodes() if n["Alive"]][0]
    look = ray.remote(num_cpus=0)(os.path.exists)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    assert ray.get(look.options(scheduling_strategy=strategy).remote(str(tmp_path)))
    assert not ray.get(look.options(scheduling_strategy=strategy).remote(str(tmp_path / "nothing")))
