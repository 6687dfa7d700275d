"""What a user is told when a run cannot go ahead: an invalid --run-id or a missing SRC exits 2 with a message
naming it (an SRC with no images exits 0); credentials in a URI are refused and never printed, nor in a storage
error or a traceback; access denied on DST exits 2 naming the bucket, before anything is written. Options that would
give wrong pixels (a tile under twice the overlap, a quality out of the codec's range, ...) and a model that cannot
load (weights that fail their checksum, a config that does not fit them, a scale or task that does not fit the
options), and a manifest that lists no image, exit 2 with one line that states the rule, before Ray starts."""

import json
import os
import subprocess
import sys
import time

import boto3
import requests

from imgxlate.artifact import save
from imgxlate.infer import job
from imgxlate.infer.config import TranslateConfig, check_tiles
from imgxlate.io import manifest
from imgxlate.models import build

from conftest import photo
from fixtures import png, translate, write_tree


def test_run_id_is_validated_and_an_empty_source_exits_0(tmp_path, capsys):
    src = tmp_path / "src"
    write_tree(src, {"a.png": png(photo(8, 8)), "notes.txt": b"not an image"})
    for bad in ("../x", "a/b", "..", ".", "a\\b", "x y", ""):
        assert translate(src, tmp_path / "dst", "--run-id", bad) == 2, bad
        assert "--run-id" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
    empty = tmp_path / "empty"
    write_tree(empty, {"notes.txt": b"not an image"})
    assert translate(empty, tmp_path / "dst") == 0
    assert "no inputs" in capsys.readouterr().err and not (tmp_path / "dst").exists()
    assert translate(tmp_path / "missing", tmp_path / "dst") == 2
    assert "does not exist" in capsys.readouterr().err
    # A text file given as SRC is a manifest: one that lists no image is a mistake to name, not "no inputs".
    (tmp_path / "notes.txt").write_text("hello world\nthis is not a list of images\n")
    assert translate(tmp_path / "notes.txt", tmp_path / "dst") == 2
    err = capsys.readouterr().err
    assert "manifest" in err and "none an image" in err and "'hello world'" in err and not (tmp_path / "dst").exists()
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    (tmp_path / "header.csv").write_text("filename,label\n")             # a header that names no URI column
    for empty in ("empty.txt", "header.csv"):
        assert translate(tmp_path / empty, tmp_path / "dst") == 0          # an empty list: nothing to do
        assert "no inputs" in (err := capsys.readouterr().err) and "warning" not in err


def test_secrets_in_uris_are_never_printed(tmp_path, capsys, monkeypatch):
    key_id, secret = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    leaked = f"s3://{key_id}:{secret}@bucket/in"
    src = tmp_path / "src"
    write_tree(src, {"a.png": png(photo(8, 8))})
    for argv in ([leaked, tmp_path / "o"], [src, leaked], [src, tmp_path / "o", "--model", leaked + "/model"]):
        assert translate(*argv, "--scale", "2") == 2
        out, err = capsys.readouterr()
        assert "credentials" in err, err
        for text in (out, err):
            assert secret not in text and key_id not in text and secret.split("/")[0] not in text
    # A storage error that quotes a URL with user info: exit 2, redacted.
    def unreadable(*args, **kwargs):
        raise OSError(f"cannot list https://{key_id}:{secret}@host/_manifest")

    monkeypatch.setattr(manifest, "shard_markers", unreadable)
    assert translate(src, tmp_path / "o", "--scale", "2") == 2
    out, err = capsys.readouterr()
    assert "cannot list https://host/_manifest" in err and secret not in out + err and key_id not in err
    # Any exception that escapes is printed redacted, traceback included.
    monkeypatch.setattr(job, "planner", unreadable)
    assert translate(src, tmp_path / "o", "--scale", "2") == 1
    out, err = capsys.readouterr()
    assert "Traceback" in err and "OSError: cannot list https://host/_manifest" in err
    assert secret not in out + err and secret.split("/")[0] not in err and key_id not in err
    from imgxlate.io.listing import redact, redact_text

    assert redact(leaked) == "s3://bucket/in" and redact(f"ftp://u:{secret}@host:21/x") == "ftp://host:21/x"
    assert redact("s3://b/icons/logo@2x.png") == "s3://b/icons/logo@2x.png"
    assert secret not in redact_text(f"GET sftp://{key_id}:{secret}@h/x failed")


