"""One inference contract: `imgxlate eval` and the batch job run every model the same way, so the job's
outputs score what eval reports (parametrized over the model registry; random weights, generated images)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imgxlate import evaluate, metrics
from imgxlate.artifact import read_meta, save
from imgxlate.cli import main
from imgxlate.infer import job
from imgxlate.infer.contract import Contract, for_task, from_meta
from imgxlate.infer.predictor import PredictOptions, Predictor
from imgxlate.models import REGISTRY, build

from conftest import photo

TASK_OF = {"bicubic": "sr", "sr": "sr", "style": "style", "unet": "seg", "upsample_head": "seg"}
SMALL = {"sr": {"preset": "tiny", "scale": 2}, "style": {"n_blocks": 2}, "unet": {"encoder_weights": "none"},
         "upsample_head": {"encoder_weights": "none"}}
SEG_CONTRACT = for_task("seg", size=64, source_size=(64, 64))     # trained on 64 px images squashed to 64


def test_every_registered_model_has_a_task():
    assert set(REGISTRY) == set(TASK_OF)


def _artifact(arch, path, **provenance):
    """A random-weights artifact of ``arch`` (or 'bicubic'), saved with its task's contract."""
    if arch == "bicubic":
        return "bicubic"
    torch.manual_seed(0)
    model = build(arch, **SMALL[arch])
    contract = SEG_CONTRACT if TASK_OF[arch] == "seg" else None
    save(model, str(path), provenance=provenance, contract=contract)
    return str(path)


def _translate(src, dst, model, **kw):
    summary = job.run(job.TranslateConfig(src=str(src), dst=str(dst), model=model, progress_every_s=60, **kw))
    assert summary["counts"] == {"ok": summary["inputs"]}, summary
    return summary


