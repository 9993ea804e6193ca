"""A registry client for the OCI distribution API that trusts no registry.

Every registry, and every host a registry names, is treated as hostile:

- Credentials (a Basic header, or a bearer token got with them) go only to the
  registry's own scheme, host and port. Redirects (blob downloads commonly go to
  storage elsewhere), upload Locations and Link pages to another origin are
  followed without them. A token realm gets them only on the registry's own host
  or its domain (see `token_host_trusted`); a realm elsewhere is asked for an
  anonymous token.
- Plain http only to loopback hosts, hosts named insecure, or everything with
  tls_verify=False (then https is tried first, as skopeo does).
- Every request has a connect and a read timeout, the token request too. DNS
  failures, refused connections and timeouts fail at once; connection resets,
  429 and 5xx are retried with backoff (Retry-After honoured), each retry logged.
- Every non-streamed answer (manifests, indexes, tokens, tag lists, error
  bodies) is read as it streams and refused past 4 MiB or past the read
  timeout, before anyone caches or parses it. JSON answers are type-checked.

Credentials are looked up as podman and skopeo do (see `auth_files`), with
Docker's credential helpers. Pushing streams blobs from disk, in one PUT or
PATCH chunks; an upload that fails is started again in a new upload session,
since a request body cannot be replayed. A dropped blob download resumes with
a Range request.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vmimg.digest import split_digest
from vmimg.errors import AuthError, SourceError, VmimgError, root_cause
from vmimg.image.credentials import DOCKER_HUB_HOSTS, api_host
from vmimg.image.credentials import Credentials as Credentials  # its old home
from vmimg.image.oci import MAX_DOCUMENT_BYTES, OCI_INDEX, Descriptor, load_json

if TYPE_CHECKING:
    import requests

FALLBACK_TAG_MAX = 128  # tag length limit of the distribution spec


def fallback_tag(digest: str) -> str:
    """The referrers tag scheme's tag for a subject: `<alg>-<hex>`."""
    algo, hexd = split_digest(digest)
    return f"{algo}-{hexd}"[:FALLBACK_TAG_MAX]


log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_RETRIES = 5  # override with VMIMG_REGISTRY_RETRIES
BACKOFF_START = 0.5
BACKOFF_CAP = 8.0
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # seconds without a byte; override with VMIMG_REGISTRY_TIMEOUT
MAX_REDIRECTS = 10  # as Go's http.Client
MAX_ERROR_BODY = 64 << 10  # of an error answer, enough for its JSON "errors"
MAX_TAG_PAGES = 1000
READ_CHUNK = 64 << 10
HTTP_BAD_REQUEST = 400
HTTP_UNAUTHORIZED = 401
HTTP_FORBIDDEN = 403
HTTP_NOT_FOUND = 404
GO_TLS_ANSWER = b"Client sent an HTTP request to an HTTPS server"
# What OpenSSL says when the other end answers a TLS hello in plain http.
PLAIN_HTTP_SIGNS = ("WRONG_VERSION_NUMBER", "wrong version number", "record layer failure",
                    "packet length too long", "http request")  # fmt: skip
DEFAULT_PORTS = {"http": 80, "https": 443}
DOCKER_HUB_INDEX = "https://index.docker.io/v1/"
MIN_DOMAIN_LABELS = 2  # a registry's parent domain must not be a bare top-level domain
MIN_SECRET_LEN = 4  # shorter "secrets" are not hidden from messages (they would garble them)
HIDDEN = "[hidden]"
HELPER_TIMEOUT = 30.0
HELPER_NOT_FOUND = b"credentials not found"  # docker-credential-helpers' "no entry" answer
# Blobs up to this size go up in one PUT, bigger ones in PATCH chunks of this size
# (some proxies cap request bodies); override with VMIMG_UPLOAD_CHUNK (bytes).
DEFAULT_UPLOAD_CHUNK = 64 << 20
OCTET_STREAM = "application/octet-stream"


def _requests() -> ModuleType:
    """requests (with urllib3), imported when a registry is first spoken to: about a third
    of vmimg's start-up, which commands that never reach a registry should not pay."""
    import requests

    return requests


def _urllib3_errors() -> ModuleType:
    import urllib3.exceptions

    return urllib3.exceptions


def _dns_failures() -> tuple[type[BaseException], ...]:
    # urllib3 2 says NameResolutionError; older versions leave the gaierror as the cause.
    return (socket.gaierror, getattr(_urllib3_errors(), "NameResolutionError", socket.gaierror))


