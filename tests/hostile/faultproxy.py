"""A fault-injecting HTTP proxy for tests: loopback only, pure Python, one thread per request.

It sits in front of a real registry and forwards every request, except that
rules can make a matching request fail: drop the connection halfway through
the body, answer a status (500, 429 with Retry-After), or stall mid-body. It
also records every request, so tests can count blob GETs and see Range headers.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}
UPSTREAM_TIMEOUT = 30.0


@dataclass
class Rule:
    """Apply `fault` to the next `times` requests whose "METHOD path" matches `match`.

    fault: "drop" (half the body, then close), "stall" (half the body, then
    `stall` seconds of silence, then close), or an HTTP status to answer with
    (`retry_after` sets that header).
    """

    match: str
    fault: str | int
    times: int = 1
    retry_after: int | None = None
    stall: float = 30.0


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    fault: str | int | None


@dataclass
class FaultProxy:
    upstream: str  # HOST:PORT of the real registry
    rules: list[Rule] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    address: str = ""

    def take_fault(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.times > 0 and re.search(rule.match, f"{method} {path}"):
                    rule.times -= 1
                    return rule
        return None

    def record(self, seen: Seen) -> None:
        with self.lock:
            self.seen.append(seen)

    def gets(self, pattern: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == "GET" and re.search(pattern, s.path)]


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet

        def _forward(self) -> None:
            rule = proxy.take_fault(self.command, self.path)
            proxy.record(
                Seen(
                    self.command,
                    self.path,
                    self.headers.get("Range"),
                    rule.fault if rule is not None else None,
                )
            )
            if rule is not None and isinstance(rule.fault, int):
                self._answer_status(rule)
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            host, port = proxy.upstream.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=UPSTREAM_TIMEOUT)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            if rule is None or len(data) < 2:
                self.wfile.write(data)
                return
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if rule.fault == "stall":
                time.sleep(rule.stall)
            # Close with the body short of its Content-Length, as a dying connection would.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

        def _answer_status(self, rule: Rule) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}'
            self.send_response(int(rule.fault))
            if rule.retry_after is not None:
                self.send_header("Retry-After", str(rule.retry_after))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

    return Handler


@contextmanager
def fault_proxy(upstream: str, rules: list[Rule] | None = None) -> Iterator[FaultProxy]:
    """Run a proxy on a free loopback port in front of `upstream`; yields it (see .address)."""
    proxy = FaultProxy(upstream, list(rules or []))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    server.block_on_close = False  # a stalled handler must not hold up the test's end
    proxy.address = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
