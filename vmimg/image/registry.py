"""A registry client: the oras package's session and token flow, made robust.

oras-py gives us the HTTP session and the bearer-token exchange. It falls
short in ways that matter to an unattended tool, so this module adds:
credentials from $DOCKER_CONFIG (auths, credHelpers, credsStore), the Basic
challenge that Debian's docker-registry with htpasswd sends, bounded retries
with backoff on connection errors, 429 and 5xx (Retry-After honoured),
resuming a dropped blob download with a Range request, and plain http only
for loopback hosts or hosts the user named as insecure.

Pushing is ours too (oras-py's upload reads a whole blob into memory): blobs
stream from disk, in one PUT or in PATCH chunks, and an upload that fails
(dropped connection, 429, 5xx, expired token) is started again from scratch
in a new upload session, since a request body cannot be replayed.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import oras.auth.utils
import oras.provider
import requests
import urllib3.exceptions

from vmimg.errors import AuthError, SourceError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_RETRIES = 5  # override with VMIMG_REGISTRY_RETRIES
BACKOFF_START = 0.5
BACKOFF_CAP = 8.0
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # seconds without a byte; override with VMIMG_REGISTRY_TIMEOUT
HTTP_BAD_REQUEST = 400
GO_TLS_ANSWER = b"Client sent an HTTP request to an HTTPS server"
DOCKER_HUB_HOSTS = ("docker.io", "registry-1.docker.io", "index.docker.io")
# Blobs up to this size go up in one PUT, bigger ones in PATCH chunks of this size
# (some proxies cap request bodies); override with VMIMG_UPLOAD_CHUNK (bytes).
DEFAULT_UPLOAD_CHUNK = 64 << 20
OCTET_STREAM = "application/octet-stream"


def is_loopback_host(host: str) -> bool:
    if host.startswith("[") and "]" in host:
        name = host[1 : host.index("]")]  # [::1]:5000
    else:
        name = host.split(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def api_host(registry: str) -> str:
    """Where the registry API of a reference's host name lives."""
    return "registry-1.docker.io" if registry in DOCKER_HUB_HOSTS else registry


def upload_chunk_size() -> int:
    value = os.environ.get("VMIMG_UPLOAD_CHUNK")
    if not value:
        return DEFAULT_UPLOAD_CHUNK
    if not value.isdigit() or int(value) <= 0:
        raise SourceError(f"VMIMG_UPLOAD_CHUNK must be a positive number of bytes, not {value!r}")
    return int(value)


def read_timeout() -> float:
    """Seconds a request may wait for the registry's next byte before it counts as dropped."""
    value = os.environ.get("VMIMG_REGISTRY_TIMEOUT")
    if not value:
        return READ_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise SourceError(f"VMIMG_REGISTRY_TIMEOUT must be a positive number, not {value!r}")
    return seconds


# -- credentials -----------------------------------------------------------------


def docker_config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str = field(repr=False)

    def basic(self) -> str:
        return base64.b64encode(f"{self.username}:{self.secret}".encode()).decode()


