"""Training data without Ray: pairing, grouped splits, seeded samples, degradations."""

import numpy as np
import pytest
import torch
from PIL import Image

from imgxlate import metrics, pairing
from imgxlate.degrade import Degradation, DegradationSampler, apply
from imgxlate.train import data

from conftest import photo


def test_pairing_rules_and_grouped_split(tmp_path):
    for folder, img_name in (("carvana/images", "car1_01.jpg"), ("carvana/images", "car1_02.jpg"),
                             ("carvana/images", "car2_01.jpg"), ("isbi/image", "0.png")):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(8, 8)).save(tmp_path / folder / img_name)
    (tmp_path / "carvana/masks").mkdir()
    for n in ("car1_01", "car1_02", "car2_01"):
        Image.new("P", (8, 8)).save(tmp_path / "carvana/masks" / f"{n}_mask.gif")
    (tmp_path / "isbi/label").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "isbi/label/0.png")
    (tmp_path / "beside").mkdir()
    Image.fromarray(photo(8, 8)).save(tmp_path / "beside/x_1.jpg")
    Image.new("L", (8, 8)).save(tmp_path / "beside/x_1_mask.png")
    pairs = pairing.pair_segmentation(data.list_images(str(tmp_path)))
    names = {(p[0].split("/")[-1], p[1].split("/")[-1]) for p in pairs}
    assert names == {("car1_01.jpg", "car1_01_mask.gif"), ("car1_02.jpg", "car1_02_mask.gif"),
                     ("car2_01.jpg", "car2_01_mask.gif"), ("0.png", "0.png"), ("x_1.jpg", "x_1_mask.png")}
    cars = [p for p in pairs if "carvana" in p[0]]
    train, val = pairing.grouped_split(cars, 0.5)
    assert {p[0].split("/")[-1][:4] for p in train}.isdisjoint({p[0].split("/")[-1][:4] for p in val})