Origin = tuple[str, str, int]
Auth = tuple[Origin, dict[str, str]]  # an Authorization header and the only origin it may go to


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


def token_host_trusted(registry: str, realm: str) -> bool:
    """Whether a token realm on host `realm` may see the credentials of `registry` (host
    names without ports): the registry's own host, its parent domain or a host under
    that domain, as token services are deployed: registry-1.docker.io and auth.docker.io,
    registry.gitlab.com and gitlab.com, registry.example.com and gitlab.example.com. An
    IP address trusts only itself. (A challenge is answered only when the registry
    itself sent it, and a registry could as well ask for the credentials with Basic:
    this keeps them from hosts the registry did not choose, and from unrelated ones.)"""
    registry, realm = registry.lower().rstrip("."), realm.lower().rstrip(".")
    if registry == realm:
        return True
    if _is_ip(registry) or _is_ip(realm):
        return False
    parent = registry.split(".", 1)[1] if "." in registry else ""
    if len(parent.split(".")) < MIN_DOMAIN_LABELS:
        return False
    return realm == parent or realm.endswith("." + parent)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def origin_of(url: str) -> Origin:
    """(scheme, host, port) of a URL: what must match for credentials to be sent."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or DEFAULT_PORTS.get(scheme, 0)


def shown(url: str) -> str:
    """A URL as errors and logs show it: no user info, query or fragment (signed
    storage URLs carry their signature there)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


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


def retries_allowed() -> int:
    value = os.environ.get("VMIMG_REGISTRY_RETRIES")
    if not value:
        return DEFAULT_RETRIES
    if not value.isdigit():
        raise SourceError(f"VMIMG_REGISTRY_RETRIES must be a number, not {value!r}")
    return int(value)


# -- credentials -----------------------------------------------------------------


def docker_config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def auth_files(authfile: str | None = None) -> list[str]:
    """The files credentials are looked up in, in order, as containers-auth.json(5) has it:
    the primary file (--authfile, else $REGISTRY_AUTH_FILE, else the runtime one), then
    $XDG_CONFIG_HOME/containers/auth.json, then Docker's config. The first that has an
    entry for the registry wins."""
    primary = authfile or os.environ.get("REGISTRY_AUTH_FILE")
    if not primary:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        primary = (
            os.path.join(runtime, "containers", "auth.json")
            if runtime
            else f"/run/containers/{os.getuid()}/auth.json"  # where root's podman keeps it
        )
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config"
    )
    return [primary, os.path.join(config_home, "containers", "auth.json"), docker_config_path()]


def _from_helper(helper: str, host: str) -> Credentials | None:
    """Ask docker-credential-HELPER for `host`; None if it has nothing for it."""
    what = f"credential helper docker-credential-{helper} failed for {host}"
    try:
        proc = subprocess.run(
            [f"docker-credential-{helper}", "get"],
            input=host.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError):
        raise AuthError(what) from None
    if proc.returncode != 0:
        if HELPER_NOT_FOUND in proc.stdout + proc.stderr:
            return None
        raise AuthError(what)
    try:
        payload = json.loads(proc.stdout)
        user, secret = payload["Username"], payload["Secret"]
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"{what}: its answer is not a credential") from None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise AuthError(f"{what}: its answer is not a credential")
    return Credentials(user, secret)


def _key_host(key: str) -> str:
    """An auths key as a host: `https://host/v1/` and `http://host` mean `host`; a bare
    key stays as it is (HOST/NAMESPACE keys then match no host)."""
    if "://" in key:
        return key.split("://", 1)[1].split("/", 1)[0]
    return key


def _host_names(host: str) -> set[str]:
    if host in DOCKER_HUB_HOSTS:
        return {*DOCKER_HUB_HOSTS, DOCKER_HUB_INDEX}
    return {host}


