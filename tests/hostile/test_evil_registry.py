"""A hostile registry (tests/hostile/evil_registry.py) against the real CLI and client.

What is asserted: credentials reach only the registry's own scheme, host and port
(never a redirect target, an upload Location or a token realm on another host:
127.0.0.2 plays that host); every request times out, the token request too; small
documents are capped at 4 MiB while they stream; every blob's size matches its
descriptor; wrong JSON types, DNS failures and refused connections are one line,
quickly; transient errors are retried with one line each on stderr.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.peakrss import run_with_peak_rss
from tests.conftest import free_port
from tests.hostile.cli import confined_command, confined_env, run_vmimg
from tests.hostile.corpus import relink
from tests.hostile.evil_registry import (
    OTHER_HOST,
    EvilServer,
    Handler,
    Reply,
    Store,
    accept_uploads,
    basic,
    challenge,
    endless,
    evil_server,
    load_layout,
    outside_address,
    redirect,
    send,
    send_json,
    serve_registry,
    silent,
)
from vmimg.errors import DigestError, SourceError
from vmimg.image.cache import Cache
from vmimg.image.fetch import fetch_layers
from vmimg.image.oci import OCI_INDEX, OCI_MANIFEST, Platform
from vmimg.image.registry import Credentials, RegistryClient, token_host_trusted
from vmimg.image.sample import write_sample
from vmimg.image.sources import SourceOptions, open_image
from vmimg.image.sources.base import MAX_DOCUMENT_BYTES

USER, PASSWORD = "evil-user", "Pa55-evil-xyzzy"
REPO = "evil/img"
TIMEOUT = "2"  # VMIMG_REGISTRY_TIMEOUT of the timeout tests, seconds
BOUNDED = 30.0  # what "in bounded time" means here, seconds
FAST = 5.0  # what "at once" means here, seconds (a loaded machine starts python slowly)
MAX_RSS_KIB = 300 << 10  # the CLI's peak RSS while refusing an endless manifest
HUGE = 1536 << 20  # the manifest size a hostile registry claims


def secrets() -> list[str]:
    return [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evil-sample") / "layout"
    write_sample(str(root))
    return root


@pytest.fixture
def store(layout: Path) -> Store:
    return load_layout(layout, "latest")


@pytest.fixture
def hostile(store: Store) -> Iterator[EvilServer]:
    """The hostile registry: serves the sample as REPO:latest, Basic auth USER/PASSWORD."""
    with evil_server() as evil:
        serve_registry(evil, REPO, store, guard_basic)
        yield evil


@pytest.fixture
def other() -> Iterator[EvilServer]:
    """The other host."""
    with evil_server(OTHER_HOST) as evil:
        yield evil


def guard_basic(reply: Reply) -> Reply:
    return challenge('Basic realm="evil"', lambda a: a == basic(USER, PASSWORD), reply)


def docker_config(tmp_path: Path, host: str) -> dict[str, str]:
    """An environment whose Docker config holds USER/PASSWORD for `host`."""
    d = tmp_path / "docker"
    d.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return {"DOCKER_CONFIG": str(d)}


def inspect(
    tmp_path: Path, ref: str, env: dict[str, str], *extra: str, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    r = run_vmimg(tmp_path / "w", "inspect", ref, "--json", *extra, env=env, timeout=timeout)
    return r, time.monotonic() - start


def one_line(r: subprocess.CompletedProcess[str], code: int = 4) -> str:
    """The single error line of a failed --json run (no traceback anywhere)."""
    assert r.returncode == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return str(json.loads(r.stdout)["error"])


def assert_never_saw_credentials(evil: EvilServer) -> None:
    assert evil.authorizations() == []
    for seen in evil.requests():
        text = seen.path + json.dumps(seen.headers) + seen.body.decode("latin-1")
        for secret in secrets():
            assert secret not in text


# -- credentials stay with their registry --------------------------------------------


@pytest.mark.parametrize("bind", [OTHER_HOST, "127.0.0.1"], ids=["other-host", "other-port"])
def test_blob_redirect_elsewhere_is_followed_without_credentials(
    hostile: EvilServer, store: Store, tmp_path: Path, bind: str
) -> None:
    with evil_server(bind) as storage:
        storage.on("GET", r"/storage/(sha256:[0-9a-f]{64})\?.*", send_blob(store))
        hostile.on(
            "GET",
            rf"/v2/{REPO}/blobs/(sha256:[0-9a-f]{{64}})",
            guard_basic(redirect(lambda m: f"{storage.url}/storage/{m.group(1)}?sig=abc")),
        )
        r = run_vmimg(
            tmp_path / "w", "rootfs", f"{hostile.address}/{REPO}:latest", "-o",
            str(tmp_path / "o.tar"), env=docker_config(tmp_path, hostile.address),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert len([s for s in storage.requests() if s.path.startswith("/storage/")]) >= 2
        assert_never_saw_credentials(storage)
    assert basic(USER, PASSWORD) in hostile.authorizations()


def send_blob(store: Store) -> Reply:
    def reply(h: Handler, m: re.Match[str]) -> None:
        send(200, store.blobs[m.group(1)])(h, m)

    return reply


def test_upload_location_on_another_host_gets_no_credentials(
    hostile: EvilServer, other: EvilServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accept_uploads(other, Store(), r"/elsewhere/upload")
    hostile.on(
        "POST",
        rf"/v2/{REPO}/blobs/uploads/",
        guard_basic(send(202, b"", {"Location": f"{other.url}/elsewhere/upload"})),
    )
    monkeypatch.setenv("DOCKER_CONFIG", docker_config(tmp_path, hostile.address)["DOCKER_CONFIG"])
    blob = tmp_path / "blob"
    blob.write_bytes(b"pushed elsewhere")
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    client = RegistryClient(hostile.address)
    assert client.upload_blob(REPO, str(blob), digest, blob.stat().st_size)
    assert [s.method for s in other.requests()] == ["PUT"]
    assert_never_saw_credentials(other)
    assert basic(USER, PASSWORD) in hostile.authorizations()


def test_a_blob_head_may_claim_any_size(hostile: EvilServer) -> None:
    """HEAD answers carry no body: their Content-Length is no document to cap."""

    def big(h: Handler, m: re.Match[str]) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(5 << 30))
        h.end_headers()

    hostile.on("HEAD", rf"/v2/{REPO}/blobs/.*", guard_basic(big))
    client = RegistryClient(hostile.address, credentials=Credentials(USER, PASSWORD))
    assert client.blob_exists(REPO, "sha256:" + "0" * 64)


def echo(status: int) -> Reply:
    """An error whose message repeats the Authorization header and the password."""

    def reply(h: Handler, m: re.Match[str]) -> None:
        said = f"you sent {h.headers.get('Authorization')} for {USER}:{PASSWORD}"
        send_json({"errors": [{"code": "DENIED", "message": said}]}, status)(h, m)

    return reply


@pytest.mark.parametrize("where", ["manifest", "redirected-blob"])
def test_echoed_credentials_are_never_printed(
    hostile: EvilServer, other: EvilServer, tmp_path: Path, where: str
) -> None:
    if where == "manifest":
        hostile.on("GET", rf"/v2/{REPO}/manifests/.*", guard_basic(echo(403)))
    else:  # the storage host's path and answer both carry the secrets
        other.on("GET", r"/.*", echo(404))
        hostile.on(
            "GET",
            rf"/v2/{REPO}/blobs/.*",
            guard_basic(redirect(lambda m: f"{other.url}/{PASSWORD}/{basic(USER, PASSWORD)[6:]}")),
        )
    env = docker_config(tmp_path, hostile.address)
    r = run_vmimg(
        tmp_path / "w", "-v", "inspect", f"{hostile.address}/{REPO}:latest", "--json", env=env
    )
    assert "[hidden]" in one_line(r)
    for secret in secrets():
        assert secret not in r.stdout + r.stderr


def bearer_registry(evil: EvilServer, store: Store, realm: str, token: str) -> None:
    """Make `evil` a registry that wants a bearer token `token`, to be had at `realm`."""
    header = f'Bearer realm="{realm}",service="evil",scope="repository:{REPO}:pull"'
    serve_registry(
        evil,
        REPO,
        store,
        lambda reply: challenge(header, lambda a: a == f"Bearer {token}", reply),
    )


def test_token_realm_on_another_host_gets_no_credentials(
    hostile: EvilServer, other: EvilServer, store: Store, tmp_path: Path
) -> None:
    other.on("GET", r"/token\?.*", send_json({"token": "anonymous-token"}))
    bearer_registry(hostile, store, f"{other.url}/token", "anonymous-token")
    r, _ = inspect(
        tmp_path, f"{hostile.address}/{REPO}:latest", docker_config(tmp_path, hostile.address)
    )
    assert r.returncode == 0, r.stderr
    # `inspect` reads the manifest twice (is it a bundle? then the image): a token each time.
    assert {s.method for s in other.requests()} == {"GET"}
    assert all("service=evil" in s.path for s in other.requests())
    assert_never_saw_credentials(other)


@pytest.mark.parametrize("where", ["registry", "same-host-other-port"])
def test_token_realm_on_the_registry_host_gets_the_credentials(
    hostile: EvilServer, store: Store, tmp_path: Path, where: str
) -> None:
    with evil_server() as port_server:
        realm = hostile if where == "registry" else port_server
        realm.on(
            "GET",
            r"/token\?.*",
            challenge("Basic", lambda a: a == basic(USER, PASSWORD), send_json({"token": "t0k"})),
        )
        bearer_registry(hostile, store, f"{realm.url}/token", "t0k")
        r, _ = inspect(
            tmp_path, f"{hostile.address}/{REPO}:latest", docker_config(tmp_path, hostile.address)
        )
        assert r.returncode == 0, r.stderr
        tokens = [s for s in realm.requests() if s.path.startswith("/token")]
        assert tokens  # one per manifest read (`inspect` reads it twice)
        assert {s.headers.get("authorization") for s in tokens} == {basic(USER, PASSWORD)}


def test_withheld_credentials_are_named_when_the_registry_refuses(
    hostile: EvilServer, other: EvilServer, store: Store, tmp_path: Path
) -> None:
    other.on("GET", r"/token\?.*", send_json({"token": "anonymous-token"}))
    bearer_registry(hostile, store, f"{other.url}/token", "a-token-only-credentials-get")
    r, _ = inspect(
        tmp_path, f"{hostile.address}/{REPO}:latest", docker_config(tmp_path, hostile.address)
    )
    line = one_line(r)
    assert line.startswith(f"manifest {hostile.address}/{REPO}:latest: 401 Unauthorized")
    assert f"not sent to its token service {other.address}, which is on another host" in line
    assert_never_saw_credentials(other)


@pytest.mark.parametrize(
    ("registry_host", "realm_host", "trusted"),
    [
        ("registry-1.docker.io", "auth.docker.io", True),
        ("registry.gitlab.com", "gitlab.com", True),
        ("registry.example.com", "gitlab.example.com", True),
        ("ghcr.io", "ghcr.io", True),
        ("127.0.0.1", "127.0.0.2", False),
        ("ghcr.io", "evil.io", False),  # a registry's parent domain is never a bare TLD
        ("registry.example.com", "example.org", False),
        ("registry.example.com", "registry.example.com.evil.net", False),
        ("registry.example.com", "evilexample.com", False),
        ("localhost", "127.0.0.1", False),
    ],
)
def test_which_token_hosts_see_credentials(
    registry_host: str, realm_host: str, trusted: bool
) -> None:
    assert token_host_trusted(registry_host, realm_host) is trusted


def test_plain_http_realm_on_a_remote_host_is_refused(
    hostile: EvilServer, store: Store, tmp_path: Path
) -> None:
    bearer_registry(hostile, store, "http://auth.example.invalid/token", "x")
    r, elapsed = inspect(
        tmp_path, f"{hostile.address}/{REPO}:latest", docker_config(tmp_path, hostile.address)
    )
    line = one_line(r)
    assert "token realm http://auth.example.invalid/token is plain http" in line
    assert "--insecure-registry auth.example.invalid" in line
    assert elapsed < FAST


# -- timeouts ---------------------------------------------------------------------------


@pytest.mark.slow  # seconds of retries and timeouts: full run only
def test_silent_token_realm_fails_in_bounded_time(
    hostile: EvilServer, other: EvilServer, store: Store, tmp_path: Path
) -> None:
    other.on("GET", r"/token.*", silent())
    bearer_registry(hostile, store, f"{other.url}/token", "x")
    env = {"VMIMG_REGISTRY_TIMEOUT": TIMEOUT}
    r, elapsed = inspect(tmp_path, f"{hostile.address}/{REPO}:latest", env, timeout=BOUNDED * 2)
    assert one_line(r) == (
        f"token for {hostile.address}: {other.address} did not answer within "
        f"{TIMEOUT} s (VMIMG_REGISTRY_TIMEOUT)"
    )
    assert elapsed < BOUNDED


@pytest.mark.slow  # seconds of retries and timeouts: full run only
def test_silent_registry_fails_in_bounded_time(hostile: EvilServer, tmp_path: Path) -> None:
    hostile.on("GET", rf"/v2/{REPO}/manifests/.*", silent())
    env = {"VMIMG_REGISTRY_TIMEOUT": TIMEOUT}
    r, elapsed = inspect(tmp_path, f"{hostile.address}/{REPO}:latest", env, timeout=BOUNDED * 2)
    assert one_line(r) == (
        f"manifest {hostile.address}/{REPO}:latest: {hostile.address} did not answer within "
        f"{TIMEOUT} s (VMIMG_REGISTRY_TIMEOUT)"
    )
    assert elapsed < BOUNDED


# -- documents are capped while they stream -----------------------------------------------


def run_measured(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """The confined CLI (prlimit --as) and its own peak RSS in KiB."""
    run = run_with_peak_rss(
        confined_command(*args),
        cwd=tmp_path / "w" / "cwd",
        env=confined_env(tmp_path / "w"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return run.result, run.peak_rss_kib


@pytest.mark.parametrize("length", [None, HUGE], ids=["endless-chunked", "claims-1.5GB"])
def test_huge_manifest_is_refused_in_bounded_memory(
    hostile: EvilServer, tmp_path: Path, length: int | None
) -> None:
    hostile.on("GET", rf"/v2/{REPO}/manifests/.*", endless(OCI_MANIFEST, length))
    confined_env(tmp_path / "w")  # makes the directories
    r, rss_kib = run_measured(tmp_path, "inspect", f"{hostile.address}/{REPO}:latest", "--json")
    line = one_line(r)
    assert line.startswith(f"manifest {hostile.address}/{REPO}:latest: ")
    assert "more than the 4 MiB vmimg accepts" in line
    assert rss_kib < MAX_RSS_KIB
    assert hostile.sent < 8 * MAX_DOCUMENT_BYTES
    blobs = tmp_path / "w" / "cache" / "blobs" / "sha256"
    assert not blobs.exists() or os.listdir(blobs) == []


def test_huge_token_answer_is_refused(
    hostile: EvilServer, other: EvilServer, store: Store, tmp_path: Path
) -> None:
    other.on("GET", r"/token.*", endless("application/json"))
    bearer_registry(hostile, store, f"{other.url}/token", "x")
    r, _ = inspect(tmp_path, f"{hostile.address}/{REPO}:latest", {})
    assert "more than the 4 MiB vmimg accepts" in one_line(r)
    assert other.sent < 8 * MAX_DOCUMENT_BYTES


# -- sizes match descriptors, for every transport -----------------------------------------


def lie_root_size(layout: Path) -> str:
    """index.json's entry keeps its digest but claims 100 more bytes; returns the digest."""
    relink(layout, entry=lambda e: e.update(size=e["size"] + 100))
    return str(json.loads((layout / "index.json").read_bytes())["manifests"][0]["digest"])


