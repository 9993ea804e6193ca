"""Credentials never show: not in errors, not in --json output, not in any line printed.

Uses the TLS + htpasswd registry of tests/test_registry_auth.py through the real CLI.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.hostile.cli import run_vmimg
from tests.test_registry_auth import USER, docker_config, push, secure_registry

__all__ = ["secure_registry"]  # the fixture, used by name below

WRONG = "wrong-Pa55-w0rd-xyzzy"


def _secrets(user: str, password: str) -> list[str]:
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    return [password, basic]


def _assert_hidden(texts: list[str], secrets: list[str]) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text


@pytest.mark.parametrize("as_json", [False, True])
def test_wrong_password_never_printed(
    secure_registry: tuple[str, str], tmp_path: Path, as_json: bool
) -> None:
    host, cert = secure_registry
    env = {"DOCKER_CONFIG": docker_config(tmp_path, host, USER, WRONG)}
    args = ["rootfs", f"docker://{host}/auth/sample:v1", "-o", str(tmp_path / "o.tar")]
    args += ["--ca-cert", cert] + (["--json"] if as_json else [])
    r = run_vmimg(tmp_path / "w", *args, env=env)
    assert r.returncode == 4
    assert "401" in (r.stdout if as_json else r.stderr)
    _assert_hidden([r.stdout, r.stderr], _secrets(USER, WRONG))


@pytest.mark.slow
def test_right_password_never_printed(
    sample_ref: str, secure_registry: tuple[str, str], tmp_path: Path
) -> None:
    from tests.test_registry_auth import PASSWORD

    host, cert = secure_registry
    Path(cert).with_name("ca.crt").write_bytes(Path(cert).read_bytes())
    ref = push(sample_ref, host, cert)
    env = {"DOCKER_CONFIG": docker_config(tmp_path, host, USER, PASSWORD)}
    runs = [
        ["rootfs", ref, "-o", str(tmp_path / "o.tar"), "--json", "--ca-cert", cert],
        ["inspect", ref, "--json", "--ca-cert", cert],
        ["rootfs", ref.replace(":v1", ":missing"), "-o", str(tmp_path / "x"), "--ca-cert", cert],
        ["inspect", ref.replace("/auth/", "/other/"), "--json", "--ca-cert", cert],
    ]
    codes = []
    for args in runs:
        r = run_vmimg(tmp_path / "w", *args, env=env)
        codes.append(r.returncode)
        _assert_hidden([r.stdout, r.stderr], _secrets(USER, PASSWORD))
    assert codes == [0, 0, 3, 3]  # a missing tag or repository is the reference's fault


@pytest.mark.parametrize(
    ("how", "password"),
    [
        pytest.param("docker-config", WRONG, marks=pytest.mark.slow),
        pytest.param("docker-config", "right", marks=pytest.mark.slow),
        ("creds", WRONG),
        pytest.param("creds", "right", marks=pytest.mark.slow),
    ],
)
def test_verbose_log_never_shows_credentials(
    sample_ref: str, secure_registry: tuple[str, str], tmp_path: Path, how: str, password: str
) -> None:
    from tests.test_registry_auth import PASSWORD

    host, cert = secure_registry
    Path(cert).with_name("ca.crt").write_bytes(Path(cert).read_bytes())
    ref = push(sample_ref, host, cert)
    password = PASSWORD if password == "right" else password
    env, extra = {}, ["--creds", f"{USER}:{password}"]
    if how == "docker-config":
        env, extra = {"DOCKER_CONFIG": docker_config(tmp_path, host, USER, password)}, []
    args = ["-v", "inspect", ref, "--json", "--ca-cert", cert, *extra]
    r = run_vmimg(tmp_path / "w", *args, env=env)
    assert r.returncode == (0 if password == PASSWORD else 4)
    assert f"vmimg: GET https://{host}/v2/auth/sample/manifests/v1: 401" in r.stderr.splitlines()
    _assert_hidden([r.stdout, r.stderr], _secrets(USER, password))
