"""Model artifacts: round trips through a local folder and a real S3-protocol server."""

import io
import json
import os
import pickle

import pytest
import torch

from imgxlate.artifact import ArtifactError, UnsafeWeightsError, load, read_meta, save, state_dict_from_bytes
from imgxlate.io import storage
from imgxlate.models import build


def _same_outputs(a, b, shape=(1, 3, 24, 20)):
    x = torch.rand(*shape)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("arch,overrides", [("sr", {"nf": 8, "n_blocks": 2, "scale": 4}),
                                            ("style", {"norm": "instance"}), ("unet", {"n_classes": 2}),
                                            ("bicubic", {"scale": 3})])
def test_local_round_trip_gives_identical_outputs(tmp_path, arch, overrides):
    model = build(arch, **overrides)
    meta = save(model, str(tmp_path / "m"), provenance={"note": "test"})
    loaded = load(str(tmp_path / "m"))
    assert _same_outputs(model, loaded)
    assert loaded.meta["model_id"] == meta["model_id"] and loaded.meta["provenance"] == {"note": "test"}
    assert meta["arch"] == arch and meta["task"] == model.task and meta["scale"] == model.scale


def test_s3_round_trip(bucket):
    model = build("sr", nf=8, n_blocks=1, scale=2)
    uri = f"s3://{bucket}/models/sr-x2"
    save(model, uri)
    assert read_meta(uri)["arch"] == "sr"
    assert _same_outputs(model, load(uri))
    import boto3

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"models/sr-x2/config.json", "models/sr-x2/weights.pt"}


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_object_is_refused(tmp_path):
    model = build("sr", nf=8, n_blocks=1)
    save(model, str(tmp_path / "m"))
    buf = io.BytesIO()
    torch.save({"head.weight": Payload()}, buf)
    with pytest.raises(UnsafeWeightsError, match="refused"):
        state_dict_from_bytes(buf.getvalue())
    # Replace the weights of a saved artifact (fixing the checksum too): still refused.
    data = pickle.dumps({"x": Payload()}, protocol=2)
    (tmp_path / "m" / "weights.pt").write_bytes(data)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    import hashlib

    meta["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UnsafeWeightsError):
        load(str(tmp_path / "m"))


def test_corrupt_or_unfinished_artifacts_are_refused(tmp_path):
    save(build("sr", nf=8, n_blocks=1), str(tmp_path / "m"))
    (tmp_path / "m" / "weights.pt").write_bytes(b"not the weights")
    with pytest.raises(ArtifactError, match="checksum"):
        load(str(tmp_path / "m"))
    storage.write_bytes(str(tmp_path / "half" / "weights.pt"), b"x")
    with pytest.raises(ArtifactError, match="save did not finish"):
        load(str(tmp_path / "half"))
