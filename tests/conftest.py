"""Shared fixtures: a real S3-protocol server on 127.0.0.1 (moto in server mode), fixture images,
and one local Ray instance per test session."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

# Credentials for the loopback test server only; set before any client is created.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1, also exported as AWS_ENDPOINT_URL so that
    boto3, s3fs and pyarrow in this process and in Ray workers reach it the way users' code does."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old
    server.stop()


@pytest.fixture
def bucket(s3_server):
    """A fresh, empty bucket on the test server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def photo(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A smooth, photo-like uint8 test image: gradients, soft blobs and some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, channels))
    for c in range(channels):
        img[..., c] = 0.5 + 0.25 * np.sin(xx / (7 + 5 * c + seed) + c) * np.cos(yy / (11 + 3 * c))
        for _ in range(4):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, max(4, min(h, w) / 3))
            img[..., c] += rng.uniform(-0.3, 0.3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img += rng.normal(0, 0.02, img.shape)
    out = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return out[..., 0] if channels == 1 else out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the test session, started the way the job starts it."""
    import ray

    from imgxlate import rayenv

    rayenv.start_or_join("local")
    yield ray
    ray.shutdown()
