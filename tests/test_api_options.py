"""The Python API and MapImages as a caller uses them (from a hostile-user review): options made the flags'
types or refused with CannotRun, paths as pathlib paths, Hugging Face Image structs, masks never in a lossy
format, a bicubic recipe alike for 2 and 2.0, and a caller's process left as it was (Ray Data's settings, the S3
endpoint, a Ray the call started)."""

import io
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import imgxlate
from imgxlate.api import config
from imgxlate.artifact import save
from imgxlate.data import MapImages
from imgxlate.infer.config import equivalent_recipes, model_info, recipe
from imgxlate.models import build

from fixtures import good_files, write_tree


def _png(shape=(8, 12, 3)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 120, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_options_are_made_the_flags_types_or_refused(tmp_path):
    cfg = config(pathlib.Path(tmp_path), tmp_path / "out", "bicubic", tile=np.int64(512), scale=2,
                 extensions="png, jpg", cpus_per_actor=1, wait_for_lease=30, cutout=np.bool_(False))
    assert (cfg.src, cfg.dst, cfg.tile, cfg.scale) == (str(tmp_path), str(tmp_path / "out"), 512, 2.0)
    assert type(cfg.tile) is int and cfg.extensions == ("png", "jpg") and cfg.wait_for_lease_s == 30.0
    assert config("a", "b", "bicubic", extensions=["png", "webp"]).extensions == ("png", "webp")
    for bad, says in [({"tile": "512"}, "tile='512' is a str; give an int"),
                      ({"tile": 512.0}, "give an int or None"),
                      ({"cutout": "yes"}, "True or False"),
                      ({"extensions": []}, "names no extension"),
                      ({"extensions": "png,"}, None),
                      ({"limit": True}, "limit=True"),
                      ({"suffix": pathlib.Path("x")}, "give a string")]:
        if says is None:
            assert config("a", "b", "bicubic", **bad).extensions == ("png",)
            continue
        with pytest.raises(imgxlate.CannotRun, match=r"^imgxlate.translate\(\): ") as e:
            config("a", "b", "bicubic", **bad)
        assert says in str(e.value)
    with pytest.raises(imgxlate.CannotRun, match="MapImages: tile='64'"):
        MapImages(model="bicubic", scale=2, tile="64")


def test_pathlib_paths_run_and_an_extensions_string_finds_its_files(tmp_path):
    write_tree(tmp_path / "src", {"a.png": _png(), "b.jpg": good_files()["gray.png"], "c.webp": b"skipped"})
    summary = imgxlate.translate(tmp_path / "src", tmp_path / "dst", model="bicubic", scale=2,
                                 extensions="png,jpg", progress_every_s=60)
    assert summary["inputs"] == 2 and summary["counts"] == {"ok": 2}
    save(build("sr", preset="tiny", scale=2), str(tmp_path / "sr"))
    stage = MapImages(model=tmp_path / "sr")
    assert stage(pa.table({"image": [_png()]})).column("status").to_pylist() == ["ok"]


def test_bicubic_recipe_is_the_same_for_2_and_2_point_0_and_keeps_older_dsts(tmp_path):
    a, b = config("s", "d", "bicubic", scale=2.0), config("s", "d", "bicubic")
    ma, mb = model_info(a), model_info(b)
    assert recipe(a, ma) == recipe(b, mb)
    import hashlib
    import json
    old = {"model_id": "bicubic-x2", "model_sha256": "", "scale": 2.0, "cutout": False, "format": "png",
           "suffix": "", "tile": None, "overlap": 32, "quality": None, "precision": ma["precision"],
           "contract": ma["contract"]}                       # what --scale 2 hashed before the scale was normalised
    assert hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16] in equivalent_recipes(a, ma)


def test_map_images_reads_hugging_face_image_structs_and_refuses_clashing_output_columns(tmp_path):
    stage = MapImages(model="bicubic", scale=2)
    (tmp_path / "c.png").write_bytes(_png())
    out = stage(pa.table({"image": [{"bytes": _png(), "path": "a.png"}, {"bytes": None, "path": "b.png"},
                                    {"bytes": None, "path": str(tmp_path / "c.png")}]}))   # decode=False: paths
    assert out.column("status").to_pylist() == ["ok", "read_error", "ok"]
    assert "'b.png' cannot be read" in out.column("error")[1].as_py()
    assert Image.open(io.BytesIO(out.column("output")[0].as_py())).size == (24, 16)
    for name in ("status", "image"):
        with pytest.raises(ValueError, match=f"output_column={name!r}"):
            MapImages(model="bicubic", scale=2, output_column=name)


def test_masks_are_refused_in_a_lossy_format(tmp_path):
    path = str(tmp_path / "unet")
    save(build("unet", encoder_weights="none"), path)
    for fmt in ("jpeg", "webp"):
        with pytest.raises(imgxlate.CannotRun, match=f"0/255 masks, which {fmt} would not keep"):
            MapImages(model=path, format=fmt)
    MapImages(model=path, format="jpeg", cutout=True)          # a cut-out on white: a product photo's JPEG


CALLER = textwrap.dedent("""
    import logging, os, sys
    import ray, ray.data
    import imgxlate
    from imgxlate.io import manifest
    src, dst = sys.argv[1], sys.argv[2]
    ctx = ray.data.DataContext.get_current()
    before = (ctx.max_errored_blocks, ctx.execution_options.preserve_order, ctx.enable_progress_bars,
              ctx.target_max_block_size, list(ctx.custom_execution_callback_classes),
              logging.getLogger("ray.data").level, os.environ.get("AWS_ENDPOINT_URL"))
    s = imgxlate.translate(src, dst, model="bicubic", scale=2, pipeline="fused", num_cpus=2, cpus_per_actor=0.5,
                           s3_endpoint="http://127.0.0.1:9", progress_every_s=60)
    after = (ctx.max_errored_blocks, ctx.execution_options.preserve_order, ctx.enable_progress_bars,
             ctx.target_max_block_size, list(ctx.custom_execution_callback_classes),
             logging.getLogger("ray.data").level, os.environ.get("AWS_ENDPOINT_URL"))
    assert s["counts"] == {"ok": 3}, s
    assert len(manifest.read_run(dst, s["run_id"])) == 3
    assert after == before, (before, after)
    assert not ray.is_initialized(), "the Ray this call started is still up"
    print("CALLER OK")
""")


def test_a_callers_process_is_left_as_it_was(tmp_path):
    """A run on Ray that started Ray itself, in a fresh process as a notebook runs it: afterwards Ray is down, Ray
    Data's settings and logger are the caller's, and the S3 endpoint given for the run is gone."""
    write_tree(tmp_path / "src", {f"{i}.png": _png() for i in range(3)})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL")}
    out = subprocess.run([sys.executable, "-c", CALLER, str(tmp_path / "src"), str(tmp_path / "dst")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert "CALLER OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_a_mistyped_model_name_gets_the_shipped_names(tmp_path):
    with pytest.raises(imgxlate.CannotRun, match=r"no model named 'sr-x3': did you mean sr-x4 or sr-x2\?.* the "
                                                 r"shipped models are restore-x2, sr-x2, sr-x4 \(and bicubic\)"):
        imgxlate.translate(tmp_path, tmp_path / "out", model="sr-x3")