def _read(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.mark.parametrize("arch", [a for a in REGISTRY if TASK_OF[a] == "sr"])
def test_sr_job_outputs_score_what_eval_sr_reports_with_tiles_smaller_than_the_image(arch, tmp_path, capsys,
                                                                                      ray_local):
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir()
    lr_dir.mkdir()
    hrs = {}
    for i, (h, w) in enumerate(((96, 120), (100, 84), (72, 72))):
        hr = photo(h, w, seed=20 + i)
        hrs[f"img{i}.png"] = metrics.mod_crop(hr, 2)
        Image.fromarray(hr).save(hr_dir / f"img{i}.png")
        Image.fromarray(metrics.imresize(hrs[f"img{i}.png"], 1 / 2)).save(lr_dir / f"img{i}.png")  # eval's LR
    model = _artifact(arch, tmp_path / "model")
    tiles = ["--tile", "24", "--overlap", "8"]                       # LR images are 36-60 px: 2-3 tiles a side
    assert main(["eval", "sr", "--model", model, "--data", str(hr_dir), "--scale", "2", "--out",
                 str(tmp_path / "ev"), "--sheet", "0", *tiles]) == 0
    reported = {r["image"]: float(r["psnr"]) for r in csv.DictReader((tmp_path / "ev" / "sr_x2.csv").open())}
    _translate(lr_dir, tmp_path / "out", model, scale=2, tile=24, overlap=8)
    for name, hr in hrs.items():
        written = _read(tmp_path / "out" / name)
        assert written.shape == hr.shape
        assert metrics.psnr(written, hr, 2) == pytest.approx(reported[name], abs=0.01), name


@pytest.mark.parametrize("arch", [a for a in REGISTRY if TASK_OF[a] == "style"])
def test_style_job_outputs_equal_the_images_in_the_eval_grid(arch, tmp_path, ray_local):
    src = tmp_path / "content"
    src.mkdir()
    named = []
    for i, (h, w) in enumerate(((60, 90), (80, 64))):
        img = photo(h, w, seed=30 + i)
        Image.fromarray(img).save(src / f"c{i}.png")
        named.append((f"c{i}.png", img))
    style = photo(64, 64, seed=9)
    model = _artifact(arch, tmp_path / "model")
    options = PredictOptions(tile=48, overlap=16)                   # tiled, as the job is told below
    rows = evaluate.eval_style(Predictor(model, options=options), named, style, size=48, vgg_weights="random")
    _translate(src, tmp_path / "out", model, tile=48, overlap=16)
    for r in rows:
        written = _read(tmp_path / "out" / r.image)
        assert written.shape == r.pictures["stylised"].shape
        assert np.abs(written.astype(int) - r.pictures["stylised"]).max() <= 1, r.image


def _seg_data(root, sizes):
    """Images with a bright blob and its mask, images/ + masks/; the sizes include ones far larger than the
    64 px images the contract says training saw."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        mask = ((yy - h * 0.5) / (h * 0.3)) ** 2 + ((xx - w * 0.45) / (w * 0.25)) ** 2 < 1
        img = photo(h, w, seed=40 + i) // 3
        img[mask] = np.clip(img[mask].astype(int) + 140, 0, 255)
        Image.fromarray(img).save(root / "images" / f"car{i}_01.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"car{i}_01.png")


@pytest.mark.parametrize("arch", [a for a in REGISTRY if TASK_OF[a] == "seg"])
def test_seg_job_masks_score_what_eval_seg_reports_at_every_input_size(arch, tmp_path, ray_local):
    # 64: the training size; 96x80: squashed whole like training; 300x280: past 4x the training images' side,
    # so windows of 64 px at the training scale.
    _seg_data(tmp_path / "seg", [(64, 64), (96, 80), (48, 72), (300, 280)])
    model = _artifact(arch, tmp_path / "model")
    assert main(["eval", "seg", "--model", model, "--data", str(tmp_path / "seg"), "--out", str(tmp_path / "ev"),
                 "--worst", "0"]) == 0
    reported = {r["image"]: float(r["dice"]) for r in csv.DictReader((tmp_path / "ev" / "seg.csv").open())}
    assert len(reported) == 4
    _translate(tmp_path / "seg" / "images", tmp_path / "out", model)
    for name, dice in reported.items():
        written = _read(tmp_path / "out" / name.split("/", 1)[1]) > 0
        truth = _read(tmp_path / "seg" / "masks" / name.split("/", 1)[1]) > 0
        assert written.shape == truth.shape
        assert metrics.dice(written, truth) == pytest.approx(dice, abs=0.002), name


def test_a_contract_edited_in_config_json_makes_a_new_recipe_so_a_rerun_redoes_the_masks(tmp_path, ray_local):
    """A user changes a segmentation model's mask threshold in its config.json and reruns into the same DST: the
    recipe hashes the contract, so every mask is made again with the new threshold. Before, the rerun skipped
    them all as done (same weights, same recipe) and DST kept the old masks."""
    arch = next(a for a in REGISTRY if TASK_OF[a] == "seg")
    _seg_data(tmp_path / "seg", [(64, 64), (48, 72)])
    model, src, out = _artifact(arch, tmp_path / "model"), tmp_path / "seg" / "images", tmp_path / "out"
    first = _translate(src, out, model)
    config = tmp_path / "model" / "config.json"
    meta = json.loads(config.read_text())
    meta["contract"]["threshold"] = -1e9                  # every pixel foreground
    config.write_text(json.dumps(meta))
    again = _translate(src, out, model)
    assert again["counts"] == {"ok": 2} and {m["recipe"] for m in _rows(out, again)} != {
        m["recipe"] for m in _rows(out, first)}
    assert all((_read(p) == 255).all() for p in out.glob("*.png")) and len(list(out.glob("*.png"))) == 2
    third = job.run(job.TranslateConfig(src=str(src), dst=str(out), model=model, progress_every_s=60))
    assert third["counts"] == {"skipped_done": 2}


def _rows(dst, summary) -> list[dict]:
    from imgxlate.io import manifest

    return manifest.read_run(str(dst), summary["run_id"]).to_pylist()


class Spy(nn.Module):
    """A stand-in segmentation model: foreground where the image is bright; records its input sizes."""
    task, scale = "seg", 1

    def __init__(self):
        super().__init__()
        self.register_buffer("dummy", torch.zeros(1))
        self.seen = []

    def forward(self, x):
        self.seen += [tuple(x.shape[-2:])] * x.shape[0]
        return (x.mean(1, keepdim=True) - 0.5) * 20


def test_a_large_input_is_run_in_windows_at_the_training_scale_with_bounded_model_inputs():
    contract = for_task("seg", size=32, source_size=(64, 64))
    spy = Spy()
    predictor = Predictor(spy, contract=contract)
    h, w = 700, 520                                   # > 4 x 64: windows
    yy, xx = np.mgrid[0:h, 0:w]
    truth = ((yy - 350) / 200.0) ** 2 + ((xx - 260) / 150.0) ** 2 < 1
    img = np.where(truth[..., None], 230, 25).astype(np.uint8).repeat(3, axis=2)
    mask = predictor.predict(img)
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    assert set(spy.seen) == {(32, 32)}                # every window squashed as training squashed an image
    assert len(spy.seen) >= (h // 64) * (w // 64)
    assert metrics.dice(mask > 0, truth) > 0.97
    spy.seen.clear()
    small = img[:200, :150]                           # within 4x: the whole image squashed once
    predictor.predict(small)
    assert spy.seen == [(32, 32)]


def test_training_export_records_the_contract_and_old_artifacts_get_their_trained_geometry(tmp_path):
    uri = _artifact("unet", tmp_path / "unet")
    meta = read_meta(uri)
    assert meta["contract"]["geometry"] == "resize" and meta["contract"]["size"] == 64
    assert from_meta(meta, "seg") == SEG_CONTRACT
    legacy = {k: v for k, v in meta.items() if k != "contract"}
    legacy["provenance"] = {"stages": [{"size": 128, "epochs": 1}, {"size": 256, "epochs": 1}]}
    assert from_meta(legacy, "seg") == Contract("seg", "resize", size=256, output="mask",
                                                normalisation=SEG_CONTRACT.normalisation)
    sr = read_meta(_artifact("sr", tmp_path / "sr"))
    assert sr["contract"]["geometry"] == "native"
    info = json.loads(json.dumps(sr))
    assert Predictor(str(tmp_path / "sr")).contract == from_meta(info, "sr")