def _from_helper(helper: str, host: str) -> Credentials | None:
    try:
        proc = subprocess.run(
            [f"docker-credential-{helper}", "get"],
            input=host.encode(),
            capture_output=True,
            check=True,
            timeout=30,
        )
        payload = json.loads(proc.stdout)
        return Credentials(payload["Username"], payload["Secret"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        raise AuthError(f"credential helper docker-credential-{helper} failed for {host}") from None


def load_credentials(host: str) -> Credentials | None:
    """Credentials for `host` from the Docker config file, or None."""
    try:
        with open(docker_config_path()) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AuthError(f"cannot read {docker_config_path()}: {e}") from None
    names = [host, f"https://{host}", f"http://{host}"]
    if host in DOCKER_HUB_HOSTS:
        names.append("https://index.docker.io/v1/")
    helper = (cfg.get("credHelpers") or {}).get(host)
    if helper:
        return _from_helper(helper, host)
    auths = cfg.get("auths") or {}
    for name in names:
        entry = auths.get(name)
        if entry and entry.get("auth"):
            try:
                user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise AuthError(
                    f"invalid auth entry for {host} in {docker_config_path()}"
                ) from None
            return Credentials(user, secret)
        if entry and entry.get("username"):
            return Credentials(entry["username"], entry.get("password", ""))
    if cfg.get("credsStore"):
        return _from_helper(cfg["credsStore"], host)
    return None


# -- the client --------------------------------------------------------------------


class RegistryClient:
    """Talks to one registry host. Thread-safe enough for one request at a time per thread."""

    def __init__(
        self,
        host: str,
        insecure_hosts: Iterable[str] = (),
        ca_cert: str | None = None,
        retries: int | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.host = api_host(host)
        self.insecure = is_loopback_host(self.host) or self.host in set(insecure_hosts)
        self.base = f"{'http' if self.insecure else 'https'}://{self.host}"
        self.retries = (
            retries
            if retries is not None
            else int(os.environ.get("VMIMG_REGISTRY_RETRIES", DEFAULT_RETRIES))
        )
        self.timeout = read_timeout()
        self._oras = oras.provider.Registry(
            hostname=self.host, insecure=self.insecure, tls_verify=ca_cert or True
        )
        self.session: requests.Session = self._oras.session
        self.verify: bool | str = ca_cert or True
        self._credentials = credentials
        self._credentials_loaded = credentials is not None
        self._auth_header: dict[str, str] = {}

    # -- auth ---------------------------------------------------------------

    @property
    def credentials(self) -> Credentials | None:
        if not self._credentials_loaded:
            self._credentials = load_credentials(self.host)
            self._credentials_loaded = True
        return self._credentials

    def _answer_challenge(self, response: requests.Response) -> bool:
        """Set an Authorization header answering a 401; False if we cannot."""
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        creds = self.credentials
        if scheme == "basic":
            if creds is None:
                raise AuthError(
                    f"{self.host} requires credentials; none found in the Docker config"
                )
            self._auth_header = {"Authorization": f"Basic {creds.basic()}"}
            return True
        if scheme == "bearer":
            token_auth = self._oras.auth
            header = oras.auth.utils.parse_auth_header(challenge)
            if creds is not None:
                token_auth._basic_auth = creds.basic()
                token = token_auth.request_token(header)
            else:
                token = token_auth.request_anonymous_token(header)
            if not token:
                raise AuthError(
                    f"{self.host} refused to issue a token for {header.scope or 'access'}"
                )
            self._auth_header = {"Authorization": f"Bearer {token}"}
            return True
        return False

    # -- requests -----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        data: Any = None,
        ok: Iterable[int] = (200,),
        what: str = "",
        replayable: bool = True,
    ) -> requests.Response:
        """One API call with auth and retries; raises unless the status is in `ok`.

        A request whose body is a stream is not `replayable`: where it would be
        sent again (connection error, 401, 429, 5xx) it raises UploadInterrupted
        instead, after answering a 401's challenge, and the caller starts over.
        """
        url = path if path.startswith("http") else self.base + path
        what = what or f"{method} {url}"
        ok_set = set(ok)
        delay = BACKOFF_START
        reauthed = False
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self.session.request(
                    method,
                    url,
                    headers={**(headers or {}), **self._auth_header},
                    stream=stream,
                    data=data,
                    verify=self.verify,
                    timeout=(CONNECT_TIMEOUT, self.timeout),
                    allow_redirects=True,
                )
            except requests.exceptions.SSLError as e:
                raise SourceError(f"{what}: TLS error talking to {self.host}: {e}") from None
            except requests.exceptions.RequestException as e:
                if not replayable:
                    raise UploadInterrupted(
                        f"{what}: connection lost: {type(e).__name__}"
                    ) from None
                if attempt > self.retries:
                    raise SourceError(
                        f"{what}: {self.host} unreachable: {type(e).__name__}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_CAP)
                continue
            if self._switched_to_https(resp):
                url = "https://" + url.split("://", 1)[1]
                continue
            if resp.status_code == 401 and not reauthed:
                reauthed = True
                resp.close()
                if self._answer_challenge(resp):
                    if not replayable:
                        raise UploadInterrupted(f"{what}: 401 (authorisation renewed)")
                    continue
            if resp.status_code in ok_set:
                return resp
            if resp.status_code in RETRY_STATUSES and not replayable:
                resp.close()
                raise UploadInterrupted(f"{what}: {resp.status_code} {resp.reason}")
            if resp.status_code in RETRY_STATUSES and attempt <= self.retries:
                resp.close()
                time.sleep(_retry_after(resp, delay))
                delay = min(delay * 2, BACKOFF_CAP)
                continue
            raise self._error(resp, what)

    def _switched_to_https(self, resp: requests.Response) -> bool:
        """A loopback or insecure host may still speak TLS: Go servers answer plain
        http on a TLS port with this 400, and then we move to https for good."""
        if resp.status_code != HTTP_BAD_REQUEST or not self.base.startswith("http://"):
            return False
        body = resp.content
        if resp.request.method == "HEAD":  # no body to read the answer from: ask with a GET
            try:
                body = self.session.get(
                    self.base + "/v2/", timeout=(CONNECT_TIMEOUT, self.timeout)
                ).content
            except requests.exceptions.RequestException:
                return False
        if GO_TLS_ANSWER not in body:
            return False
        self.base = "https://" + self.base[len("http://") :]
        return True

    def _error(self, resp: requests.Response, what: str) -> SourceError:
        detail = ""
        try:
            errors = resp.json().get("errors") or []
            detail = "; ".join(str(e.get("message") or e.get("code")) for e in errors)
        except (ValueError, AttributeError):
            pass
        text = f"{what}: {resp.status_code} {resp.reason}" + (f" ({detail})" if detail else "")
        if resp.status_code == 401 and "Authorization" in self._auth_header:
            text += f"; the registry rejected the credentials for {self.host}"
        if resp.status_code in (401, 403):
            return AuthError(text)
        return SourceError(text)

    # -- API helpers ----------------------------------------------------------

    def get_manifest(self, repo: str, reference: str, accept: str) -> tuple[bytes, str]:
        """Manifest bytes and the Content-Type the registry declared."""
        resp = self.request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            headers={"Accept": accept},
            what=f"manifest {self.host}/{repo}:{reference}",
            ok=(200,),
        )
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return resp.content, ctype

    def open_blob(self, repo: str, digest: str) -> BlobStream:
        return BlobStream(self, f"/v2/{repo}/blobs/{digest}", f"blob {digest}")

    def head_manifest(self, repo: str, reference: str, accept: str) -> ManifestHead | None:
        """What the registry has under a tag or digest (media type, digest, size), or None."""
        resp = self.request(
            "HEAD",
            f"/v2/{repo}/manifests/{reference}",
            headers={"Accept": accept},
            ok=(200, 404),
            what=f"manifest {self.host}/{repo}:{reference}",
        )
        if resp.status_code == 404:
            return None
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
        digest = resp.headers.get("Docker-Content-Digest", "")
        size = resp.headers.get("Content-Length", "")
        if not digest or not size.isdigit():
            # Some registries do not answer HEAD fully: fall back to the document.
            data, ctype = self.get_manifest(repo, reference, accept)
            return ManifestHead(ctype, digest_of(data), len(data))
        return ManifestHead(ctype, digest, int(size))

    def list_tags(self, repo: str) -> list[str]:
        """Every tag of `repo`, following the Link header's pages."""
        tags: list[str] = []
        path: str | None = f"/v2/{repo}/tags/list"
        while path:
            resp = self.request("GET", path, what=f"tags of {self.host}/{repo}", ok=(200, 404))
            if resp.status_code == 404:
                return []
            try:
                tags.extend(resp.json().get("tags") or [])
            except (ValueError, AttributeError):
                raise SourceError(f"tags of {self.host}/{repo}: not a JSON tag list") from None
            path = _next_link(resp.headers.get("Link", ""))
        return tags

    # -- pushing --------------------------------------------------------------

    def blob_exists(self, repo: str, digest: str) -> bool:
        resp = self.request(
            "HEAD",
            f"/v2/{repo}/blobs/{digest}",
            ok=(200, 404),
            what=f"blob {digest} in {self.host}/{repo}",
        )
        return resp.status_code == 200

    def upload_blob(self, repo: str, path: str, digest: str, size: int) -> bool:
        """Upload the file at `path` (whose digest and size the caller computed) unless the
        registry has it already. True if it was uploaded. Failed attempts start over."""
        if self.blob_exists(repo, digest):
            return False
        what = f"blob {digest} to {self.host}/{repo}"
        chunk = upload_chunk_size()
        delay = BACKOFF_START
        attempt = 0
        while True:
            attempt += 1
            try:
                location = self._start_upload(repo, what)
                if size <= chunk:
                    self._put_blob(location, path, 0, size, digest, what)
                else:
                    self._patch_blob(location, path, size, chunk, digest, what)
                return True
            except UploadInterrupted as e:
                if attempt > self.retries:
                    raise SourceError(f"{e} (gave up after {attempt} attempts)") from None
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_CAP)

    def _start_upload(self, repo: str, what: str) -> str:
        resp = self.request(
            "POST", f"/v2/{repo}/blobs/uploads/", ok=(202,), what=f"{what}: starting upload"
        )
        return self._location(resp, what)

    def _location(self, resp: requests.Response, what: str) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise SourceError(f"{what}: the registry sent no upload Location")
        if location.startswith("/"):
            location = self.base + location
        return location

    def _put_blob(
        self, location: str, path: str, offset: int, length: int, digest: str, what: str
    ) -> None:
        """The closing PUT, carrying the bytes [offset, offset+length) of `path`."""
        sep = "&" if "?" in location else "?"
        with FileSection(path, offset, length) as body:
            self.request(
                "PUT",
                f"{location}{sep}digest={digest}",
                headers={"Content-Type": OCTET_STREAM, "Content-Length": str(length)},
                data=body if length else b"",
                ok=(201,),
                what=what,
                replayable=False,
            )

    def _patch_blob(
        self, location: str, path: str, size: int, chunk: int, digest: str, what: str
    ) -> None:
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            with FileSection(path, offset, n) as body:
                resp = self.request(
                    "PATCH",
                    location,
                    headers={
                        "Content-Type": OCTET_STREAM,
                        "Content-Length": str(n),
                        "Content-Range": f"{offset}-{offset + n - 1}",
                    },
                    data=body,
                    ok=(202,),
                    what=what,
                    replayable=False,
                )
            location = self._location(resp, what)
            offset += n
        self._put_blob(location, path, size, 0, digest, what)

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> ManifestPut:
        """PUT a manifest or index under a tag or digest."""
        resp = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            headers={"Content-Type": media_type},
            data=data,
            ok=(201,),
            what=f"manifest {self.host}/{repo}:{reference}",
        )
        digest = digest_of(data)
        sent = resp.headers.get("Docker-Content-Digest")
        if sent and sent != digest:
            raise SourceError(
                f"manifest {self.host}/{repo}:{reference}: stored as {sent}, not {digest}"
            )
        return ManifestPut(digest, resp.headers.get("OCI-Subject"))


