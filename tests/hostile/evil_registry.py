"""A hostile registry for tests: a small threaded HTTP(S) server on a loopback address.

It serves a real image (read from an OCI layout) over the distribution API, accepts
pushes, and plays attacks chosen per test: redirect blobs or uploads to another
host, challenge for a token at a realm of its choosing, answer nothing, stream an
endless manifest, send JSON of the wrong type. Every request is recorded with its
headers, so a test can assert what each host saw (above all: which Authorization
headers reached it).

The "other host" of the tests is a second server of this kind on 127.0.0.2.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

OTHER_HOST = "127.0.0.2"
ENDLESS_CHUNK = 64 << 10
SILENCE_LIMIT = 120.0  # a silent handler gives up after this long, whatever the test does
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Seen:
    """One request as the server saw it (header names lower-case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Reply = Callable[["Handler", "re.Match[str]"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        evil = self.server.evil
        evil.record(
            Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        self.body = body
        for method, pattern, reply in evil.routes():
            m = pattern.fullmatch(self.path)
            if m and method in (self.command, "*"):
                reply(self, m)
                return
        no_route = re.fullmatch(".*", self.path)
        assert no_route is not None
        send(404, b'{"errors":[{"code":"NOT_FOUND","message":"no route"}]}')(self, no_route)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _dispatch


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    evil: EvilServer


@dataclass
class EvilServer:
    """A server on `bind`; add behaviour with `on` (the latest matching rule wins)."""

    bind: str = "127.0.0.1"
    scheme: str = "http"
    seen: list[Seen] = field(default_factory=list)
    sent: int = 0  # body bytes of endless answers written before the client hung up
    stop: threading.Event = field(default_factory=threading.Event)
    address: str = ""
    _routes: list[tuple[str, re.Pattern[str], Reply]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    def on(self, method: str, pattern: str, reply: Reply) -> None:
        with self._lock:
            self._routes.insert(0, (method, re.compile(pattern), reply))

    def routes(self) -> list[tuple[str, re.Pattern[str], Reply]]:
        with self._lock:
            return list(self._routes)

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def authorizations(self) -> list[str]:
        """Every Authorization header this server received."""
        return [s.headers["authorization"] for s in self.requests() if "authorization" in s.headers]

    def count_sent(self, n: int) -> None:
        with self._lock:
            self.sent += n


@contextmanager
def evil_server(
    bind: str = "127.0.0.1", tls: tuple[Path, Path] | None = None
) -> Iterator[EvilServer]:
    """Run an EvilServer on a free port of `bind` (with TLS if given (cert, key))."""
    evil = EvilServer(bind, "https" if tls else "http")
    server = _Server((bind, 0), Handler)
    server.evil = evil
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    evil.address = f"{bind}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield evil
    finally:
        evil.stop.set()
        server.shutdown()
        server.server_close()


# -- replies ------------------------------------------------------------------------


def send(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Reply:
    def reply(h: Handler, m: re.Match[str]) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    return reply


def send_json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return send(
        status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}
    )


def redirect(url: Callable[[re.Match[str]], str], status: int = 307) -> Reply:
    """Send the client elsewhere: `url` builds the target from the path's match."""

    def reply(h: Handler, m: re.Match[str]) -> None:
        send(status, b"", {"Location": url(m)})(h, m)

    return reply


def silent() -> Reply:
    """Accept the request and never answer (until the server stops)."""

    def reply(h: Handler, m: re.Match[str]) -> None:
        h.server.evil.stop.wait(SILENCE_LIMIT)
        h.close_connection = True

    return reply


def endless(content_type: str, length: int | None = None) -> Reply:
    """A JSON-looking body that never ends (chunked), or that claims `length` bytes."""

    def reply(h: Handler, m: re.Match[str]) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        if length is None:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(length))
        h.end_headers()
        h.close_connection = True
        chunk = b'{"schemaVersion":2,"pad":"' + b"x" * ENDLESS_CHUNK
        try:
            while not h.server.evil.stop.is_set():
                if length is None:
                    h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    h.wfile.write(chunk)
                h.server.evil.count_sent(len(chunk))
                chunk = b"x" * ENDLESS_CHUNK
        except OSError:
            pass  # the client hung up: what we want

    return reply


def challenge(header: str, accept: Callable[[str], bool], then: Reply) -> Reply:
    """401 with WWW-Authenticate `header` unless accept(Authorization) holds; then `then`."""

    def reply(h: Handler, m: re.Match[str]) -> None:
        if accept(h.headers.get("Authorization", "")):
            then(h, m)
        else:
            send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": header})(h, m)

    return reply


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- a registry ------------------------------------------------------------------------


@dataclass
class Store:
    """What a served repository holds: blobs and manifests by digest, tags."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # digest -> (type, bytes)
    tags: dict[str, str] = field(default_factory=dict)

    def manifest(self, reference: str) -> tuple[str, bytes] | None:
        return self.manifests.get(self.tags.get(reference, reference))

    def put_manifest(self, reference: str, media_type: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.manifests[digest] = (media_type, data)
        if not reference.startswith("sha256:"):
            self.tags[reference] = digest
        return digest


def load_layout(layout: Path, tag: str) -> Store:
    """The image tagged `tag` in an OCI layout, as a Store."""
    store = Store()
    for blob in (layout / "blobs" / "sha256").iterdir():
        store.blobs["sha256:" + blob.name] = blob.read_bytes()
    index = json.loads((layout / "index.json").read_bytes())
    for d in index["manifests"]:
        data = store.blobs[d["digest"]]
        store.manifests[d["digest"]] = (d["mediaType"], data)
        if (d.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
            store.tags[tag] = d["digest"]
    return store


Guard = Callable[[Reply], Reply]


def serve_registry(evil: EvilServer, repo: str, store: Store, guard: Guard = lambda r: r) -> None:
    """Answer the distribution API for `repo` from `store`; `guard` wraps every reply
    (e.g. with `challenge`). Uploads land in the store; their Location is on this server."""
    r = re.escape(repo)

    def get_manifest(h: Handler, m: re.Match[str]) -> None:
        found = store.manifest(m.group(1))
        if found is None:
            send(404)(h, m)
            return
        media_type, data = found
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        send(200, data, {"Content-Type": media_type, "Docker-Content-Digest": digest})(h, m)

    def get_blob(h: Handler, m: re.Match[str]) -> None:
        data = store.blobs.get(m.group(1))
        if data is None:
            send(404)(h, m)
        else:
            send(200, data)(h, m)

    def start_upload(h: Handler, m: re.Match[str]) -> None:
        send(202, b"", {"Location": f"/upload/{repo}/session"})(h, m)

    def put_manifest(h: Handler, m: re.Match[str]) -> None:
        digest = store.put_manifest(m.group(1), h.headers.get("Content-Type", OCI_MANIFEST), h.body)
        send(201, b"", {"Docker-Content-Digest": digest})(h, m)

    evil.on("GET", r"/v2/", guard(send_json({})))
    evil.on("*", rf"/v2/{r}/manifests/([^/?]+)", guard(get_manifest))
    evil.on("*", rf"/v2/{r}/blobs/(sha256:[0-9a-f]{{64}})", guard(get_blob))
    evil.on("POST", rf"/v2/{r}/blobs/uploads/", guard(start_upload))
    evil.on("PUT", rf"/v2/{r}/manifests/([^/?]+)", guard(put_manifest))
    accept_uploads(evil, store, rf"/upload/{r}/session", guard)


def accept_uploads(evil: EvilServer, store: Store, path: str, guard: Guard = lambda r: r) -> None:
    """Take the closing PUT of an upload at `path` (a regex), storing the blob."""

    def put_blob(h: Handler, m: re.Match[str]) -> None:
        digest = re.search(r"digest=(sha256(?::|%3A)[0-9a-f]{64})", h.path)
        if digest is None:
            send(400)(h, m)
            return
        store.blobs[digest.group(1).replace("%3A", ":")] = h.body
        send(201)(h, m)

    evil.on("PUT", path + r"\?.*", guard(put_blob))


# -- TLS and addresses -------------------------------------------------------------------


def self_signed(directory: Path, ip: str) -> tuple[Path, Path]:
    """A certificate for `ip` (its own CA) and its key, made with openssl."""
    cert, key = directory / "evil-cert.pem", directory / "evil-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={ip}", "-addext", f"subjectAltName=IP:{ip}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def outside_address() -> str | None:
    """An address of this machine that is not loopback (so vmimg insists on TLS), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))  # nothing is sent: this only picks a route
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") else address
