"""The command line, run as users run it (in-process through main())."""

import csv

import numpy as np
import pytest
from PIL import Image

from imgxlate import metrics
from imgxlate.artifact import save
from imgxlate.cli import build_parser, main
from imgxlate.models import build

from conftest import photo


@pytest.fixture
def hr_folder(tmp_path):
    d = tmp_path / "hr"
    (d / "nested").mkdir(parents=True)
    Image.fromarray(photo(49, 63, seed=1)).save(d / "64x48_rgb.png")
    Image.fromarray(photo(40, 40, seed=2, channels=1)).save(d / "nested" / "40x40_gray.png")
    return d


def test_help_explains_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("eval", "models", "info", "sample-photos"):
        assert name in out


def test_eval_sr_bicubic_prints_protocol_and_writes_csv(hr_folder, tmp_path, capsys):
    assert main(["eval", "sr", "--model", "bicubic", "--data", str(hr_folder), "--scale", "2",
                 "--out", str(tmp_path / "r")]) == 0
    out_csv = tmp_path / "r" / "sr_x2.csv"
    text = capsys.readouterr().out
    assert "protocol: Y, shave=scale" in text and "mean (2 images)" in text
    rows = list(csv.DictReader(out_csv.open()))
    assert {r["image"] for r in rows} == {"64x48_rgb.png", "nested/40x40_gray.png"}
    # The numbers are the protocol's, computed independently here.
    hr = metrics.mod_crop(np.asarray(Image.open(hr_folder / "64x48_rgb.png")), 2)
    expected = metrics.psnr(metrics.imresize(metrics.imresize(hr, 0.5), 2), hr, 2)
    row = next(r for r in rows if r["image"] == "64x48_rgb.png")
    assert float(row["psnr"]) == pytest.approx(expected) == pytest.approx(float(row["psnr_bicubic"]))


def test_eval_sr_with_an_artifact(hr_folder, tmp_path, capsys):
    save(build("sr", preset="tiny", scale=2), str(tmp_path / "tiny"))
    assert main(["eval", "sr", "--model", str(tmp_path / "tiny"), "--data", str(hr_folder), "--scale", "2"]) == 0
    assert "model=sr-x2-" in capsys.readouterr().out
    # A scale the model cannot take is the user's to change: one line, exit 2 (unexpected errors still raise).
    assert main(["eval", "sr", "--model", str(tmp_path / "tiny"), "--data", str(hr_folder), "--scale", "4"]) == 2
    assert "is a x2 model but --scale 4 was asked for" in capsys.readouterr().err


def test_models_and_info(tmp_path, capsys):
    assert main(["models"]) == 0
    assert "edsr-baseline" in capsys.readouterr().out
    save(build("style"), str(tmp_path / "s"))
    assert main(["info", str(tmp_path / "s")]) == 0
    assert '"task": "style"' in capsys.readouterr().out
    assert build_parser().parse_args(["eval", "sr", "--model", "m", "--data", "d", "--scale", "4"]).scale == 4


def test_a_stopping_signal_sets_the_exit_status_by_its_number_not_its_message(capsys):
    import argparse
    import signal

    from imgxlate.errors import SecondSignal
    from imgxlate.guard import guarded

    def raising(e):
        def func(args):
            raise e
        return func

    args = argparse.Namespace()
    assert guarded("translate", raising(SecondSignal(signal.SIGTERM)), args) == 143
    assert "second SIGTERM: stopping without draining; a rerun does every input" in capsys.readouterr().err
    assert guarded("translate", raising(SecondSignal(signal.SIGINT)), args) == 130
    assert guarded("translate", raising(KeyboardInterrupt("not a SIGTERM")), args) == 130   # a plain Ctrl-C
    with pytest.raises(KeyboardInterrupt):                  # other commands stop as Python does
        guarded("eval", raising(KeyboardInterrupt()), args)
