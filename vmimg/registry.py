"""A registry client: the oras package's session and token flow, made robust.

oras-py gives us the HTTP session and the bearer-token exchange. It falls
short in ways that matter to an unattended tool, so this module adds:
credentials from $DOCKER_CONFIG (auths, credHelpers, credsStore), the Basic
challenge that Debian's docker-registry with htpasswd sends, bounded retries
with backoff on connection errors, 429 and 5xx (Retry-After honoured),
resuming a dropped blob download with a Range request, and plain http only
for loopback hosts or hosts the user named as insecure.
"""

from __future__ import annotations

import base64
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
    ) -> requests.Response:
        """One API call with auth and retries; raises unless the status is in `ok`."""
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
                    continue
            if resp.status_code in ok_set:
                return resp
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
        if GO_TLS_ANSWER not in resp.content:
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