def test_sr_samples_are_seeded_and_lr_is_matlab_bicubic_of_hr(tmp_path):
    Image.fromarray(photo(64, 80, seed=1)).save(tmp_path / "a.png")
    ds = data.SrDataset([str(tmp_path / "a.png")], scale=2, hr_crop=32, samples_per_image=4, seed=3)
    lr, hr = ds[1]
    assert lr.shape == (3, 16, 16) and hr.shape == (3, 32, 32)
    hr8 = (hr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal((lr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
                                  metrics.imresize(hr8, 0.5))
    again = ds[1]
    assert torch.equal(again[0], lr)                      # same (seed, epoch, index): same sample
    ds.set_epoch(1)
    assert not torch.equal(ds[1][1], hr)                  # a new epoch draws a new crop


def test_degradations_are_deterministic_functions_of_their_parameters():
    img = photo(32, 32, seed=2)
    d = Degradation(blur_sigma=1.0, noise_sigma=5.0, noise_seed=7, jpeg_quality=30)
    assert np.array_equal(apply(img, d), apply(img, d))
    assert not np.array_equal(apply(img, d), img)
    gray = apply(img, Degradation(grayscale=True))
    assert np.array_equal(gray[..., 0], gray[..., 1])
    s = DegradationSampler(p_noise=1.0, p_jpeg=1.0)
    a, b = s.sample(np.random.default_rng(5)), s.sample(np.random.default_rng(5))
    assert a == b and a.noise_sigma > 0 and a.jpeg_quality is not None
    ds_img = apply(img, a)
    assert ds_img.shape == img.shape and ds_img.dtype == np.uint8


def test_a_frozen_group_keeps_its_batch_norm_statistics():
    # The plain loop (no Ray): a ':frozen' stage trains the decoder only; the encoder's BN running stats
    # must not move either, with or without bn_freeze (as fastai).
    from imgxlate.models import build
    from imgxlate.train.loop import LoopConfig, Trainer
    from imgxlate.train.objectives import SegObjective
    from imgxlate.train.tasks import Stage, trainable_groups

    torch.manual_seed(0)
    model = build("unet", encoder_weights="none")
    groups = trainable_groups(model, Stage(epochs=1, size=32, frozen_groups=(0,)), [])
    batch = (torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float())
    trainer = Trainer(model, SegObjective(), [batch], LoopConfig(epochs=1, frozen_groups=(0,)), groups=groups)

    def bn_stats(module):
        return [m.running_mean.clone() for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    encoder, rest = bn_stats(model.encoder), bn_stats(groups[1])
    trainer.fit()
    assert all(torch.equal(a, b) for a, b in zip(encoder, bn_stats(model.encoder)))
    assert not all(torch.equal(a, b) for a, b in zip(rest, bn_stats(groups[1])))   # the trained group's move
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_segmentation_loss_is_bce_or_bce_plus_dice(tmp_path):
    import torch.nn.functional as F

    from imgxlate.cli import build_parser, train_config
    from imgxlate.losses import soft_dice_loss
    from imgxlate.train.objectives import SegObjective

    img, mask = torch.rand(2, 3, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    model = torch.nn.Conv2d(3, 1, 1)
    bce = F.binary_cross_entropy_with_logits(model(img), mask)
    assert torch.allclose(SegObjective("bce")(model, (img, mask))[0], bce)
    assert torch.allclose(SegObjective()(model, (img, mask))[0], bce + soft_dice_loss(model(img), mask))
    parse = build_parser().parse_args
    assert train_config(parse(["train", "seg", str(tmp_path), "--loss", "bce"]), "seg").seg_loss == "bce"
    assert train_config(parse(["train", "seg", str(tmp_path)]), "seg").seg_loss == "bce_dice"


def _write_pairs(root, layout: str, n: int):
    """n photo/mask pairs in a segmentation layout: 'folders' (images/ + masks/, same names) or 'kaggle'
    (Kaggle's Carvana: train/<id>_<angle>.jpg + train_masks/<id>_<angle>_mask.gif)."""
    img_dir, mask_dir = {"folders": ("images", "masks"), "kaggle": ("train", "train_masks")}[layout]
    (root / img_dir).mkdir(parents=True)
    (root / mask_dir).mkdir()
    names = []
    for i in range(n):
        stem = f"p{i}" if layout == "folders" else f"car{i // 2}_{i % 2 + 1:02d}"
        ext = ".png" if layout == "folders" else ".jpg"
        Image.fromarray(photo(24, 32, seed=i)).save(root / img_dir / (stem + ext))
        mask = Image.fromarray(((np.arange(24 * 32).reshape(24, 32) % 7) == 0).astype(np.uint8) * 255)
        if layout == "folders":
            mask.save(root / mask_dir / f"{stem}.png")
        else:
            mask.convert("P").save(root / mask_dir / f"{stem}_mask.gif")
        names.append(stem)
    return names


def test_limit_counts_image_mask_pairs(tmp_path):
    from imgxlate.train.tasks import RunConfig, SegTask, Stage

    _write_pairs(tmp_path, "folders", 6)
    pairs = pairing.pair_segmentation(data.list_images(str(tmp_path)), limit=3)
    assert [(p[0].split("/")[-2:], p[1].split("/")[-2:]) for p in pairs] == [
        (["images", f"p{i}.png"], ["masks", f"p{i}.png"]) for i in range(3)]
    cfg = RunConfig(task="seg", data=str(tmp_path), limit=3, val_fraction=0.34)
    td = SegTask().stage_data(cfg, Stage(epochs=1, size=32), "cpu")
    assert len(td.train) == 2                                # 3 pairs: 1 held out (one group), 2 trained on


def test_kaggle_carvana_layout_pairs(tmp_path):
    stems = _write_pairs(tmp_path, "kaggle", 4)
    (tmp_path / "train_masks.csv").write_text("img,rle_mask\n")
    pairs = pairing.pair_segmentation(data.list_images(str(tmp_path)))
    assert [(p[0].split("/")[-2:], p[1].split("/")[-2:]) for p in pairs] == [
        (["train", f"{s}.jpg"], ["train_masks", f"{s}_mask.gif"]) for s in stems]
    train, val = pairing.grouped_split(pairs, 0.5)              # grouped by car id, as Carvana's own names
    assert {p[0].split("/")[-1][:4] for p in train}.isdisjoint({p[0].split("/")[-1][:4] for p in val})


def test_one_cycle_schedule_of_a_few_steps():
    # 4 steps with a 25% warmup: OneCycleLR's warmup would end at step index 0 and divide by zero.
    from imgxlate.train.loop import LoopConfig, Trainer

    class Square(torch.nn.Module):
        def forward(self, model, batch):
            loss = model(batch[0]).square().mean()
            return loss, {"loss": loss.item()}
    for epochs, steps, warmup in ((2, 2, 0.25), (1, 4, 0.25), (1, 2, 1.0)):
        trainer = Trainer(torch.nn.Linear(2, 1), Square(), [(torch.rand(3, 2),)] * steps,
                          LoopConfig(epochs=epochs, warmup_pct=warmup))
        assert len(trainer.fit()) == epochs and trainer.step == epochs * steps


# T91's spread of sizes (w, h), its smallest image included: 78 x 78, under the default 96 px HR crop.
T91_LIKE = [(78, 78), (114, 119), (150, 132), (197, 176), (245, 195), (291, 198), (336, 240), (435, 348)]


def _write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(photo(h, w, seed=seed + i)).save(folder / f"t{i:02d}.png")
    return sorted(str(p) for p in folder.iterdir())


def test_validation_is_held_out_of_training_by_default(tmp_path):
    from imgxlate.train.tasks import DataError, RunConfig, SrTask, Stage, StyleTask

    uris = _write_images(tmp_path / "train", [(64, 64)] * 20)
    cfg = RunConfig(task="sr", data=str(tmp_path / "train"), hr_crop=32, seed=3)
    td = SrTask().stage_data(cfg, Stage(epochs=1, scale=2), "cpu")
    plan = td.plan
    assert len(plan.val) == 2 and set(plan.val).isdisjoint(td.train.uris)       # 10%, never trained on
    assert sorted(plan.val + td.train.uris) == uris
    assert plan.held_out == sorted(u.split("/")[-1] for u in plan.val)           # keys, for the provenance
    assert SrTask().plan(cfg, Stage(epochs=1, scale=2)).val == plan.val          # every worker: the same split
    other = SrTask().plan(RunConfig(task="sr", data=str(tmp_path / "train"), hr_crop=32, seed=4), Stage(epochs=1))
    assert other.val != plan.val                                                  # by the run's seed
    style = StyleTask().plan(RunConfig(task="style", data=str(tmp_path / "train"), seed=3), Stage(epochs=1))
    assert style.val == plan.val and set(style.val).isdisjoint(style.train)
    # --val: everything trains, nothing is held out. One image and no --val: nothing to hold out.
    val = _write_images(tmp_path / "val", [(64, 64)])
    with_val = SrTask().plan(RunConfig(task="sr", data=str(tmp_path / "train"), val=str(tmp_path / "val"),
                                       hr_crop=32), Stage(epochs=1))
    assert len(with_val.train) == 20 and with_val.held_out == [] and with_val.val == val
    _write_images(tmp_path / "one", [(64, 64)])
    with pytest.raises(DataError, match="--val"):
        SrTask().check(RunConfig(task="sr", data=str(tmp_path / "one"), hr_crop=32))


def test_images_smaller_than_the_hr_crop_are_skipped(tmp_path):
    from imgxlate.train.tasks import DataError, RunConfig, SrTask, Stage

    _write_images(tmp_path / "t91", T91_LIKE * 2)                  # 16 images, two of them 78 px
    cfg = RunConfig(task="sr", data=str(tmp_path / "t91"), seed=0)  # the default 96 px HR crop
    plan = SrTask().plan(cfg, Stage(epochs=1, scale=2))
    assert plan.skipped_small == [k for k in ("t00.png", "t08.png") if k not in plan.held_out]
    assert plan.metrics()["data_skipped_small"] == len(plan.skipped_small) and plan.skipped_small
    assert "--hr-crop 78 would keep them" in plan.warnings[0]
    td = SrTask().stage_data(cfg, Stage(epochs=1, scale=2), "cpu")
    batch = torch.utils.data.default_collate([td.train[i] for i in range(len(td.train))])   # all one size
    assert batch[1].shape[1:] == (3, 96, 96)
    _write_images(tmp_path / "tiny", [(40, 50)] * 3)
    with pytest.raises(DataError, match="smaller than the 96 px HR crop.*pass a smaller --hr-crop"):
        SrTask().check(RunConfig(task="sr", data=str(tmp_path / "tiny")))


def test_workers_decode_only_what_their_sampler_draws_into_a_bounded_cache(tmp_path, monkeypatch):
    uris = _write_images(tmp_path / "set", [(80, 60)] * 10)
    reads = []

    def counting_read(uri):
        reads.append(uri)
        return read_rgb(uri)
    from imgxlate.io.images import read_rgb
    monkeypatch.setattr(data, "read_rgb", counting_read)
    one_image_mb = 80 * 60 * 3 / 2**20
    cache = data.ImageCache(max_mb=3.5 * one_image_mb)                 # room for 3 decoded images
    ds = data.SrDataset(uris, scale=2, hr_crop=32, samples_per_image=2, seed=0, cache=cache)
    assert reads == [] and len(ds) == 20                                # nothing is read up front
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=4, rank=1, shuffle=True, seed=0)
    drawn = list(sampler)
    for i in drawn:
        ds[i]
    assert set(reads) == {uris[i % 10] for i in drawn} and len(set(reads)) < 10
    assert len(cache) <= 3 and cache.nbytes <= cache.max_bytes
    again = len(reads)
    ds[drawn[-1]]                                                       # the most recent one is still cached
    assert len(reads) == again and cache.hits >= 1
    assert data.shared_cache(64) is data.shared_cache(64)               # the stages of a run share one


def test_segmentation_source_size_comes_from_image_headers(tmp_path, monkeypatch):
    from imgxlate.train.tasks import RunConfig, SegTask, Stage

    _write_pairs(tmp_path, "kaggle", 6)
    monkeypatch.setattr(data, "read_rgb", lambda uri: pytest.fail(f"decoded {uri}"))
    td = SegTask().stage_data(RunConfig(task="seg", data=str(tmp_path), val_fraction=0.34), Stage(epochs=1, size=32),
                              "cpu")
    assert td.contract.source_size == (24, 32) and len(td.train) == 4 and td.plan.held_out


def test_image_size_reads_the_header_and_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6                                                    # rotate 90: width and height swap
    Image.fromarray(photo(20, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    from imgxlate.io.images import image_size, read_rgb
    assert image_size(str(tmp_path / "rotated.jpg")) == read_rgb(str(tmp_path / "rotated.jpg")).shape[:2]
    assert image_size(str(tmp_path / "rotated.jpg")) == (30, 20)


def test_style_gram_targets_are_computed_at_the_style_size_in_training_and_eval(tmp_path, capsys):
    import dataclasses
    import json

    from imgxlate import evaluate, losses
    from imgxlate.artifact import save
    from imgxlate.cli import main
    from imgxlate.infer.predictor import Predictor
    from imgxlate.losses import style_size_of, style_target
    from imgxlate.models import build
    from imgxlate.train.objectives import StyleObjective
    from imgxlate.train.tasks import RunConfig, Stage, StyleTask

    stripes = np.zeros((96, 160, 3), np.uint8)
    stripes[:, ::2] = 255                                              # 1 px strokes
    t = style_target(stripes, 48)
    assert t.shape == (1, 3, 48, 80) and float(t.std()) < 0.02         # shorter side 48, antialiased: grey
    assert style_target(stripes, None).shape == (1, 3, 96, 160)

    def grams(make):
        torch.manual_seed(0)                                           # the same random VGG for each
        return [g.clone() for g in make().style_grams()]
    at_48 = grams(lambda: StyleObjective(stripes, 48, "random").loss)
    assert all(torch.equal(a, b) for a, b in zip(at_48, grams(lambda: losses.StyleLoss(t, vgg_weights="random"))))
    assert not all(torch.allclose(a, b) for a, b in zip(at_48, grams(lambda: StyleObjective(stripes, None,
                                                                                            "random").loss)))
    # Training: the style size, by default the content size; recorded with the run config.
    Image.fromarray(stripes).save(tmp_path / "style.png")
    _write_images(tmp_path / "content", [(64, 64)] * 3)
    cfg = RunConfig(task="style", data=str(tmp_path / "content"), style_image=str(tmp_path / "style.png"),
                    vgg_weights="random", content_size=40)
    assert StyleTask().stage_data(cfg, Stage(epochs=1), "cpu").objective.style_size == 40
    cfg.style_size = 48
    assert StyleTask().stage_data(cfg, Stage(epochs=1), "cpu").objective.style_size == 48
    assert style_size_of({"content_size": 40}) is None                 # recorded before the setting: full size
    # eval style reads the recorded size and builds its loss the same way.
    model_dir = str(tmp_path / "model")
    save(build("style", n_blocks=2), model_dir, provenance={"config": dataclasses.asdict(cfg)})
    assert main(["eval", "style", "--model", model_dir, "--data", str(tmp_path / "content"), "--vgg-weights",
                 "random", "--out", str(tmp_path / "eval")]) == 0
    name = json.loads((tmp_path / "model" / "config.json").read_text())["model_id"]
    summary = json.loads((tmp_path / "eval" / name / "summary.json").read_text())
    assert summary["style_size"] == 48 and "at 48 px" in capsys.readouterr().out
    named = evaluate.read_named(str(tmp_path / "content"))
    rows = evaluate.eval_style(Predictor(model_dir), named, stripes, size=40, vgg_weights="random", style_size=48)
    assert summary["mean"]["loss"] == pytest.approx(np.mean([r.loss for r in rows]), rel=1e-6)
    full = evaluate.eval_style(Predictor(model_dir), named, stripes, size=40, vgg_weights="random")
    assert np.mean([r.loss for r in full]) != pytest.approx(summary["mean"]["loss"], rel=1e-3)


def test_cpu_training_runs_bf16_where_the_cpu_has_it_and_losses_stay_fp32():
    """--amp bf16 (the default) autocasts on a CPU with native bf16 (2.2x a step of sr-x2's model here), runs fp32
    elsewhere and with --amp off; the loss and the Gram matrices are fp32 either way."""
    from imgxlate.infer.precision import cpu_bf16_native
    from imgxlate.losses import gram
    from imgxlate.models import build
    from imgxlate.train.loop import LoopConfig, Trainer
    from imgxlate.train.objectives import SrObjective

    seen = []
    torch.manual_seed(0)
    model = build("sr", preset="tiny", scale=2)
    model.body.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = (torch.rand(2, 3, 16, 16), torch.rand(2, 3, 32, 32))
    for amp in ("bf16", "off"):
        trainer = Trainer(model, SrObjective(), [batch], LoopConfig(epochs=1, amp=amp))
        with trainer._autocast():
            loss, _ = trainer.objective(model, batch)
            g = gram(model.body(torch.rand(1, model.config.nf, 8, 8)))
        assert loss.dtype == g.dtype == torch.float32
        trainer.fit()
    want = torch.bfloat16 if cpu_bf16_native() else torch.float32
    assert seen[0] == want and seen[-1] == torch.float32