@pytest.fixture
def lying_layout(layout: Path, tmp_path: Path) -> tuple[Path, str]:
    copy = tmp_path / "lying"
    shutil.copytree(layout, copy)
    return copy, lie_root_size(copy)


def tarred(directory: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tf:
        tf.add(directory, arcname=".")
    return dest


@pytest.mark.parametrize("transport", ["oci", "oci-archive", "docker-archive"])
def test_root_descriptor_size_must_match(
    lying_layout: tuple[Path, str], transport: str, cache: Cache, tmp_path: Path
) -> None:
    path, digest = lying_layout
    where = path if transport == "oci" else tarred(path, tmp_path / "image.tar")
    ref = f"{transport}:{where}" + (":latest" if transport != "docker-archive" else "")
    with pytest.raises(DigestError, match=f"manifest {digest}: size \\d+ does not match"):
        open_image(ref, cache, SourceOptions(Platform()))


def lying_index(store: Store, delta: int) -> str:
    """Tag `index` names the sample's manifest with a size off by `delta` (digest right)."""
    digest = store.tags["latest"]
    media_type, data = store.manifests[digest]
    config = json.loads(store.blobs[json.loads(data)["config"]["digest"]])
    entry = {
        "mediaType": media_type,
        "digest": digest,
        "size": len(data) + delta,
        "platform": {"os": config["os"], "architecture": config["architecture"]},
    }
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}).encode()
    store.put_manifest("index", OCI_INDEX, index)
    return digest


