"""The models shipped in the package load by name everywhere a model is named, and beat bicubic on
photos none of them was trained on (scikit-image's sample photos)."""

import os

import pytest

from imgxlate import zoo
from imgxlate.cli import main
from imgxlate.evaluate import eval_sr, mean_of, read_named
from imgxlate.infer.predictor import Predictor
from imgxlate.samples import write_sample_photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_sample_photos(str(root), max_side=256)
    return read_named(str(root))


def test_the_shipped_models_are_there_and_small():
    assert {"sr-x2", "sr-x4", "restore-x2"} <= set(zoo.names())
    for name in zoo.names():
        meta = zoo.meta(name)
        assert meta["shipped"]["command"].startswith("imgxlate train") and meta["shipped"]["scores"]
        assert os.path.getsize(os.path.join(zoo.path(name), meta["weights_file"])) < 8e6   # issue 25: under 8 MB


@pytest.mark.parametrize("name", ["sr-x2", "sr-x4", "restore-x2"])
def test_a_shipped_model_beats_bicubic_on_photos_it_never_saw(name, photos):
    predictor = Predictor(name)
    degradations = zoo.meta(name)["shipped"]["degradations"]
    mean = mean_of(eval_sr(predictor, photos, predictor.scale, degradations=degradations), ("psnr", "psnr_bicubic"))
    assert mean["psnr"] > mean["psnr_bicubic"] + 0.2, mean


def test_models_lists_them_with_scores_and_info_shows_one(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "sr-x2" in out and "Set14" in out and "trained: imgxlate train sr" in out
    assert main(["info", "sr-x4"]) == 0
    assert '"shipped"' in capsys.readouterr().out
