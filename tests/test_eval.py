"""Evaluation commands and their pictures, on generated fixtures (no Ray needed)."""

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from imgxlate import evaluate, plots
from imgxlate.artifact import save
from imgxlate.augment import dihedral
from imgxlate.cli import main
from imgxlate.infer.contract import for_task
from imgxlate.infer.predictor import PredictOptions, Predictor, to_tensor
from imgxlate.models import build

from conftest import photo


@pytest.fixture
def hr_folder(tmp_path):
    d = tmp_path / "hr"
    d.mkdir()
    for i, (h, w) in enumerate(((96, 128), (80, 80), (64, 100))):
        Image.fromarray(photo(h, w, seed=10 + i)).save(d / f"img{i}.png")
    return d


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size


def test_eval_sr_writes_csv_parquet_summary_and_a_sheet(hr_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "sr", "--model", "bicubic", "--data", str(hr_folder), "--scale", "2",
                 "--out", str(out), "--sheet", "2", "--crop", "48"]) == 0
    text = capsys.readouterr().out
    assert "mean (3 images)" in text and "before/after sheet" in text
    rows = list(csv.DictReader((out / "sr_x2.csv").open()))
    assert len(rows) == 3 == pq.read_table(out / "sr_x2.parquet").num_rows
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean"]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]))
    w, h = _png_size(out / "sheet_x2.png")
    assert w > 600 and h > 500                            # 2 rows of 3 panels


def test_sheet_crops_are_the_same_region_of_each_image(hr_folder):
    rows = evaluate.eval_sr(Predictor(build("bicubic", scale=2)), evaluate.read_named(str(hr_folder)), 2, crop=32)
    for r in rows:
        assert {k: v.shape for k, v in r.crop.items()} == {k: (32, 32, 3) for k in ("bicubic", "model", "hr")}
        # bicubic and ground truth agree far better on the same region than on a shifted one
        same = np.abs(r.crop["bicubic"].astype(int) - r.crop["hr"]).mean()
        assert same < np.abs(np.roll(r.crop["bicubic"], 7, axis=0).astype(int) - r.crop["hr"]).mean()


def test_detail_window_finds_the_textured_region():
    img = np.full((100, 100), 128, np.uint8)
    img[60:90, 10:40] = (np.indices((30, 30)).sum(0) % 2 * 255).astype(np.uint8)   # checkerboard
    y, x = evaluate.detail_window(img, 32)
    assert 56 <= y <= 62 and 6 <= x <= 12