@pytest.mark.parametrize("delta", [-10, 10])
def test_registry_descriptor_sizes_must_match(store: Store, cache: Cache, delta: int) -> None:
    digest = lying_index(store, delta)
    with evil_server() as evil:
        serve_registry(evil, REPO, store)
        with pytest.raises(DigestError, match=f"manifest {digest}: size"):
            open_image(f"{evil.address}/{REPO}:index", cache, SourceOptions(Platform()))


def test_registry_layer_size_must_match(store: Store, cache: Cache) -> None:
    digest = store.tags["latest"]
    media_type, data = store.manifests[digest]
    man = json.loads(data)
    layer = man["layers"][0]["digest"]
    man["layers"][0]["size"] += 10
    store.put_manifest("bigger", media_type, json.dumps(man).encode())
    with evil_server() as evil:
        serve_registry(evil, REPO, store)
        image = open_image(f"{evil.address}/{REPO}:bigger", cache, SourceOptions(Platform()))
        with pytest.raises(DigestError, match=f"layer {layer}: size \\d+ does not match"):
            fetch_layers(image, cache)


# -- answers of the wrong JSON type ---------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        [],
        "token",
        {"token": 5},
        {"token": ""},
        {"access_token": ["a"]},
        {"token": "a\r\nX-Evil: 1"},
    ],
    ids=["list", "string", "number", "empty", "list-token", "header-injection"],
)
def test_token_answer_of_the_wrong_type(
    hostile: EvilServer, store: Store, tmp_path: Path, answer: object
) -> None:
    hostile.on("GET", r"/token\?.*", send_json(answer))
    bearer_registry(hostile, store, f"{hostile.url}/token", "t")
    r, _ = inspect(tmp_path, f"{hostile.address}/{REPO}:latest", {})
    assert one_line(r).startswith(f"token for {hostile.address}: {hostile.address} sent ")