def _from_entry(entry: Any, host: str, path: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise AuthError(f"invalid entry for {host} in {path}")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, secret = base64.b64decode(auth, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise AuthError(f"invalid auth entry for {host} in {path}") from None
        if not sep or not user:
            raise AuthError(f"invalid auth entry for {host} in {path}")
        return Credentials(user, secret)
    name, password = entry.get("username"), entry.get("password", "")
    if isinstance(name, str) and name and isinstance(password, str):
        return Credentials(name, password)
    return None


def _credentials_in(path: str, host: str) -> tuple[bool, Credentials | None]:
    """(found, credentials) for `host` in one auth file; found is False when the file
    (or its entry) is absent, so that the search goes on."""
    try:
        with open(path, "rb") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        return False, None
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not valid JSON"
        raise AuthError(f"cannot read {path}: {reason}") from None
    if not isinstance(cfg, dict):
        raise AuthError(f"cannot read {path}: not a JSON object")
    names = _host_names(host)
    helpers = cfg.get("credHelpers")
    if isinstance(helpers, dict):
        for name in names:
            if isinstance(helpers.get(name), str):
                return True, _from_helper(helpers[name], host)
    auths = cfg.get("auths")
    if isinstance(auths, dict):
        for key, entry in auths.items():
            if isinstance(key, str) and _key_host(key) in names:
                creds = _from_entry(entry, host, path)
                if creds is not None:
                    return True, creds
    store = cfg.get("credsStore")
    if isinstance(store, str) and store:
        creds = _from_helper(store, DOCKER_HUB_INDEX if host in DOCKER_HUB_HOSTS else host)
        return creds is not None, creds
    return False, None


def load_credentials(host: str, authfile: str | None = None) -> Credentials | None:
    """Credentials for `host` from the first auth file that has some (see auth_files)."""
    for path in auth_files(authfile):
        found, creds = _credentials_in(path, host)
        if found:
            return creds
    return None


# -- challenges ---------------------------------------------------------------------

_PARAM_RE = re.compile(r'\s*([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """('bearer', {'realm': ..., 'service': ..., 'scope': ...}) from a WWW-Authenticate value."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for m in _PARAM_RE.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params.setdefault(m.group(1).lower(), re.sub(r"\\(.)", r"\1", value))
    return scheme.lower(), params


_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: nothing that could split a header


# -- the client --------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying (connection reset, dropped answer); carries its reason."""


class _PlainHttpAnswer(Exception):
    """The registry answered our TLS hello in plain http."""


class RegistryClient:
    """Talks to one registry host. Thread-safe enough for one request at a time per thread."""

    def __init__(
        self,
        host: str,
        insecure_hosts: Iterable[str] = (),
        ca_cert: str | None = None,
        retries: int | None = None,
        credentials: Credentials | None = None,
        tls_verify: bool = True,
        authfile: str | None = None,
    ) -> None:
        self.host = api_host(host)
        self.insecure_hosts = frozenset(insecure_hosts)
        self.tls_verify = tls_verify
        # With tls_verify off, https is tried first and plain http if it answers so (as
        # skopeo does); else loopback and named-insecure hosts get plain http first (and
        # https if they say they speak it).
        plain_first = tls_verify and (
            is_loopback_host(self.host) or self.host in self.insecure_hosts
        )
        self.base = f"{'http' if plain_first else 'https'}://{self.host}"
        self._may_fall_back_to_http = not tls_verify and not plain_first
        self.retries = retries if retries is not None else retries_allowed()
        self.timeout = read_timeout()
        self.session: requests.Session = _requests().Session()
        self.verify: bool | str = (ca_cert or True) if tls_verify else False
        self._authfile = authfile
        self._credentials = credentials
        self._credentials_loaded = credentials is not None
        self._auth_header: dict[str, str] = {}
        self._withheld_from: str | None = None  # a foreign token realm we sent no credentials

    @property
    def origin(self) -> Origin:
        return origin_of(self.base)

    # -- auth ---------------------------------------------------------------

    @property
    def credentials(self) -> Credentials | None:
        if not self._credentials_loaded:
            self._credentials = load_credentials(self.host, self._authfile)
            self._credentials_loaded = True
        return self._credentials

    def _answer_challenge(self, response: requests.Response) -> bool:
        """Set an Authorization header answering a 401; False if we cannot."""
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            creds = self.credentials
            if creds is None:
                raise AuthError(f"{self.host} requires credentials; none found (see --creds)")
            self._auth_header = {"Authorization": f"Basic {creds.basic()}"}
            return True
        if scheme == "bearer":
            self._auth_header = {"Authorization": f"Bearer {self._fetch_token(params)}"}
            return True
        return False

    def _fetch_token(self, params: dict[str, str]) -> str:
        """A bearer token from the realm the challenge names, with our credentials only
        where they may go (see token_host_trusted; plain http was checked), else anonymous."""
        what = f"token for {self.host}"
        realm = params.get("realm", "")
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise AuthError(f"{what}: the token realm {realm[:100]!r} is not an http(s) URL")
        query = [(k, params[k]) for k in ("service", "scope") if params.get(k)]
        url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        self._check_plain_http(url, what, "token realm ")
        realm_origin = origin_of(url)
        creds = self.credentials
        auth: Auth | None = None
        if creds is not None and token_host_trusted(self.origin[1], realm_origin[1]):
            auth = (realm_origin, {"Authorization": f"Basic {creds.basic()}"})
        self._withheld_from = parts.netloc if creds is not None and auth is None else None
        headers = {"Accept": "application/json"}
        try:
            resp = self._with_retries(
                what, True, lambda: self._send("GET", url, headers, None, what, False, auth)
            )
        except _PlainHttpAnswer:
            raise SourceError(f"{what}: {parts.netloc} answered in plain http, not TLS") from None
        if resp.status_code in (HTTP_UNAUTHORIZED, HTTP_FORBIDDEN):
            who = "the credentials" if auth is not None else "an anonymous token"
            raise AuthError(f"{what}: {parts.netloc} refused {who} ({resp.status_code})")
        if resp.status_code != 200:
            raise SourceError(f"{what}: {parts.netloc} answered {resp.status_code} {resp.reason}")
        answer = _json_answer(resp)
        if not isinstance(answer, dict):
            raise AuthError(f"{what}: {parts.netloc} sent an answer that is not a JSON object")
        token = answer.get("token") or answer.get("access_token")
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            raise AuthError(f"{what}: {parts.netloc} sent no usable token")
        return token

    # -- requests -----------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """`text` without our credentials or token: a hostile registry may echo them in an
        error message, a Location or a realm, and our messages end up in CI logs."""
        secrets = [v.split(" ", 1)[-1] for v in self._auth_header.values()]
        creds = self._credentials
        if creds is not None:
            secrets += [creds.basic(), creds.secret]
        for secret in sorted(secrets, key=len, reverse=True):
            if len(secret) >= MIN_SECRET_LEN:
                text = text.replace(secret, HIDDEN)
        return text

    def _log(self, level: int, fmt: str, *args: object) -> None:
        if log.isEnabledFor(level):
            log.log(level, "%s", self._scrub(fmt % args))

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
        """One API call with auth and retries; raises unless the status is in `ok`
        (see _request), with our credentials scrubbed from any error."""
        try:
            return self._request(method, path, headers, stream, data, ok, what, replayable)
        except VmimgError as e:
            raise type(e)(self._scrub(str(e))) from None

    def _request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None,
        stream: bool,
        data: Any,
        ok: Iterable[int],
        what: str,
        replayable: bool,
    ) -> requests.Response:
        """One API call with auth and retries; raises unless the status is in `ok`.

        `path` is a path under the registry or an absolute URL (an upload Location, a
        Link). Unless `stream`, the body is read whole, refused past 4 MiB.

        A request whose body is a stream is not `replayable`: where it would be
        sent again (connection error, 401, 429, 5xx) it raises UploadInterrupted
        instead, after answering a 401's challenge, and the caller starts over.
        """
        url = path if "://" in path else self.base + path
        what = what or f"{method} {shown(url)}"
        ok_set = set(ok)
        reauthed = False
        while True:
            auth = (self.origin, self._auth_header) if self._auth_header else None

            def send(url: str = url, auth: Auth | None = auth) -> requests.Response:
                return self._send(method, url, headers or {}, data, what, stream, auth)

            try:
                resp = self._with_retries(what, replayable, send)
            except _PlainHttpAnswer:
                url = self._fall_back_to_http(url)
                continue
            self._may_fall_back_to_http = False  # it answered: TLS works
            if self._switched_to_https(resp):
                url = "https://" + url.split("://", 1)[1]
                continue
            if (
                resp.status_code == HTTP_UNAUTHORIZED
                and not reauthed
                and origin_of(resp.url) == self.origin
            ):
                reauthed = True
                resp.close()
                if self._answer_challenge(resp):
                    if not replayable:
                        raise UploadInterrupted(f"{what}: 401 (authorisation renewed)")
                    continue
            if resp.status_code in ok_set:
                return resp
            raise self._error(resp, what)

    def _with_retries(
        self, what: str, replayable: bool, send: Callable[[], requests.Response]
    ) -> requests.Response:
        """`send` again after transient failures and 429/5xx answers, with backoff; the
        last answer once retries run out."""
        backoff = _Backoff()
        while True:
            attempt = backoff.next_attempt()
            resp: requests.Response | None = None
            try:
                resp = send()
            except _Transient as e:
                if not replayable:
                    raise UploadInterrupted(f"{what}: {e}") from None
                if attempt > self.retries:
                    raise SourceError(f"{what}: {e} (gave up after {attempt} attempts)") from None
                reason = str(e)
            else:
                if resp.status_code not in RETRY_STATUSES:
                    return resp
                if not replayable:
                    resp.close()
                    raise UploadInterrupted(f"{what}: {resp.status_code} {resp.reason}")
                if attempt > self.retries:
                    return resp
                resp.close()
                reason = f"{resp.status_code} {resp.reason}"
            pause = backoff.delay if resp is None else _retry_after(resp, backoff.delay)
            self._log(
                logging.WARNING,
                "%s: %s; retry %d of %d in %g s",
                what, reason, attempt, self.retries, pause,
            )  # fmt: skip
            backoff.sleep(pause)

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        data: Any,
        what: str,
        stream: bool,
        auth: Auth | None,
    ) -> requests.Response:
        """One request, following redirects (GET and HEAD only) by hand so that the
        Authorization header of `auth` goes to its origin and nowhere else. Unless
        `stream`, the body is read here, capped."""
        for _hop in range(MAX_REDIRECTS + 1):
            self._check_plain_http(url, what)
            send_headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if auth is not None and origin_of(url) == auth[0]:
                send_headers.update(auth[1])
            try:
                resp = self.session.request(
                    method, url, headers=send_headers, data=data, stream=True,
                    verify=self.verify, timeout=(CONNECT_TIMEOUT, self.timeout),
                    allow_redirects=False, auth=_no_netrc,
                )  # fmt: skip
                if not stream and method != "HEAD":  # a HEAD's Content-Length has no body
                    _read_capped(resp, MAX_DOCUMENT_BYTES, what, self.timeout)
            except _requests().exceptions.RequestException as e:
                raise self._failure(e, url, what) from None
            self._log(logging.DEBUG, "%s %s: %d", method, shown(url), resp.status_code)
            if not (resp.is_redirect and method in ("GET", "HEAD")):
                return resp
            url = urllib.parse.urljoin(resp.url, resp.headers["Location"])
            resp.close()
        raise SourceError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _plain_http_allowed(self, netloc: str) -> bool:
        host = urllib.parse.urlsplit(f"//{netloc}").hostname or ""
        return (
            not self.tls_verify
            or is_loopback_host(netloc)
            or netloc in self.insecure_hosts
            or host in self.insecure_hosts
        )

    def _check_plain_http(self, url: str, what: str, label: str = "") -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https":
            return
        if parts.scheme != "http":
            raise SourceError(f"{what}: {label}{shown(url)[:200]} is not an http(s) URL")
        if not self._plain_http_allowed(parts.netloc):
            raise SourceError(
                f"{what}: {label}{shown(url)} is plain http: vmimg sends nothing in clear to "
                f"{parts.netloc} unless it is loopback or named with --insecure-registry "
                f"{parts.netloc} (or with --tls-verify=false)"
            )

    def _failure(self, e: requests.exceptions.RequestException, url: str, what: str) -> Exception:
        """Our error for a failed request: fail at once, or _Transient to retry."""
        netloc = urllib.parse.urlsplit(url).netloc
        cause = root_cause(e)
        if isinstance(e, _requests().exceptions.SSLError):
            text = str(cause)
            if any(sign in text for sign in PLAIN_HTTP_SIGNS):
                if self._may_fall_back_to_http and origin_of(url) == self.origin:
                    return _PlainHttpAnswer()
                return SourceError(
                    f"{what}: {netloc} answered in plain http, not TLS: for a plain-http "
                    f"registry pass --tls-verify=false or --insecure-registry {netloc}"
                )
            if "CERTIFICATE_VERIFY_FAILED" in text:
                detail = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0]
                return SourceError(
                    f"{what}: {netloc}'s TLS certificate is not trusted ({detail.strip()}): "
                    f"pass its CA with --ca-cert FILE, or --tls-verify=false"
                )
            return SourceError(f"{what}: TLS error talking to {netloc}: {_short(cause)}")
        if isinstance(e, _requests().exceptions.ConnectTimeout):
            return SourceError(
                f"{what}: {netloc} did not accept a connection within {CONNECT_TIMEOUT:g} s"
            )
        if isinstance(e, _requests().exceptions.ReadTimeout) or isinstance(cause, TimeoutError):
            return self._timed_out(netloc, what)
        if isinstance(cause, _dns_failures()):
            host = urllib.parse.urlsplit(url).hostname or netloc
            return SourceError(f"{what}: cannot resolve {host}")
        if isinstance(cause, ConnectionRefusedError):
            return SourceError(f"{what}: {netloc} refused the connection")
        if isinstance(cause, OSError) and cause.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return SourceError(f"{what}: cannot reach {netloc}: {os.strerror(cause.errno)}")
        if isinstance(e, _requests().exceptions.InvalidURL | _requests().exceptions.InvalidHeader):
            return SourceError(f"{what}: invalid URL or header from the registry")
        return _Transient(f"connection to {netloc} lost ({type(cause).__name__})")

    def _timed_out(self, netloc: str, what: str) -> SourceError:
        return SourceError(
            f"{what}: {netloc} did not answer within {self.timeout:g} s (VMIMG_REGISTRY_TIMEOUT)"
        )

    def _fall_back_to_http(self, url: str) -> str:
        """tls_verify is off and the registry speaks plain http: use it from now on."""
        self._may_fall_back_to_http = False
        self.base = "http://" + self.base.split("://", 1)[1]
        log.debug("%s speaks plain http", self.host)
        return "http://" + url.split("://", 1)[1]

    def _switched_to_https(self, resp: requests.Response) -> bool:
        """A loopback or insecure host may still speak TLS: Go servers answer plain
        http on a TLS port with this 400, and then we move to https for good."""
        if resp.status_code != HTTP_BAD_REQUEST or not self.base.startswith("http://"):
            return False
        if origin_of(resp.url) != self.origin:
            return False
        if resp.request.method == "HEAD":  # no body to read the answer from: ask with a GET
            try:
                resp = self._send("GET", self.base + "/v2/", {}, None, "probe", False, None)
            except (SourceError, _Transient, _PlainHttpAnswer):
                return False
        if GO_TLS_ANSWER not in _body_head(resp, MAX_ERROR_BODY):
            return False
        self.base = "https://" + self.base[len("http://") :]
        return True

    def _error(self, resp: requests.Response, what: str) -> SourceError:
        detail = ""
        try:
            errors = json.loads(_body_head(resp, MAX_ERROR_BODY)).get("errors") or []
            detail = "; ".join(
                str(e.get("message") or e.get("code"))[:200]
                for e in errors[:5]
                if isinstance(e, dict)
            )
        except (ValueError, AttributeError, TypeError, OSError, _urllib3_errors().HTTPError):
            pass
        finally:
            resp.close()
        text = f"{what}: {resp.status_code} {resp.reason}" + (f" ({detail})" if detail else "")
        if resp.status_code == HTTP_UNAUTHORIZED and "Authorization" in self._auth_header:
            text += f"; the registry rejected the credentials for {self.host}"
            if self._withheld_from:
                text += (
                    f" (they were not sent to its token service {self._withheld_from}, "
                    "which is on another host)"
                )
        if resp.status_code in (HTTP_UNAUTHORIZED, HTTP_FORBIDDEN):
            return AuthError(text)
        return SourceError(text)

    # -- API helpers ----------------------------------------------------------

    def _find(
        self, method: str, path: str, what: str, accept: str | None = None
    ) -> requests.Response | None:
        """A GET or HEAD of something the registry may not have: its answer, None on 404."""
        headers = {"Accept": accept} if accept is not None else None
        resp = self.request(method, path, headers, ok=(200, HTTP_NOT_FOUND), what=what)
        return None if resp.status_code == HTTP_NOT_FOUND else resp

    def _manifest_what(self, repo: str, reference: str) -> str:
        return f"manifest {self.host}/{repo}:{reference}"

    def get_manifest(self, repo: str, reference: str, accept: str) -> tuple[bytes, str]:
        """Manifest bytes (at most 4 MiB) and the Content-Type the registry declared."""
        resp = self.request(
            "GET",
            _manifest_path(repo, reference),
            headers={"Accept": accept},
            what=self._manifest_what(repo, reference),
            ok=(200,),
        )
        return resp.content, _content_type(resp)

    def open_blob(self, repo: str, digest: str) -> BlobStream:
        return BlobStream(self, f"/v2/{repo}/blobs/{digest}", f"blob {digest}")

    def head_manifest(self, repo: str, reference: str, accept: str) -> ManifestHead | None:
        """What the registry has under a tag or digest (media type, digest, size), or None."""
        what = self._manifest_what(repo, reference)
        resp = self._find("HEAD", _manifest_path(repo, reference), what, accept)
        if resp is None:
            return None
        ctype = _content_type(resp)
        digest = resp.headers.get("Docker-Content-Digest", "")
        size = resp.headers.get("Content-Length", "")
        if not digest or not size.isdigit():
            # Some registries do not answer HEAD fully: fall back to the document.
            data, ctype = self.get_manifest(repo, reference, accept)
            return ManifestHead(ctype, digest_of(data), len(data))
        return ManifestHead(ctype, digest, int(size))

    def list_tags(self, repo: str) -> list[str]:
        """Every tag of `repo`, following the Link header's pages."""
        what = f"tags of {self.host}/{repo}"
        tags: list[str] = []
        url: str | None = f"/v2/{repo}/tags/list"
        pages = 0
        while url:
            pages += 1
            if pages > MAX_TAG_PAGES:
                raise SourceError(f"{what}: more than {MAX_TAG_PAGES} pages")
            resp = self._find("GET", url, what)
            if resp is None:
                return []
            answer = _json_answer(resp)
            page = answer.get("tags") if isinstance(answer, dict) else None
            if page is None and isinstance(answer, dict):
                page = []  # a repository without tags says null
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise SourceError(f"{what}: not a JSON tag list")
            tags.extend(page)
            link = _next_link(resp.headers.get("Link", ""))
            url = urllib.parse.urljoin(resp.url, link) if link else None
        return tags

    # -- referrers (the OCI distribution spec's API, and its fallback tag) --------

    def read_index(self, repo: str, reference: str) -> dict[str, Any] | None:
        """The OCI index at `reference` (a tag such as a fallback tag), or None if absent."""
        what = f"referrers index {self.host}/{repo}:{reference}"
        resp = self._find("GET", _manifest_path(repo, reference), what, OCI_INDEX)
        if resp is None:
            return None
        return load_json(resp.content, f"referrers index {reference}")

    def add_to_fallback_index(self, repo: str, subject: str, entry: Descriptor) -> None:
        """Add `entry` to the index under the subject's fallback tag (read, append, PUT),
        for registries without the referrers API."""
        tag = fallback_tag(subject)
        index = self.read_index(repo, tag) or {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [],
        }
        manifests = index.get("manifests")
        if not isinstance(manifests, list):
            raise SourceError(f"{self.host}/{repo}:{tag} is not an index")
        if any(isinstance(m, dict) and m.get("digest") == entry.digest for m in manifests):
            return
        manifests.append(entry.to_json())
        data = json.dumps(index, separators=(",", ":")).encode()
        self.put_manifest(repo, tag, data, OCI_INDEX)

    def referrers(
        self, repo: str, digest: str, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """The manifests whose subject is `digest`: the referrers API, or the fallback tag
        where the registry has no API (it answers 404, as the spec says it must)."""
        query = f"?artifactType={urllib.parse.quote(artifact_type)}" if artifact_type else ""
        what = f"referrers of {self.host}/{repo}@{digest}"
        resp = self._find("GET", f"/v2/{repo}/referrers/{digest}{query}", what, OCI_INDEX)
        index: dict[str, Any] | None = None
        if resp is not None:
            with contextlib.suppress(SourceError):
                index = load_json(resp.content, "referrers")
        if index is None or not isinstance(index.get("manifests"), list):
            index = self.read_index(repo, fallback_tag(digest)) or {"manifests": []}
        out = []
        for i, d in enumerate(index.get("manifests") or []):
            desc = Descriptor.from_json(d, f"referrers of {digest} [{i}]")
            if artifact_type is None or desc.artifact_type == artifact_type:
                out.append(desc)
        return out

    # -- pushing --------------------------------------------------------------

    def blob_exists(self, repo: str, digest: str) -> bool:
        what = f"blob {digest} in {self.host}/{repo}"
        return self._find("HEAD", f"/v2/{repo}/blobs/{digest}", what) is not None

    def upload_blob(self, repo: str, path: str, digest: str, size: int) -> bool:
        """Upload the file at `path` (whose digest and size the caller computed) unless the
        registry has it already. True if it was uploaded. Failed attempts start over."""
        if self.blob_exists(repo, digest):
            return False
        what = f"blob {digest} to {self.host}/{repo}"
        chunk = upload_chunk_size()
        backoff = _Backoff()
        while True:
            attempt = backoff.next_attempt()
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
                log.warning(
                    "%s; upload %d of %d in %g s", e, attempt + 1, self.retries + 1, backoff.delay
                )
                backoff.sleep(backoff.delay)

    def _start_upload(self, repo: str, what: str) -> str:
        resp = self.request(
            "POST", f"/v2/{repo}/blobs/uploads/", ok=(202,), what=f"{what}: starting upload"
        )
        return self._location(resp, what)

    def _location(self, resp: requests.Response, what: str) -> str:
        """The absolute upload URL a 202 names (which may be on another host: it then
        gets the blob but never our credentials, see _send)."""
        location = resp.headers.get("Location")
        if not location:
            raise SourceError(f"{what}: the registry sent no upload Location")
        url = urllib.parse.urljoin(resp.url, location)
        self._check_plain_http(url, what, "upload Location ")
        return url

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
            _manifest_path(repo, reference),
            headers={"Content-Type": media_type},
            data=data,
            ok=(201,),
            what=self._manifest_what(repo, reference),
        )
        digest = digest_of(data)
        sent = resp.headers.get("Docker-Content-Digest")
        if sent and sent != digest:
            raise SourceError(
                f"manifest {self.host}/{repo}:{reference}: stored as {sent[:80]}, not {digest}"
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


class _Backoff:
    """Pauses between attempts: BACKOFF_START, doubling up to BACKOFF_CAP."""

    def __init__(self) -> None:
        self.delay = BACKOFF_START
        self.attempt = 0

    def next_attempt(self) -> int:
        self.attempt += 1
        return self.attempt

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
        self.delay = min(self.delay * 2, BACKOFF_CAP)


def _manifest_path(repo: str, reference: str) -> str:
    return f"/v2/{repo}/manifests/{reference}"


def _content_type(resp: requests.Response) -> str:
    """The media type of an answer, without parameters."""
    return resp.headers.get("Content-Type", "").split(";")[0].strip()


def _json_answer(resp: requests.Response) -> Any:
    """The JSON of an answer's (read, capped) body, or None if it is not JSON."""
    try:
        return json.loads(resp.content)
    except (ValueError, UnicodeDecodeError):
        return None


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _no_netrc(r: requests.PreparedRequest) -> requests.PreparedRequest:
    """An auth hook that adds nothing: it keeps requests from adding ~/.netrc credentials,
    so that only the credentials vmimg chose are ever sent."""
    return r


def _read_capped(resp: requests.Response, cap: int, what: str, timeout: float) -> None:
    """Read the body of `resp` into resp.content, refusing it past `cap` bytes (also
    when Content-Length says so up front) or when it takes longer than `timeout` in all."""
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > cap:
        resp.close()
        raise SourceError(f"{what}: {int(length)} bytes, more than the {_mib(cap)} vmimg accepts")
    deadline = time.monotonic() + timeout
    body = bytearray()
    for chunk in resp.iter_content(READ_CHUNK):
        body += chunk
        if len(body) > cap:
            resp.close()
            raise SourceError(f"{what}: more than the {_mib(cap)} vmimg accepts")
        if time.monotonic() > deadline:
            resp.close()
            netloc = urllib.parse.urlsplit(resp.url).netloc
            raise SourceError(
                f"{what}: {netloc} took more than {timeout:g} s to send it (VMIMG_REGISTRY_TIMEOUT)"
            )
    resp._content = bytes(body)
    resp.close()  # everything is read: this hands the connection back to the pool


def _body_head(resp: requests.Response, limit: int) -> bytes:
    """The body of `resp` if it was read; else its first `limit` bytes, kept as its body."""
    if not isinstance(resp._content, bytes):  # not read yet (requests marks that with False)
        try:
            resp._content = resp.raw.read(limit, decode_content=True) or b""
        except (OSError, _urllib3_errors().HTTPError):
            resp._content = b""
    return resp._content or b""


def _mib(n: int) -> str:
    return f"{n >> 20} MiB"


def _short(e: BaseException) -> str:
    return (str(e) or type(e).__name__).splitlines()[0][:200]


def _next_link(header: str) -> str | None:
    """The target of a `Link: </v2/...>; rel="next"` header, or None."""
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
                log.warning(
                    "%s: %s at byte %d; resuming (%d of %d)",
                    self.what, type(e).__name__, self.pos, self.resumes, self.client.retries,
                )  # fmt: skip
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
        _requests().exceptions.RequestException
        | _urllib3_errors().HTTPError
        | ConnectionError
        | TimeoutError,
    )


def quiet_insecure_warnings() -> None:
    """--tls-verify=false is the user's choice: no urllib3 warning on every request."""
    warnings.simplefilter("ignore", _urllib3_errors().InsecureRequestWarning)