def test_self_ensemble_is_the_mean_over_the_8_symmetries_and_is_equivariant():
    torch.manual_seed(0)
    model = build("sr", preset="tiny", scale=2).eval()
    img = photo(24, 32, seed=3)
    with torch.no_grad():
        x = to_tensor(img)
        manual = sum(torch.rot90(model(dihedral(x, k)).flip(-1) if k >= 4 else model(dihedral(x, k)),
                                 -(k % 4), dims=(-2, -1)) for k in range(8)) / 8
    expected = manual[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    ensemble = Predictor(model, options=PredictOptions(ensemble=True))
    got = ensemble.predict(img)
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert not np.array_equal(got, Predictor(model).predict(img))       # the model alone is not symmetric
    flipped = ensemble.predict(np.ascontiguousarray(img[:, ::-1]))
    assert np.abs(flipped[:, ::-1].astype(int) - got).max() <= 1


def test_eval_sr_ensemble_flag(hr_folder, tmp_path, capsys):
    save(build("sr", preset="tiny", scale=2), str(tmp_path / "tiny"))
    assert main(["eval", "sr", "--model", str(tmp_path / "tiny"), "--data", str(hr_folder), "--scale", "2",
                 "--ensemble", "--out", str(tmp_path / "e"), "--sheet", "0"]) == 0
    assert "+ensemble" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["ensemble"] is True
    assert not (tmp_path / "e" / "sheet_x2.png").exists()


class Brightness(nn.Module):
    """A stand-in segmentation model with a known answer: foreground where the image is bright."""
    task, scale, meta = "seg", 1, {"model_id": "brightness"}

    def __init__(self):
        super().__init__()
        self.register_buffer("dummy", torch.zeros(1))

    def forward(self, x):
        return (x.mean(1, keepdim=True) - 0.5) * 20


def _seg_folder(root, n=4, size=48):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = np.full((size, size, 3), 30, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[8:8 + 6 * (i + 1), 10:30] = 1
        img[mask.astype(bool)] = 220
        if i == 2:
            mask = np.roll(mask, 6, axis=1)                   # a wrong label: this image scores worst
        Image.fromarray(img).save(root / "images" / f"car{i}_01.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"car{i}_01.png")
    return root


def test_eval_seg_scores_at_mask_resolution_and_ranks_the_worst(tmp_path):
    root = _seg_folder(tmp_path / "seg")
    predictor = Predictor(Brightness(), contract=for_task("seg", size=48))     # the images' own size: no resampling
    rows = evaluate.eval_seg(predictor, evaluate.read_seg_samples(evaluate.seg_pairs(str(root)), root=str(root)))
    by = {r.image: r for r in rows}
    assert len(rows) == 4
    for name, r in by.items():
        if name != "images/car2_01.png":
            assert r.dice == pytest.approx(1.0) and r.iou == pytest.approx(1.0) and r.accuracy == pytest.approx(1.0)
    assert by["images/car2_01.png"].dice < 0.8
    png = plots.seg_panel(by["images/car2_01.png"])
    assert png.startswith(b"\x89PNG")
    over = plots.overlay(np.zeros((4, 4, 3), np.uint8), np.eye(4, dtype=bool))
    assert over[0, 0, 0] > 100 and over[0, 1].sum() == 0    # painted only under the mask


def test_seg_val_split_matches_training_groups(tmp_path):
    root = _seg_folder(tmp_path / "seg", n=6)
    val = evaluate.seg_pairs(str(root), "val", 0.34, seed=0)
    train = evaluate.seg_pairs(str(root), "train", 0.34, seed=0)
    assert len(val) == 2 and len(train) == 4 and not {p[0] for p in val} & {p[0] for p in train}


def test_eval_seg_command_with_an_artifact(tmp_path, capsys):
    root = _seg_folder(tmp_path / "seg", n=3, size=64)
    save(build("unet", encoder_weights="none"), str(tmp_path / "unet"))
    out = tmp_path / "ev"
    assert main(["eval", "seg", "--model", str(tmp_path / "unet"), "--data", str(root), "--worst", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean (3 images)" in text and "(worst 2)" in text
    assert len(list(csv.DictReader((out / "seg.csv").open()))) == 3
    assert len(list((out / "overlays").glob("*.png"))) == 2 and (out / "worst.png").exists()
    assert main(["eval", "seg", "--model", "bicubic", "--data", str(root)]) == 2


def test_eval_style_command_losses_and_grid(tmp_path, capsys):
    content = tmp_path / "content"
    content.mkdir()
    for i in range(2):
        Image.fromarray(photo(50, 70, seed=i)).save(content / f"c{i}.jpg")
    style = tmp_path / "style.png"
    Image.fromarray(photo(64, 64, seed=9)).save(style)
    save(build("style"), str(tmp_path / "st"), provenance={"config": {"style_image": str(style), "content_size": 48}})
    out = tmp_path / "ev"
    assert main(["eval", "style", "--model", str(tmp_path / "st"), "--data", str(content), "--vgg-weights",
                 "random", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "centre 48 px square" in text and "style_" in text
    (model_dir,) = [p for p in out.iterdir() if p.is_dir()]
    rows = list(csv.DictReader((model_dir / "style.csv").open()))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    style_cols = [c for c in rows[0] if c.startswith("style_")]
    assert len(style_cols) == 4 and "content" in rows[0]
    assert float(rows[0]["loss"]) == pytest.approx(sum(float(rows[0][c]) for c in ["content", *style_cols]))
    w, h = _png_size(out / f"grid-{model_dir.name}.png")
    assert h > w                                               # style row + 2 content rows, 2 columns


def test_report_refuses_a_folder_that_is_neither(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a training run folder" in capsys.readouterr().err
