"""An HTTP proxy on 127.0.0.1 in front of the moto S3 server that injects faults: a bounded number
of 503 SlowDown answers and connection resets, and 403 AccessDenied for writes to chosen buckets.
It only ever talks to the loopback server it was given and stops with the test."""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
          b"<Message>Access Denied</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, every: int = 0, max_faults: int = 0, resets: bool = False,
                 deny_write_buckets: tuple[str, ...] = (), answer=None, strip_headers: tuple[str, ...] = ()):
        """``answer(method, path, headers)`` may return (status, body) to answer a request itself (a store that
        is full, or that answers 501); ``strip_headers`` are removed from requests before they go upstream (a store
        that ignores conditional writes)."""
        u = urllib.parse.urlsplit(upstream)
        assert u.hostname in ("127.0.0.1", "localhost"), "the fault proxy only fronts a loopback server"
        self.upstream = (u.hostname, u.port)
        self.every, self.max_faults, self.resets = every, max_faults, resets
        self.deny_write_buckets = deny_write_buckets
        self.answer, self.strip_headers = answer, {h.lower() for h in strip_headers}
        self.answered = 0
        self.requests = self.faults_503 = self.faults_reset = self.denied = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                bucket = urllib.parse.urlsplit(self.path).path.lstrip("/").split("/", 1)[0]
                if self.command in ("PUT", "POST", "DELETE") and bucket in proxy.deny_write_buckets:
                    with proxy.lock:
                        proxy.denied += 1
                    return self._reply(403, DENIED)
                if proxy.answer is not None and (res := proxy.answer(self.command, self.path, self.headers)):
                    with proxy.lock:
                        proxy.answered += 1
                    return self._reply(*res)
                fault = None
                with proxy.lock:
                    proxy.requests += 1
                    faults = proxy.faults_503 + proxy.faults_reset
                    if proxy.every and proxy.requests % proxy.every == 0 and faults < proxy.max_faults:
                        fault = "reset" if proxy.resets and faults % 2 else "503"
                        if fault == "503":
                            proxy.faults_503 += 1
                        else:
                            proxy.faults_reset += 1
                if fault == "503":
                    return self._reply(503, SLOWDOWN)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"
                           and k.lower() not in proxy.strip_headers}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _reply(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