@pytest.mark.parametrize(
    "answer", [[], {"tags": "abc"}, {"tags": [1, 2]}, {"tags": {"a": 1}}, "tags"]
)
def test_tag_list_of_the_wrong_type(answer: object) -> None:
    with evil_server() as evil:
        evil.on("GET", rf"/v2/{REPO}/tags/list", send_json(answer))
        with pytest.raises(
            SourceError, match=f"tags of {evil.address}/{REPO}: not a JSON tag list"
        ):
            RegistryClient(evil.address).list_tags(REPO)


def test_descriptor_fields_of_the_wrong_type(store: Store, tmp_path: Path) -> None:
    digest = store.tags["latest"]
    media_type, data = store.manifests[digest]
    man = json.loads(data)
    man["layers"][0]["annotations"] = "not an object"
    store.put_manifest("odd", media_type, json.dumps(man).encode())
    with evil_server() as evil:
        serve_registry(evil, REPO, store)
        r, _ = inspect(tmp_path, f"{evil.address}/{REPO}:odd", {})
    assert "layers[0]: descriptor has invalid annotations" in one_line(r)


# -- fail fast, retry what is transient -------------------------------------------------------


def test_unknown_host_fails_at_once(tmp_path: Path) -> None:
    r, elapsed = inspect(tmp_path, "registry.example.invalid/x/y:z", {})
    assert one_line(r) == (
        "manifest registry.example.invalid/x/y:z: cannot resolve registry.example.invalid"
    )
    assert elapsed < FAST


