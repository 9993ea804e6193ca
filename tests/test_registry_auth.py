"""A registry with TLS (our own CA) and htpasswd auth: credentials from the Docker config."""

from __future__ import annotations

import base64
import json
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, need, start_registry
from vmimg.errors import AuthError, SourceError
from vmimg.image.cache import Cache
from vmimg.image.fetch import fetch_layers
from vmimg.image.oci import Platform
from vmimg.image.sources import SourceOptions, open_image

USER, PASSWORD = "ci-user", "s3cret-pass"
AUTH_CONFIG = """\
  tls:
    certificate: {cert}
    key: {key}
auth:
  htpasswd:
    realm: vmimg-test
    path: {htpasswd}
"""


def bcrypt_hash(password: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))


@pytest.fixture(scope="module")
def secure_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Yields (HOST:PORT, CA certificate path) of a TLS + htpasswd registry."""
    root = tmp_path_factory.mktemp("secure-registry")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        [
            need("openssl"),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    htpasswd = root / "htpasswd"
    htpasswd.write_text(f"{USER}:{bcrypt_hash(PASSWORD)}\n")
    port = free_port()
    extra = AUTH_CONFIG.format(cert=cert, key=key, htpasswd=htpasswd)
    proc = start_registry(str(root), port, extra)
    yield f"127.0.0.1:{port}", str(cert)
    proc.terminate()
    proc.wait(10)


def docker_config(tmp_path: Path, host: str, user: str, password: str) -> str:
    d = tmp_path / "docker"
    d.mkdir(exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return str(d)


def push(sample_ref: str, host: str, cert: str) -> str:
    dest = f"docker://{host}/auth/sample:v1"
    subprocess.run(
        [
            need("skopeo"),
            "copy",
            "--quiet",
            "--dest-cert-dir",
            str(Path(cert).parent),
            "--dest-creds",
            f"{USER}:{PASSWORD}",
            sample_ref,
            dest,
        ],
        check=True,
        capture_output=True,
    )
    return dest


def test_basic_auth_over_tls_with_docker_config(
    sample_ref: str,
    secure_registry: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, cert = secure_registry
    # skopeo wants the CA as NAME.crt in a directory
    Path(cert).with_name("ca.crt").write_bytes(Path(cert).read_bytes())
    ref = push(sample_ref, host, cert)
    monkeypatch.setenv("DOCKER_CONFIG", docker_config(tmp_path, host, USER, PASSWORD))
    cache = Cache.open(str(tmp_path / "c"))
    opts = SourceOptions(Platform(), ca_cert=cert)
    image = open_image(ref, cache, opts)
    assert len(fetch_layers(image, cache)) == 1


def test_wrong_credentials_are_a_clear_error(
    secure_registry: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, cert = secure_registry
    monkeypatch.setenv("DOCKER_CONFIG", docker_config(tmp_path, host, USER, "wrong"))
    cache = Cache.open(str(tmp_path / "c"))
    with pytest.raises(AuthError, match=r"manifest 127\.0\.0\.1:\d+/auth/sample:v1: 401") as err:
        open_image(
            f"docker://{host}/auth/sample:v1", cache, SourceOptions(Platform(), ca_cert=cert)
        )
    assert "wrong" not in str(err.value) and PASSWORD not in str(err.value)


def test_no_credentials_and_untrusted_certificate(
    secure_registry: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, cert = secure_registry
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty"))
    cache = Cache.open(str(tmp_path / "c"))
    with pytest.raises(AuthError, match="requires credentials"):
        open_image(
            f"docker://{host}/auth/sample:v1", cache, SourceOptions(Platform(), ca_cert=cert)
        )
    with pytest.raises(SourceError, match="TLS error"):
        open_image(f"docker://{host}/auth/sample:v1", cache, SourceOptions(Platform()))


def test_credential_helper(
    sample_ref: str,
    secure_registry: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, cert = secure_registry
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-vmimgtest"
    helper.write_text(
        "#!/bin/sh\nread host\n"
        f'echo "{{\\"ServerURL\\":\\"$host\\",\\"Username\\":\\"{USER}\\",'
        f'\\"Secret\\":\\"{PASSWORD}\\"}}"\n'
    )
    helper.chmod(0o755)
    d = tmp_path / "docker"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"credHelpers": {host: "vmimgtest"}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    Path(cert).with_name("ca.crt").write_bytes(Path(cert).read_bytes())
    ref = push(sample_ref, host, cert)
    cache = Cache.open(str(tmp_path / "c"))
    image = open_image(ref, cache, SourceOptions(Platform(), ca_cert=cert))
    assert image.digest.startswith("sha256:")
