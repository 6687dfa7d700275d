r"""Object-store requests per 10,000 inputs, files against shards: the batch job runs S3 to S3 on a loopback S3
server (moto) behind a counting proxy, once per layout, and each request is counted by S3's price classes.

    python jobs/bench_requests.py                       # 10,000 tiny PNGs, bicubic x2, four layouts
    python jobs/bench_requests.py --inputs 2000 --per-shard 1000 --out out/bench/requests.json

Layouts (SRC -> DST):
  files -> files             one object per input in, one per output (the default job)
  files -> webdataset        loose images in, one tar per shard out (--output-format webdataset)
  webdataset -> webdataset   tars of --per-shard images in (as img2dataset writes them), one tar per tar out
  parquet -> parquet         Parquet files of --per-shard rows in (--image-column), one Parquet file per file out

Every request the job makes is counted, its own included (manifest parts, shard markers, the lease, the
pieces a shard's object is made from). Prices are S3 Standard's request prices in us-east-1 (PUT, COPY, POST
and LIST $0.005 per 1,000; GET, HEAD and others $0.0004 per 1,000; DELETE free); transfer and storage are left
out. The cost per billion inputs scales the measured counts linearly, which holds for the per-input and
per-shard requests that dominate them.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import sys
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PRICE_PER_1000 = {"PUT": 0.005, "POST": 0.005, "LIST": 0.005, "GET": 0.0004, "HEAD": 0.0004, "DELETE": 0.0}


class CountingProxy:
    """HTTP proxy on 127.0.0.1 in front of a loopback S3 server; counts requests by price class."""

    def __init__(self, upstream: str):
        u = urllib.parse.urlsplit(upstream)
        assert u.hostname in ("127.0.0.1", "localhost"), "the counting proxy only fronts a loopback server"
        self.upstream, self.counts, self.lock = (u.hostname, u.port), Counter(), threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _relay(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                with proxy.lock:
                    proxy.counts[proxy.kind(self.command, self.path)] += 1
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"{proxy.upstream[0]}:{proxy.upstream[1]}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def kind(method: str, path: str) -> str:
        parts = urllib.parse.urlsplit(path)
        key = parts.path.lstrip("/").partition("/")[2]
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        if method == "GET":
            return "LIST" if not key or "list-type" in query or "prefix" in query else "GET"
        if method == "POST" and "delete" in query:
            return "DELETE"
        return method

    def reset(self) -> Counter:
        with self.lock:
            c, self.counts = self.counts, Counter()
        return c

    def stop(self):
        self.server.shutdown()


def _pngs(n: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    for i in range(n):
        buf = io.BytesIO()
        img = base.copy()
        img[0, 0] = (i % 256, (i // 256) % 256, i // 65536)
        Image.fromarray(img).save(buf, "PNG")
        yield f"{i:08d}", buf.getvalue()


def upload(s3, bucket: str, layout: str, n: int, per_shard: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    images = list(_pngs(n))
    if layout == "files":
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=f"src/{kv[0]}.png", Body=kv[1]), images))
        return
    for s in range(0, n, per_shard):
        buf = io.BytesIO()
        chunk = images[s:s + per_shard]
        if layout == "webdataset":
            with wds.TarWriter(buf) as w:
                for key, data in chunk:
                    w.write({"__key__": key, "png": data, "json": {"id": key}})
            name = f"src/{s // per_shard:05d}.tar"
        else:
            pq.write_table(pa.Table.from_pylist([{"id": k, "image": d} for k, d in chunk]), buf,
                           row_group_size=100)
            name = f"src/{s // per_shard:05d}.parquet"
        s3.put_object(Bucket=bucket, Key=name, Body=buf.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--per-shard", type=int, default=10_000, help="images per source tar / Parquet file, and "
                    "--shard-size for loose files (default 10,000, the job's shard size)")
    ap.add_argument("--layouts", default="files>files,files>webdataset,webdataset>webdataset,parquet>parquet")
    ap.add_argument("--out", default="out/bench/requests.json")
    args = ap.parse_args(argv)

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)     # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = CountingProxy(f"http://{host}:{port}")
    os.environ["AWS_ENDPOINT_URL"] = proxy.url          # the job, its Ray workers and this script all go through it
    s3 = boto3.client("s3", endpoint_url=proxy.url)

    from imgxlate import api, rayenv

    rayenv.start_or_join("local")
    results = []
    try:
        for layout in args.layouts.split(","):
            src_kind, dst_kind = layout.split(">")
            bucket = f"bench-{uuid.uuid4().hex[:10]}"
            s3.create_bucket(Bucket=bucket)
            upload(s3, bucket, src_kind, args.inputs, args.per_shard)
            proxy.reset()
            options = {"model": "bicubic", "scale": 2, "output_format": dst_kind, "shard_size": args.per_shard}
            if src_kind == "parquet":
                options.update(image_column="image", key_column="id")
            elif src_kind == "webdataset":
                options.update(input_format="webdataset")
            t0 = time.time()
            summary = api.translate(f"s3://{bucket}/src", f"s3://{bucket}/dst", **options)
            wall = time.time() - t0
            counts = dict(proxy.reset())
            per10k = {k: v * 10_000 / args.inputs for k, v in counts.items()}
            cost = sum(PRICE_PER_1000.get(k, 0.0004) * v / 1000 * 1e9 / args.inputs for k, v in counts.items())
            row = {"layout": layout, "inputs": args.inputs, "per_shard": args.per_shard, "counts": counts,
                   "per_10k": per10k, "usd_per_billion": round(cost, 2), "wall_s": round(wall, 1),
                   "ok": summary["counts"].get("ok", 0)}
            results.append(row)
            print(f"{layout:26s} ok {row['ok']:6d}  " + "  ".join(f"{k} {per10k.get(k, 0):8.0f}"
                  for k in ("LIST", "GET", "HEAD", "PUT", "POST", "DELETE")) +
                  f"  per 10k inputs;  ${row['usd_per_billion']:,.0f} per billion  ({wall:.0f} s)", flush=True)
    finally:
        import ray

        ray.shutdown()
        proxy.stop()
        server.stop()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"measured": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)
    files = next((r for r in results if r["layout"] == "files>files"), None)
    for r in results:
        if files and r is not files:
            print(f"{r['layout']}: {files['usd_per_billion'] / max(r['usd_per_billion'], 1e-9):.0f}x cheaper in "
                  f"requests than files>files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