def test_refused_connection_fails_at_once(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    r, elapsed = inspect(tmp_path, f"{address}/x/y:z", {})
    assert one_line(r) == f"manifest {address}/x/y:z: {address} refused the connection"
    assert elapsed < FAST


def flaky(times: int, then: Reply) -> Reply:
    left = [times]

    def reply(h: Handler, m: re.Match[str]) -> None:
        if left[0] > 0:
            left[0] -= 1
            send(503, b"busy")(h, m)
        else:
            then(h, m)

    return reply


@pytest.mark.slow  # seconds of retries and timeouts: full run only
def test_transient_errors_are_retried_with_a_line_each(store: Store, tmp_path: Path) -> None:
    with evil_server() as evil:
        serve_registry(evil, REPO, store, lambda reply: flaky(2, reply))
        r, _ = inspect(tmp_path, f"{evil.address}/{REPO}:latest", {})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) >= 2
    assert all(
        re.fullmatch(r"vmimg: .*: 503 Service Unavailable; retry \d of \d in [\d.]+ s", x)
        for x in lines
    ), lines


# -- TLS as skopeo spells it ------------------------------------------------------------------


@pytest.fixture
def outside() -> str:
    address = outside_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    return address


@pytest.mark.slow
def test_plain_http_registry_spoken_to_over_https_gets_a_hint(
    store: Store, outside: str, tmp_path: Path
) -> None:
    with evil_server(outside) as evil:
        serve_registry(evil, REPO, store)
        ref = f"{evil.address}/{REPO}:latest"
        r, elapsed = inspect(tmp_path, ref, {})
        line = one_line(r)
        assert line == (
            f"manifest {ref}: {evil.address} answered in plain http, not TLS: for a plain-http "
            f"registry pass --tls-verify=false or --insecure-registry {evil.address}"
        )
        assert elapsed < FAST
        for flag in ("--tls-verify=false", f"--insecure-registry={evil.address}"):
            r, _ = inspect(tmp_path, ref, {}, flag)
            assert r.returncode == 0, (flag, r.stderr)


