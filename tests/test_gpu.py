"""The Predictor on CUDA (`pytest -m gpu`; skipped without a usable GPU): outputs agree with CPU fp32 within what
each precision costs, tiling and alpha behave as on CPU, the next batch is staged from pinned memory, and running
out of device memory halves the work instead of failing it. Random or shipped weights, generated images."""

import numpy as np
import pytest
import torch

from imgxlate import external
from imgxlate.artifact import save
from imgxlate.infer.contract import for_task
from imgxlate.infer.predictor import PredictOptions, Predictor
from imgxlate.models import build

from conftest import photo

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu)")]


def _unet(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "unet")
    save(build("unet"), path, contract=for_task("seg", size=128, source_size=(256, 256)))
    return path


def _compact(tmp_path):
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    path = str(tmp_path / "compact_x4.pth")
    external.save_state_dict(Compact(num_in_ch=3, num_out_ch=3, num_feat=32, num_conv=8, upscale=4).state_dict(),
                             path)
    return path


def _pair(spec, amp, **kw):
    cpu = Predictor(spec, device="cpu", options=PredictOptions(amp="off", **kw))
    gpu = Predictor(spec, device="cuda", options=PredictOptions(amp=amp, **kw))
    return cpu, gpu


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
@pytest.mark.parametrize("which", ["sr-x2", "compact", "unet"])
def test_cuda_agrees_with_cpu_fp32(which, amp, tmp_path):
    spec = {"sr-x2": lambda: "sr-x2", "compact": lambda: _compact(tmp_path), "unet": lambda: _unet(tmp_path)}[which]()
    cpu, gpu = _pair(spec, amp, tile=128, overlap=16)
    assert gpu.precision == {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}[amp] or which == "compact"
    imgs = [(photo(200, 150, seed=i), None) for i in range(3)] + [(photo(64, 64, seed=9), None)] * 4
    for a, b in zip(cpu.run(imgs), gpu.run(imgs)):
        assert not isinstance(b, Exception), b
        diff = np.abs(a.pixels.astype(int) - b.pixels.astype(int))
        if which == "unet":                  # masks: a pixel flips only at the boundary
            assert (diff > 0).mean() < (0.001 if amp == "off" else 0.01)
        else:
            assert diff.max() <= (1 if amp == "off" else 4) and (diff > 1).mean() < 0.01


def test_alpha_and_16_bit_on_cuda():
    cpu, gpu = _pair("sr-x2", "bf16")
    rgba = photo(90, 70, seed=3, channels=4)
    img16 = photo(60, 50, seed=4).astype(np.uint16) * 257
    for (px, alpha) in ((rgba[..., :3], rgba[..., 3]), (img16, None)):
        a, b = cpu.run([(px, alpha)])[0], gpu.run([(px, alpha)])[0]
        assert b.pixels.dtype == px.dtype and np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 1
        if alpha is not None:
            assert np.array_equal(a.alpha, b.alpha)
        else:
            assert b.precision == "fp32"     # 16-bit stays out of bf16


def test_the_next_batch_is_staged_from_pinned_memory():
    gpu = Predictor("sr-x2", device="cuda", options=PredictOptions(amp="bf16", batch_pixels=2 * 64 * 64))
    imgs = [(photo(64, 64, seed=i), None) for i in range(6)]
    staged = gpu._stage(imgs, [0, 1])
    assert staged is not None and staged[2].is_pinned() and staged[0].device.type == "cuda"
    out = gpu.run(imgs)
    ref = Predictor("sr-x2", device="cuda", options=PredictOptions(amp="bf16", batch_pixels=64 * 64)).run(imgs)
    for a, b in zip(out, ref):
        assert np.array_equal(a.pixels, b.pixels)


def test_out_of_memory_on_cuda_halves_and_finishes():
    gpu = Predictor("sr-x2", device="cuda", options=PredictOptions(amp="bf16"))
    real = gpu.model.forward
    limit = 96 * 96

    def forward(x):                          # a real CUDA model that "runs out of memory" above a budget
        if x.shape[0] * x.shape[2] * x.shape[3] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(x)
    gpu.model.forward = forward
    imgs = [(photo(64, 64, seed=i), None) for i in range(4)] + [(photo(300, 200, seed=7), None)]
    out = gpu.run(imgs)
    assert all(not isinstance(o, Exception) for o in out)
    assert gpu.options.tile * gpu.options.tile <= limit


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16", "auto"])
def test_the_job_on_the_gpu_scores_what_eval_reports(amp, tmp_path, ray_local, capsys):
    """The user's path on a GPU machine: `eval` and `translate` with the same --amp, each on the GPU (local Ray
    gives the model actors the GPU), and the job's outputs score what eval reported, image by image."""
    import csv
    import json

    from PIL import Image

    from imgxlate import metrics
    from imgxlate.cli import main

    from fixtures import rows_of, summary_of

    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir()
    lr_dir.mkdir()
    hrs = {}
    for i, (h, w) in enumerate(((96, 120), (100, 84), (300, 260))):
        hr = metrics.mod_crop(photo(h, w, seed=30 + i), 2)
        hrs[f"img{i}.png"] = hr
        Image.fromarray(hr).save(hr_dir / f"img{i}.png")
        Image.fromarray(metrics.imresize(hr, 1 / 2)).save(lr_dir / f"img{i}.png")
    expected = {"off": "fp32", "bf16": "bf16", "fp16": "fp16", "auto": "bf16"}[amp]
    assert main(["eval", "sr", "--model", "sr-x2", "--data", str(hr_dir), "--scale", "2", "--out",
                 str(tmp_path / "ev"), "--sheet", "0", "--amp", amp]) == 0
    assert f"precision: {expected}" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["precision"] == expected
    rows = {r["image"]: r for r in csv.DictReader((tmp_path / "ev" / "sr_x2.csv").open())}
    assert main(["translate", str(lr_dir), str(tmp_path / "out"), "--model", "sr-x2", "--amp", amp,
                 "--pipeline", "fused", "--run-id", "gpu"]) == 0
    s = summary_of(tmp_path / "out", "gpu")
    assert s["precision"] == expected and s["counts"] == {"ok": 3}, s
    assert (s.get("resources") or {}).get("gpus_per_actor"), s.get("resources")   # the actors had the GPU
    assert {r["precision"] for r in rows_of(tmp_path / "out")} == {expected}
    for name, hr in hrs.items():
        written = np.asarray(Image.open(tmp_path / "out" / name))
        assert metrics.psnr(written, hr, 2) == pytest.approx(float(rows[name]["psnr"]), abs=0.01), name
