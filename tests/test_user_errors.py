"""What a user is told when a run cannot go ahead: an invalid --run-id or a missing SRC exits 2 with a message
naming it (an SRC with no images exits 0); credentials in a URI are refused and never printed, nor in a storage
error or a traceback; access denied on DST exits 2 naming the bucket, before anything is written."""

import json
import os
import subprocess
import sys

import boto3
import requests

from imgxlate.infer import job
from imgxlate.io import manifest

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
