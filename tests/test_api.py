"""The Python API (imgxlate.translate) and the Ray Data stage (imgxlate.data.MapImages): the same outputs, bytes for
bytes, as the batch job, bad images as rows, errors typed as the command's exit statuses are."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import imgxlate
from imgxlate.artifact import save
from imgxlate.data import COLUMNS, MapImages
from imgxlate.io import manifest
from imgxlate.models import build

from fixtures import bad_files, good_files, write_tree


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random-weight x2 SR model whose recorded bf16 cost lets --amp auto pick bf16 where the CPU has it: the
    stage must resolve the precision the job does."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "sr"
    save(build("sr", preset="tiny", scale=2), str(path), precision_cost={"bf16": {"psnr_db": 0.001, "on": "test"}})
    return str(path)


@pytest.fixture(scope="module")
def inputs():
    files = dict(good_files())
    files.update({n: b for n, (b, _) in bad_files().items()})
    return files


@pytest.fixture(scope="module")
def job_rows(tmp_path_factory, ray_local, model, inputs):
    """One run of the job through the Python API over every good and bad fixture."""
    src, dst = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dst")
    write_tree(src, inputs)
    summary = imgxlate.translate(str(src), str(dst), model=model, progress_every_s=60)
    rows = {r["key"]: r for r in manifest.read_run(str(dst), summary["run_id"]).to_pylist()}
    return summary, rows


def test_translate_returns_the_summary_of_the_run_it_made(job_rows, inputs):
    summary, rows = job_rows
    assert summary["inputs"] == len(inputs) == len(rows)
    assert summary["counts"] == {"ok": len(good_files()), "decode_error": 5, "too_large": 1}
    assert summary["failed"] == 6


def test_map_images_makes_the_jobs_outputs_byte_for_byte(job_rows, model, inputs):
    """Through the same decoder, Predictor (at the same precision) and encoder as the job: same status, same
    output sha256, same recipe, for every fixture; a bad image is a row, never an exception."""
    from imgxlate.infer.precision import cpu_bf16_native

    _, rows = job_rows
    names = sorted(inputs)
    stage = MapImages(model=model)
    assert stage.meta["precision"] == ("bf16" if cpu_bf16_native() else "fp32")
    out = stage(pa.table({"name": names, "image": [inputs[n] for n in names]}))
    assert out.column("name").to_pylist() == names                         # the batch's own columns are kept
    for name, got in zip(names, out.to_pylist()):
        want = rows[name]
        assert got["status"] == want["status"], (name, got["error"], want["error"])
        for c in ("output_sha256", "recipe", "precision", "model_id", "output_width", "output_height",
                  "source_mode", "source_width", "source_height"):
            assert got[c] == want[c], (name, c)
        if got["status"] == "ok":
            assert len(got["output"]) == got["output_bytes"] == want["output_bytes"]
        else:
            assert got["output"] is None and got["error"]


def test_null_and_non_image_values_get_rows_with_their_status():
    stage = MapImages(model="bicubic", scale=2, format="jpeg", quality=90)
    png = io.BytesIO()
    Image.fromarray(np.full((8, 12, 3), 200, np.uint8)).save(png, "PNG")
    out = stage(pa.table({"image": pa.array([None, b"not an image", png.getvalue()], pa.binary())}))
    assert out.column("status").to_pylist() == ["read_error", "decode_error", "ok"]
    assert "null" in out.column("error")[0].as_py()
    assert Image.open(io.BytesIO(out.column("output")[2].as_py())).size == (24, 16)
    assert out.column("output_format")[2].as_py() == "jpeg"


def test_pandas_and_numpy_batches_and_column_names():
    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, "PNG")
    stage = MapImages(model="bicubic", scale=2, column="bytes", output_column="x2", prefix="ix_")
    pdf = stage(pa.table({"bytes": [png.getvalue(), None]}).to_pandas())
    assert list(pdf["ix_status"]) == ["ok", "read_error"] and pdf["x2"].isna().tolist() == [False, True]
    arrays = stage({"bytes": np.array([png.getvalue(), "text"], dtype=object)})
    assert list(arrays["ix_status"]) == ["ok", "read_error"] and "str" in arrays["ix_error"][1]
    assert set(arrays) == {"bytes", "x2", *("ix_" + c for c in COLUMNS)}
    with pytest.raises(ValueError, match="prefix"):                   # never overwrites a column of the batch
        MapImages(model="bicubic", scale=2)(pa.table({"image": [png.getvalue()], "status": ["mine"]}))
    with pytest.raises(KeyError, match="column="):
        stage(pa.table({"image": [png.getvalue()]}))


def test_bad_options_are_refused_as_the_command_refuses_them(tmp_path):
    with pytest.raises(TypeError, match="tile"):
        MapImages(model="bicubic", scale=2, tiles=256)
    with pytest.raises(imgxlate.CannotRun, match="--quality"):
        MapImages(model="bicubic", scale=2, quality=0)
    with pytest.raises(imgxlate.CannotRun, match="model"):
        MapImages(model=str(tmp_path / "no-such-model"))
    with pytest.raises(TypeError, match="did you mean 'tile'"):
        imgxlate.translate(str(tmp_path), str(tmp_path / "out"), model="bicubic", tiles=256)
    with pytest.raises(imgxlate.CannotRun, match="does not exist|no such|not found"):
        imgxlate.translate(str(tmp_path / "missing"), str(tmp_path / "out"), model="bicubic", scale=2)


def test_fail_on_error_raises_with_the_summary(tmp_path, ray_local):
    write_tree(tmp_path / "src", {"a.png": good_files()["gray.png"], "b.jpg": b"broken"})
    with pytest.raises(imgxlate.InputsFailed) as e:
        imgxlate.translate(str(tmp_path / "src"), str(tmp_path / "dst"), model="bicubic", scale=2,
                           fail_on_error=True, progress_every_s=60)
    assert e.value.summary["counts"] == {"ok": 1, "decode_error": 1}


def test_map_images_as_a_ray_data_stage_parquet_in_parquet_out(tmp_path, ray_local, model, inputs):
    """The README's example: read Parquet with an image-bytes column, map with an actor pool, write Parquet; every
    input row comes back once, with its own columns, its output and its status."""
    import ray

    names = sorted(inputs)
    pq.write_table(pa.table({"id": list(range(len(names))), "name": names,
                             "image": pa.array([inputs[n] for n in names] , pa.binary())}),
                   tmp_path / "in.parquet", row_group_size=4)
    ds = ray.data.read_parquet(str(tmp_path / "in.parquet"))
    ds = ds.map_batches(MapImages, fn_constructor_kwargs={"model": model}, batch_size=8, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    ds.drop_columns(["image"]).write_parquet(str(tmp_path / "out"))
    out = pq.read_table(tmp_path / "out").sort_by("id").to_pylist()
    assert [r["name"] for r in out] == names
    want = MapImages(model=model)(pa.table({"image": [inputs[n] for n in names]})).to_pylist()
    for got, w in zip(out, want):
        assert (got["status"], got["output_sha256"]) == (w["status"], w["output_sha256"]), got["name"]
    ok = [r for r in out if r["status"] == "ok"]
    assert len(ok) == len(good_files())
    img = Image.open(io.BytesIO(next(r for r in ok if r["name"] == "64x48_rgb.jpg")["output"]))
    assert img.size == (128, 96)


def test_counters_reach_rays_prometheus_export(tmp_path, ray_local):
    """Inputs by status, bytes in and out and model seconds, as Ray's Prometheus endpoint serves them (Ray reports a
    worker's metrics every few seconds). The model id (bicubic-x5) is this test's own: nothing else in the session
    counts under it."""
    import re
    import time
    import urllib.request

    import ray

    files = {f"{i}.png": good_files()["gray.png"] for i in range(4)}
    files["bad.jpg"] = b"not a jpeg"
    write_tree(tmp_path / "src", files)
    summary = imgxlate.translate(str(tmp_path / "src"), str(tmp_path / "dst"), model="bicubic", scale=5,
                                 progress_every_s=60)
    assert summary["counts"] == {"ok": 4, "decode_error": 1}

    def value(text, name, **labels):
        total = 0.0
        for line in text.splitlines():
            if line.startswith(f"ray_{name}_total{{") and 'model_id="bicubic-x5"' in line and \
                    all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if value(text, "imgxlate_inputs", status="ok") == 4 and value(text, "imgxlate_inputs", status="decode_error"):
            break
        time.sleep(1)
    assert value(text, "imgxlate_inputs", status="ok") == 4, re.findall(r"ray_imgxlate\S*", text)[:10]
    assert value(text, "imgxlate_inputs", status="decode_error") == 1
    assert value(text, "imgxlate_source_bytes") == summary["source_bytes"]
    assert value(text, "imgxlate_output_bytes") == summary["output_bytes"]
    assert value(text, "imgxlate_model_seconds") > 0


def test_empty_batches_and_chunks(model):
    """An empty block, even one without a schema, comes back with the added columns; a batch larger than
    batch_size is decoded, run and encoded batch_size images at a time, with the same rows."""
    stage = MapImages(model="bicubic", scale=2, batch_size=2)
    assert stage(pa.table({})).column_names == ["output", *COLUMNS]
    assert stage(pa.table({"image": pa.array([], pa.binary())})).num_rows == 0
    images = [good_files()["gray.png"], None, b"junk", good_files()["64x48_rgb.jpg"], good_files()["gray.png"]]
    out = stage(pa.table({"image": pa.array(images, pa.binary())}))
    assert out.column("status").to_pylist() == ["ok", "read_error", "decode_error", "ok", "ok"]
    assert out.column("output")[0].as_py() == out.column("output")[4].as_py()
    df = stage(pa.table({"image": pa.array(images, pa.binary())}).to_pandas())
    assert str(df["output_width"].dtype).startswith("int32") and df["status"].tolist()[1] == "read_error"
    with pytest.raises(imgxlate.CannotRun, match="batch_size"):
        MapImages(model="bicubic", scale=2, batch_size=0)