@pytest.mark.slow
def test_tls_verify_false_accepts_an_unknown_certificate(
    store: Store, outside: str, tmp_path: Path
) -> None:
    from tests.hostile.evil_registry import self_signed

    with evil_server(outside, tls=self_signed(tmp_path, outside)) as evil:
        serve_registry(evil, REPO, store)
        ref = f"{evil.address}/{REPO}:latest"
        r, _ = inspect(tmp_path, ref, {})
        line = one_line(r)
        assert "certificate" in line and "--ca-cert" in line and "--tls-verify=false" in line
        r, _ = inspect(tmp_path, ref, {}, "--tls-verify=false")
        assert r.returncode == 0, r.stderr
        r, _ = inspect(tmp_path, ref, {}, "--ca-cert", str(tmp_path / "evil-cert.pem"))
        assert r.returncode == 0, r.stderr


def test_https_redirect_to_plain_http_elsewhere_is_refused(
    store: Store, outside: str, other: EvilServer, tmp_path: Path
) -> None:
    from tests.hostile.evil_registry import self_signed

    with evil_server(outside, tls=self_signed(tmp_path, outside)) as evil:
        serve_registry(evil, REPO, store)
        remote = f"http://{outside}:{free_port()}/blob"
        evil.on("GET", rf"/v2/{REPO}/blobs/.*", redirect(lambda m: remote))
        r = run_vmimg(
            tmp_path / "w", "rootfs", f"{evil.address}/{REPO}:latest", "-o", str(tmp_path / "o"),
            "--ca-cert", str(tmp_path / "evil-cert.pem"),
        )  # fmt: skip
    assert r.returncode == 4, r.stderr
    assert f"{remote} is plain http" in r.stderr


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-http"])
def test_tls_verify_false_tries_tls_first_even_on_loopback(
    store: Store, tmp_path: Path, tls: bool
) -> None:
    """As skopeo: https first (certificate unchecked), plain http if the registry answers so."""
    from tests.hostile.evil_registry import self_signed

    with evil_server(tls=self_signed(tmp_path, "127.0.0.1") if tls else None) as evil:
        serve_registry(evil, REPO, store)
        r, _ = inspect(tmp_path, f"{evil.address}/{REPO}:latest", {}, "--tls-verify=false")
    assert r.returncode == 0, r.stderr
