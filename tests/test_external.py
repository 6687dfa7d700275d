"""Third-party models through spandrel: state dicts written here (random weights), loaded from .pth and
.safetensors, run by the batch job and `eval sr`, tiled and untiled alike."""

import csv
import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from imgxlate import external, metrics
from imgxlate.artifact import UnsafeWeightsError
from imgxlate.cli import main
from imgxlate.infer import job
from imgxlate.infer.predictor import PredictOptions, Predictor

from conftest import photo


def _compact_x2():
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    return Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=2).state_dict()


def _span_x4():
    from spandrel.architectures.SPAN import SPAN

    torch.manual_seed(1)
    return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=4).state_dict()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("third_party")
    files = {2: str(root / "compact_x2.pth"), 4: str(root / "span_x4.safetensors")}
    external.save_state_dict(_compact_x2(), files[2])
    external.save_state_dict(_span_x4(), files[4])
    return files


def test_architecture_scale_and_licence_are_detected(model_files, capsys):
    _, meta = external.describe(model_files[2])
    assert (meta["arch"], meta["scale"], meta["task"]) == ("spandrel:Compact", 2, "sr")
    assert meta["licence"].startswith("BSD-3-Clause") and meta["n_params"] > 1000
    assert main(["info", model_files[4]]) == 0
    out = capsys.readouterr().out
    assert "SPAN x4" in out and "parameters, licence:" in out
    assert json.loads(out[:out.rindex("}") + 1])["scale"] == 4


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    buf = io.BytesIO()
    pickle.dump({"weights": Boom()}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(UnsafeWeightsError):
        external.describe(str(path))


@pytest.mark.parametrize("scale", [2, 4])
def test_tiled_and_untiled_agree(model_files, scale):
    img = photo(40, 52, seed=5)
    whole = Predictor(model_files[scale], options=PredictOptions(tile=1 << 30)).predict(img)
    tiled = Predictor(model_files[scale], options=PredictOptions(tile=24, overlap=12)).predict(img)
    assert whole.shape == (40 * scale, 52 * scale, 3)
    assert metrics.psnr(tiled, whole, scale, y_channel=False) > 40


@pytest.mark.parametrize("scale", [2, 4])
def test_the_batch_job_and_eval_sr_run_third_party_models(model_files, scale, tmp_path, ray_local):
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir()
    lr_dir.mkdir()
    hrs = {}
    for i in range(2):
        hr = metrics.mod_crop(photo(96, 80 + 8 * i, seed=i), scale)
        hrs[f"p{i}.png"] = hr
        Image.fromarray(hr).save(hr_dir / f"p{i}.png")
        Image.fromarray(metrics.imresize(hr, 1 / scale)).save(lr_dir / f"p{i}.png")
    assert main(["eval", "sr", "--model", model_files[scale], "--data", str(hr_dir), "--scale", str(scale),
                 "--out", str(tmp_path / "ev"), "--sheet", "0", "--tile", "16", "--overlap", "8"]) == 0
    reported = {r["image"]: float(r["psnr"]) for r in csv.DictReader((tmp_path / "ev" / f"sr_x{scale}.csv").open())}
    summary = job.run(job.TranslateConfig(src=str(lr_dir), dst=str(tmp_path / "out"), model=model_files[scale],
                                          tile=16, overlap=8, progress_every_s=60))
    assert summary["counts"] == {"ok": 2}
    assert summary["model_id"].startswith(("Compact-x2-", "SPAN-x4-"))
    for name, hr in hrs.items():
        written = np.asarray(Image.open(tmp_path / "out" / name))
        assert written.shape == hr.shape
        assert metrics.psnr(written, hr, scale) == pytest.approx(reported[name], abs=0.01)