class UploadInterrupted(SourceError):
    """A request with a streamed body failed in a way that calls for starting over."""


@dataclass(frozen=True)
class ManifestHead:
    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class ManifestPut:
    digest: str
    subject: str | None  # the OCI-Subject header: set when the registry indexed the referrer


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _next_link(header: str) -> str | None:
    """The path of a `Link: </v2/...>; rel="next"` header, or None."""
    for part in header.split(","):
        if 'rel="next"' in part and "<" in part and ">" in part:
            return part[part.index("<") + 1 : part.index(">")]
    return None


class FileSection:
    """Bytes [offset, offset+length) of a file as a request body: read from disk as
    the connection sends it, never held whole. `len` gives requests the Content-Length."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 (closed by __exit__)
        self._f.seek(offset)
        self.len = length
        self._left = length

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FileSection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _retry_after(resp: requests.Response, default: float) -> float:
    value = resp.headers.get("Retry-After")
    if value and value.isdigit():
        return min(float(value), BACKOFF_CAP * 4)
    return default


class BlobStream:
    """A file-like blob download that resumes with Range after a dropped connection."""

    def __init__(self, client: RegistryClient, path: str, what: str) -> None:
        self.client = client
        self.path = path
        self.what = what
        self.pos = 0
        self.resumes = 0
        self._resp = client.request("GET", path, stream=True, what=what)

    def read(self, n: int = -1) -> bytes:
        while True:
            try:
                data: bytes = self._resp.raw.read(n if n > 0 else None, decode_content=False)
                self.pos += len(data)
                return data
            except Exception as e:
                if not _is_connection_error(e) or self.resumes >= self.client.retries:
                    raise SourceError(f"{self.what}: download failed: {type(e).__name__}") from None
                self.resumes += 1
                self._reopen()

    def _reopen(self) -> None:
        self._resp.close()
        resp = self.client.request(
            "GET",
            self.path,
            headers={"Range": f"bytes={self.pos}-"},
            stream=True,
            ok=(200, 206),
            what=self.what,
        )
        if resp.status_code == 200:
            # No range support: skip what we already have.
            skip = self.pos
            while skip:
                chunk = resp.raw.read(min(skip, 1 << 20), decode_content=False)
                if not chunk:
                    raise SourceError(f"{self.what}: blob shorter on retry")
                skip -= len(chunk)
        self._resp = resp

    def close(self) -> None:
        self._resp.close()

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_connection_error(e: BaseException) -> bool:
    return isinstance(
        e,
        requests.exceptions.RequestException
        | urllib3.exceptions.HTTPError
        | ConnectionError
        | TimeoutError,
    )
