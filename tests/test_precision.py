"""Precision is part of the contract: the --amp rule (imgxlate.infer.precision), the Predictor at each precision
(16-bit inputs kept in fp32), the manifest's precision column and the recipe, eval and the job agreeing under
every --amp, a model running out of device memory (an injected torch.OutOfMemoryError) and a failed compile."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imgxlate import metrics
from imgxlate.artifact import save
from imgxlate.cli import main
from imgxlate.infer import precision
from imgxlate.infer.predictor import PredictOptions, Predictor
from imgxlate.models import build

from conftest import photo
from fixtures import rows_of, summary_of


@pytest.fixture
def native(monkeypatch):
    """Pretend this CPU runs bf16 natively (or not: native(False)), whatever the machine has."""
    def set_(flag=True):
        monkeypatch.setattr(precision, "cpu_bf16_native", lambda: "avx512_bf16" if flag else None)
    set_()
    return set_


def _sr(cost=None, tmp_path=None):
    """A tiny SR model with random weights; saved as an artifact (with a recorded bf16 cost) when a path is given."""
    torch.manual_seed(0)
    model = build("sr", preset="tiny", scale=2)
    if tmp_path is None:
        return model.eval()
    save(model, str(tmp_path / "model"), precision_cost={"bf16": cost} if cost else None)
    return str(tmp_path / "model")


def test_the_amp_rule(native, tmp_path):
    sr = _sr()
    bicubic = build("bicubic", scale=2)
    assert precision.resolve("off", "cpu", sr)[0] == "fp32"
    assert precision.resolve("bf16", "cpu", sr)[0] == "bf16"
    assert precision.resolve("bf16", "cpu", bicubic)[0] == "fp32"           # exact MATLAB imresize, always
    with pytest.raises(precision.PrecisionError, match="GPUs only"):
        precision.resolve("fp16", "cpu", sr)
    with pytest.raises(precision.PrecisionError, match="unknown"):
        precision.resolve("half", "cpu", sr)
    # auto: a measured cost within the limits, on a CPU with native bf16
    sr.meta = {"precision_cost": {"bf16": {"psnr_db": 0.004}}}
    assert precision.resolve("auto", "cpu", sr) == ("bf16", precision.resolve("auto", "cpu", sr)[1])
    # ... over the limit: fp32, and why
    sr.meta = {"precision_cost": {"bf16": {"psnr_db": 0.05}}}
    prec, why = precision.resolve("auto", "cpu", sr)
    assert prec == "fp32" and "psnr_db cost 0.0500 > 0.02" in why
    sr.meta = {"precision_cost": {"bf16": {"dice": 0.002}}}
    assert precision.resolve("auto", "cpu", sr)[0] == "fp32"
    # ... nothing measured: fp32
    sr.meta = {}
    prec, why = precision.resolve("auto", "cpu", sr)
    assert prec == "fp32" and "no bf16 quality cost" in why
    # ... a CPU without native bf16: fp32, even for a model whose cost is measured
    sr.meta = {"precision_cost": {"bf16": {"psnr_db": 0.0}}}
    native(False)
    prec, why = precision.resolve("auto", "cpu", sr)
    assert prec == "fp32" and "natively" in why
    # an architecture that takes no bf16 (spandrel says so per model)
    native(True)
    sr.supports_bfloat16 = False
    assert precision.resolve("auto", "cpu", sr)[0] == "fp32"
    assert precision.resolve("bf16", "cpu", sr)[0] == "fp32"


def test_bf16_outputs_are_close_and_16_bit_inputs_stay_fp32(native, tmp_path):
    model = _sr({"psnr_db": 0.001}, tmp_path)
    img = photo(40, 52, seed=3)
    fp32 = Predictor(model, options=PredictOptions(amp="off"))
    bf16 = Predictor(model, options=PredictOptions(amp="bf16"))
    auto = Predictor(model, options=PredictOptions(amp="auto"))
    assert (fp32.precision, bf16.precision, auto.precision) == ("fp32", "bf16", "bf16")
    a, b = fp32.run([(img, None)])[0], bf16.run([(img, None)])[0]
    assert (a.precision, b.precision) == ("fp32", "bf16")
    diff = np.abs(a.pixels.astype(int) - b.pixels.astype(int))
    assert diff.max() <= 3 and (diff > 0).mean() < 0.2 and not np.array_equal(a.pixels, b.pixels)
    # A 16-bit input runs in fp32 under bf16: the same output as --amp off, and its row says fp32.
    img16 = (photo(40, 52, seed=4).astype(np.uint16) * 257 + 3)
    a16, b16 = fp32.run([(img16, None)])[0], bf16.run([(img16, None)])[0]
    assert b16.precision == "fp32" and a16.pixels.dtype == np.uint16
    assert np.abs(a16.pixels.astype(int) - b16.pixels.astype(int)).max() <= 1


def _lr_folder(tmp_path):
    """HR photos and their MATLAB-bicubic LR versions (eval's LR), plus one 16-bit LR PNG."""
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir()
    lr_dir.mkdir()
    hrs = {}
    for i, (h, w) in enumerate(((96, 120), (100, 84))):
        hr = metrics.mod_crop(photo(h, w, seed=20 + i), 2)
        hrs[f"img{i}.png"] = hr
        Image.fromarray(hr).save(hr_dir / f"img{i}.png")
        Image.fromarray(metrics.imresize(hr, 1 / 2)).save(lr_dir / f"img{i}.png")
    return hr_dir, lr_dir, hrs


@pytest.mark.parametrize("amp", ["off", "bf16", "auto"])
def test_job_outputs_score_what_eval_reports_under_every_amp(amp, native, tmp_path, ray_local, capsys):
    model = _sr({"psnr_db": 0.001}, tmp_path)
    hr_dir, lr_dir, hrs = _lr_folder(tmp_path)
    assert main(["eval", "sr", "--model", model, "--data", str(hr_dir), "--scale", "2", "--out",
                 str(tmp_path / "ev"), "--sheet", "0", "--amp", amp]) == 0
    expected = "fp32" if amp == "off" else "bf16"
    assert f"precision: {expected}" in capsys.readouterr().out
    ev = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert ev["precision"] == expected
    rows = {r["image"]: r for r in __import__("csv").DictReader((tmp_path / "ev" / "sr_x2.csv").open())}
    assert main(["translate", str(lr_dir), str(tmp_path / "out"), "--model", model, "--amp", amp,
                 "--run-id", "first"]) == 0
    s = summary_of(tmp_path / "out", "first")
    assert s["precision"] == expected and s["counts"] == {"ok": 2}
    assert {r["precision"] for r in rows_of(tmp_path / "out")} == {expected}
    for name, hr in hrs.items():
        written = np.asarray(Image.open(tmp_path / "out" / name))
        assert metrics.psnr(written, hr, 2) == pytest.approx(float(rows[name]["psnr"]), abs=0.01), name


def test_precision_is_in_the_recipe_and_the_manifest(native, tmp_path, ray_local):
    model = _sr({"psnr_db": 0.001}, tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(30, 40, seed=1)).save(src / "rgb.png")
    a16 = photo(30, 40, seed=2).astype(np.uint16) * 257
    Image.fromarray(a16[..., 0]).save(src / "gray16.png")                    # mode I;16
    dst = tmp_path / "dst"
    assert main(["translate", str(src), str(dst), "--model", model, "--amp", "bf16", "--run-id", "r1"]) == 0
    rows = {r["key"]: r for r in rows_of(dst, "r1")}
    assert rows["rgb.png"]["precision"] == "bf16" and rows["gray16.png"]["precision"] == "fp32"
    # The same options again: all done. Another --amp: another recipe, so every input is done again.
    assert main(["translate", str(src), str(dst), "--model", model, "--amp", "bf16", "--run-id", "r2"]) == 0
    assert summary_of(dst, "r2")["counts"] == {"skipped_done": 2}
    assert main(["translate", str(src), str(dst), "--model", model, "--amp", "off", "--run-id", "r3"]) == 0
    assert summary_of(dst, "r3")["counts"] == {"ok": 2}
    assert {r["precision"] for r in rows_of(dst, "r3")} == {"fp32"}
    assert rows_of(dst, "r3")[0]["recipe"] != rows["rgb.png"]["recipe"]


def test_a_dst_made_before_the_contract_was_hashed_is_not_redone():
    """The recipe hashes the model's inference contract since 2026-12-07; the recipe before it, pinned here as
    that version computed it, is an equivalent one, so a DST made then is resumed, not made again."""
    import hashlib
    import json

    from imgxlate.infer import config

    cfg = config.TranslateConfig(src="s", dst="d", model="m")
    meta = {"model_id": "sr-x2-abc", "sha256": "abc", "scale": 2, "precision": "bf16", "exact": False,
            "device_kind": "cpu", "contract": {"task": "sr", "geometry": "native", "tile": None}}
    before = {"model_id": "sr-x2-abc", "model_sha256": "abc", "scale": 2, "cutout": False, "format": "png",
              "suffix": "", "tile": None, "overlap": cfg.overlap, "quality": None, "precision": "bf16"}
    old = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert config.recipe(cfg, meta) != old and old in config.equivalent_recipes(cfg, meta)
    edited = {**meta, "contract": {**meta["contract"], "tile": 64}}
    assert config.recipe(cfg, edited) != config.recipe(cfg, meta)


def test_fp16_on_cpu_stops_before_any_work(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(20, 20)).save(src / "a.png")
    model = _sr({"psnr_db": 0.0}, tmp_path)
    assert main(["translate", str(src), str(tmp_path / "dst"), "--model", model, "--amp", "fp16",
                 "--gpus-per-actor", "0"]) == 2
    assert "--amp fp16 runs on GPUs only" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
    assert main(["eval", "sr", "--model", model, "--data", str(src), "--scale", "2", "--amp", "fp16"]) == 2


class RunsOutOfMemory(nn.Module):
    """x2 nearest upscaling that raises torch.OutOfMemoryError on a call over ``limit`` input pixels."""
    task, scale, arch = "sr", 2, "oom-test"

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.calls = limit, []
        self.register_buffer("anchor", torch.zeros(1))

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        if x.shape[0] * x.shape[2] * x.shape[3] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return x.repeat_interleave(2, 2).repeat_interleave(2, 3)


def test_out_of_memory_halves_the_batch_then_the_tile_and_every_output_is_right(capsys):
    imgs = [(photo(32, 32, seed=i), None) for i in range(8)]
    model = RunsOutOfMemory(limit=2 * 32 * 32)                 # two 32 px images per call at most
    pred = Predictor(model, options=PredictOptions(amp="off", tile=256, batch_pixels=8 * 32 * 32))
    out = pred.run(imgs)
    for (img, _), o in zip(imgs, out):
        assert not isinstance(o, Exception), o
        assert np.array_equal(o.pixels, img.repeat(2, 0).repeat(2, 1))
    assert pred.options.batch_pixels <= 2 * 32 * 32 and "halved" in capsys.readouterr().err
    # One large image whose tiles do not fit even one at a time: the tile is halved until they do.
    big = photo(300, 280, seed=9)
    model = RunsOutOfMemory(limit=100 * 100)
    pred = Predictor(model, options=PredictOptions(amp="off", tile=256, overlap=16))
    o = pred.run([(big, None)])[0]
    assert not isinstance(o, Exception), o
    assert np.array_equal(o.pixels, big.repeat(2, 0).repeat(2, 1)) and pred.options.tile <= 100
    # Nothing left to halve: the image's result is the error, without its traceback (which would hold tensors).
    pred = Predictor(RunsOutOfMemory(limit=10), options=PredictOptions(amp="off", tile=64, overlap=16))
    err = pred.run([(photo(20, 20), None)])[0]
    assert isinstance(err, torch.OutOfMemoryError) and err.__traceback__ is None


def test_a_failed_compile_runs_the_model_eagerly_with_one_warning(monkeypatch):
    def broken(model, **kw):
        def call(x):
            raise RuntimeError("dynamo: guard failure (injected)")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    model = _sr()
    img = photo(24, 24)
    eager = Predictor(model, options=PredictOptions(amp="off")).predict(img)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = Predictor(model, options=PredictOptions(amp="off", compile=True))
        first, second = pred.predict(img), pred.predict(img)
    assert np.array_equal(first, eager) and np.array_equal(second, eager)
    assert [str(w.message) for w in caught if "torch.compile" in str(w.message)] == [
        "torch.compile of the model failed (RuntimeError: dynamo: guard failure (injected)); running it eagerly"]


def test_the_shipped_sr_architecture_compiles_for_real():
    """Its bicubic skip used to stop dynamo (a guard on a cached from_numpy tensor): every --compile fell back.
    The skip now runs eagerly inside the compiled model; the rest compiles, and the pixels are eager's."""
    model = _sr()                                                  # tiny preset: global_residual="bicubic"
    imgs = [(photo(24, 24, seed=i), None) for i in range(2)] + [(photo(30, 20), None)]   # a second shape
    eager = Predictor(model, options=PredictOptions(amp="off")).run(imgs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = Predictor(model, options=PredictOptions(amp="off", compile=True))
        got = pred.run(imgs)
    assert not [w for w in caught if "torch.compile" in str(w.message)] and pred._compiled is not None
    for a, b in zip(got, eager):
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 1