def test_access_denied_on_dst_exits_2_naming_the_bucket(tmp_path, bucket, s3_server):
    """moto enforces IAM user policies (not bucket policies) once its authentication is switched on
    through the server's own API; the job runs in a fresh process with that user's credentials."""
    src = tmp_path / "src"
    write_tree(src, {"a.png": png(photo(8, 8))})
    iam = boto3.client("iam", endpoint_url=s3_server)
    keys = {}
    for user, actions in (("no-dst", "s3:*"), ("no-put", "s3:PutObject")):
        iam.create_user(UserName=f"{user}-{bucket}")
        iam.put_user_policy(UserName=f"{user}-{bucket}", PolicyName="p", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": actions,
                 "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
        keys[user] = iam.create_access_key(UserName=f"{user}-{bucket}")["AccessKey"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "AWS_ENDPOINT_URL": s3_server}
    results = {}
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0").raise_for_status()
    try:
        for user, k in keys.items():
            results[user] = subprocess.run(
                [sys.executable, "-m", "imgxlate.cli", "translate", str(src), f"s3://{bucket}/out",
                 "--model", "bicubic", "--scale", "2"], capture_output=True, text=True, timeout=300,
                env={**env, "AWS_ACCESS_KEY_ID": k["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": k["SecretAccessKey"]})
    finally:
        requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf").raise_for_status()
    for user, r in results.items():
        assert r.returncode == 2, (user, r.stderr[-3000:])
        assert f"access denied on bucket '{bucket}'" in r.stderr and "Traceback" not in r.stderr, (user, r.stderr)
    assert boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def _refused(capsys, src, dst, *argv) -> str:
    """The one error line of a translate that must stop before any work (exit 2, nothing written)."""
    assert translate(src, dst, *argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgxlate translate: error: "), (argv, err)
    assert not dst.exists(), argv
    return err[0]


def test_options_that_would_give_wrong_pixels_are_refused_with_the_rule(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"a.png": png(photo(8, 8))})
    cases = {("--tile", "48"): "--tile 48 must be at least twice --overlap (32)",
             ("--tile", "48", "--overlap", "32"): "give --overlap 24 or less, or a --tile of at least 64",
             ("--format", "jpeg", "--quality", "0"): "--quality 0 is out of range: JPEG and WebP quality runs from 1",
             ("--format", "webp", "--quality", "101"): "--quality 101 is out of range",
             ("--quality", "-5"): "PNG is lossless and takes none",
             ("--png-level", "10"): "--png-level 10 is out of range: zlib's levels run from 0",
             ("--overlap", "-8"): "--overlap -8 is too small: tiles must overlap by at least 8 px",
             ("--overlap", "0"): "--overlap 0 is too small",
             ("--tile", "0"): "--tile 0 is too small: a tile must be at least 16 px",
             ("--tile", "-64", "--overlap", "8"): "--tile -64 is too small",
             ("--overlap", "200"): "--overlap 200 is more than half the tile the job picks by itself on CPU (256 px)",
             ("--scale", "1.5"): "--scale 1.5: the scale must be a whole number",
             ("--scale", "0"): "--scale 0: the scale must be a whole number",
             ("--cutout",): "--cutout writes a segmentation model's cut-out, but bicubic is a sr model",
             ("--limit", "0"): "--limit 0: give at least 1",
             ("--actors", "0"): "--actors and --threads-per-actor must be at least 1",
             ("--gpus-per-actor", "-1"): "--gpus-per-actor at least 0"}
    for argv, rule in cases.items():
        scale = () if "--scale" in argv else ("--scale", "2")
        assert rule in _refused(capsys, src, dst, *scale, *argv), argv
    assert translate(src, dst, "--scale", "2", "--tile", "64", "--overlap", "32", "--dry-run") == 0   # the limit
    # GPU actors tile at 1024 px by themselves: an overlap of 200 is right there (checked before Ray starts).
    assert check_tiles(TranslateConfig(str(src), str(dst), "bicubic", overlap=200, gpus_per_actor=1), None, "") is None
    capsys.readouterr()
    # A style model must be run in tiles of its training crop: another --tile, or an overlap over half of it, is
    # refused; the default overlap is cut to a quarter of the crop, as the Predictor does.
    style = tmp_path / "style"
    save(build("style", n_blocks=1, norm="instance"), str(style), provenance={"config": {"content_size": 48}})
    assert "must be run in tiles of 48 px (its training crop" in \
        _refused(capsys, src, dst, "--model", style, "--tile", "64")
    assert f"{style}'s tile of 48 px must be at least twice --overlap (30)" in \
        _refused(capsys, src, dst, "--model", style, "--overlap", "30")
    assert translate(src, dst, "--model", style, "--dry-run") == 0
    assert translate(src, dst, "--model", style, "--tile", "48", "--overlap", "24", "--dry-run") == 0


def _tiny_sr(path) -> str:
    save(build("sr", preset="tiny", scale=2), str(path))
    return str(path)


def test_a_model_that_cannot_load_stops_at_once_with_one_line_and_no_ray(tmp_path):
    """Weights that no longer match the checksum in config.json: exit 2 with one line, in seconds, Ray never
    started (before, every model actor died with its traceback and the run exited 1 after 29 s)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"a.png": png(photo(8, 8))})
    model = _tiny_sr(tmp_path / "model")
    weights = tmp_path / "model/weights.pt"
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF
    weights.write_bytes(bytes(data))
    code = ("import sys, ray; from imgxlate.cli import main; rc = main(sys.argv[1:]); "
            "print('ray started' if ray.is_initialized() else 'no ray'); sys.exit(rc)")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code, "translate", str(src), str(dst), "--model", model],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        f"imgxlate translate: error: model {model}: weights do not match the checksum in config.json (corrupt or "
        f"replaced)"], r.stderr[-3000:]
    assert r.stdout.strip() == "no ray" and not dst.exists()
    assert elapsed < 30, elapsed             # python and torch start-up, the load itself: no Ray, no actors


def test_a_model_whose_config_scale_or_task_does_not_fit_is_refused_in_the_driver(tmp_path, capsys, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_tree(src, {"a.png": png(photo(8, 8))})
    started = []
    monkeypatch.setattr(job, "planner", lambda *a, **k: started.append(1) or (_ for _ in ()).throw(AssertionError))
    model = _tiny_sr(tmp_path / "model")
    config = tmp_path / "model/config.json"
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "config": {**meta["config"], "n_blocks": meta["config"]["n_blocks"] + 1}}))
    line = _refused(capsys, src, dst, "--model", model)      # config.json and weights no longer fit each other
    assert f"error: model {model}: Error(s) in loading state_dict for SrResnet: Missing key(s)" in line, line
    config.write_text(json.dumps(meta))
    assert f"model {model} is x2, but --scale 4 was given" in _refused(capsys, src, dst, "--model", model,
                                                                       "--scale", "4")
    assert f"but {model} is a sr model: leave --cutout out" in _refused(capsys, src, dst, "--model", model,
                                                                        "--cutout")
    assert not started


def test_the_other_commands_refuse_bad_input_in_one_line_before_any_work(tmp_path, capsys):
    """train, lr-find, eval, info and sample-photos: a value out of range, a model or image that cannot be read, or
    a plan that cannot run is one line and exit 2 (argparse's usage error for a value), never a traceback."""
    import pytest

    from imgxlate import degrade
    from imgxlate.cli import main
    from imgxlate.flags import DEGRADATIONS

    assert DEGRADATIONS == tuple(degrade.PRESETS)
    data = tmp_path / "data"
    write_tree(data, {"a.png": png(photo(40, 40)), "b.png": b"\x89PNG\r\n\x1a\n cut short"})
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.json").write_text("{not json")
    (tmp_path / "file").write_text("x")
    usage = {("train", "sr", str(data), "--epochs", "0"): "--epochs: 0: give a whole number, at least 1",
             ("train", "sr", str(data), "--lr", "nan"): "--lr: nan: give a finite number, more than 0",
             ("train", "sr", str(data), "--ema", "1"): "--ema: 1: give a finite number, at least 0, less than 1",
             ("train", "sr", str(data), "--scale", "3"): "invalid choice: 3",
             ("train", "sr", str(data), "--degradations", "bogus"): "invalid choice: 'bogus'",
             ("eval", "sr", "--model", "sr-x2", "--data", str(data), "--scale", "0"): "--scale: 0: give a whole",
             ("translate", str(data), str(tmp_path / "dst"), "--scale", "inf"): "--scale: inf: give a finite number",
             ("sample-photos", str(tmp_path / "p"), "--max-side", "-5"): "--max-side: -5: give a whole number",
             ("translate", str(data), str(tmp_path / "dst"), "--extensions", ","): "',' names no extension"}
    for argv, words in usage.items():
        with pytest.raises(SystemExit) as stop:
            main(list(argv))
        assert stop.value.code == 2 and words in capsys.readouterr().err, argv
    refused = {("train", "sr", str(data), "--model-config", "{bad"): "--model-config '{bad' is not JSON",
               ("train", "sr", str(data), "--model-config", "[1]"): "give a JSON object",
               ("train", "sr", str(data), "--stages", "2:x"): "'2:x' is not SCALE:EPOCHS or SCALE:EPOCHS:new",
               ("train", "seg", str(data), "--stages", "128:2:new"): "is not SIZE:EPOCHS or SIZE:EPOCHS:frozen",
               ("train", "sr", str(data), "--stages", "2:1,3:1:new"): "scale 3 is not one of 1, 2, 4, 8",
               ("train", "sr", str(data), "--name", "../../etc"): "a run's name is one folder name",
               ("lr-find", "sr", str(data), "--start-lr", "1", "--end-lr", "0.1"): "--start-lr 1 must be below",
               ("eval", "sr", "--model", "nothing-here", "--data", str(data), "--scale", "2"): "no model named",
               ("eval", "sr", "--model", "sr-x2", "--data", str(data), "--scale", "4"): "x2 model but --scale 4",
               ("eval", "seg", "--model", "sr-x2", "--data", str(data)): "sr-x2 is a sr model; eval seg scores seg",
               ("eval", "sr", "--model", "sr-x2", "--data", str(data), "--scale", "2"):
                   "b.png cannot be read (DecodeError",
               ("info", str(tmp_path / "damaged")): "its config.json is damaged",
               ("info", "nothing-here"): "no model named 'nothing-here'",
               ("info", str(tmp_path / "nothing-here")): "no config.json",
               ("sample-photos", str(tmp_path / "file")): "writes into a local folder",
               ("sample-photos", "s3://bucket/photos"): "writes into a local folder",
               ("sample-photos", str(tmp_path / "p"), "--holdout", "4"): "at most 3 of the photos are held out"}
    for argv, words in refused.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"imgxlate {argv[0]}: error: ") and words in err[0], (argv, err)
    assert not (tmp_path / "p").exists() and not os.path.exists("s3:")
    # report: a metrics line cut short is left out with a warning; an --out that is a file is one line.
    run = tmp_path / "run" / "imgxlate"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "step": 10, "stage": 0, "train_loss": 0.5, "val_psnr": 30.0}\n'
                                       '{"epoch": 2, "st\n')
    assert main(["report", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "line 2 is not JSON; left out" in err and "| 1 |" in out
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "file")]) == 2
    assert "not a folder the report can be written into" in capsys.readouterr().err
