"""A registry with TLS (our own CA) and htpasswd auth: credentials from the auth files podman
and skopeo read, Docker's config and its helpers, and --creds; --tls-verify=false."""

from __future__ import annotations

import base64
import json
import os
import pty
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, need, start_registry
from tests.hostile.cli import confined_command, confined_env, run_vmimg
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


@pytest.mark.slow
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
    with pytest.raises(SourceError, match=r"TLS certificate is not trusted .*--ca-cert FILE"):
        open_image(f"docker://{host}/auth/sample:v1", cache, SourceOptions(Platform()))


@pytest.mark.slow  # seconds of retries and timeouts: full run only
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


# -- where credentials come from, as podman and skopeo look for them ----------------------


def auth_json(path: Path, host: str, user: str, password: str) -> Path:
    """A containers-auth.json(5) file with one entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


@pytest.fixture(scope="module")
def pushed_ref(sample_ref: str, secure_registry: tuple[str, str]) -> str:
    host, cert = secure_registry
    Path(cert).with_name("ca.crt").write_bytes(Path(cert).read_bytes())
    return push(sample_ref, host, cert)


def inspect_cli(
    work: Path, ref: str, cert: str | None, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    ca = ["--ca-cert", cert] if cert else []
    return run_vmimg(work, "inspect", ref, "--json", *ca, *extra, env=env)


AUTH_SOURCES = ["--authfile", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
                "~/.config", "DOCKER_CONFIG"]  # fmt: skip


@pytest.mark.parametrize(
    "source",  # each place once in the slow tier; the first one in the fast tier too
    [AUTH_SOURCES[0], *(pytest.param(s, marks=pytest.mark.slow) for s in AUTH_SOURCES[1:])],
)
def test_credentials_are_found_where_podman_and_skopeo_look(
    pushed_ref: str, secure_registry: tuple[str, str], tmp_path: Path, source: str
) -> None:
    host, cert = secure_registry
    work = tmp_path / "w"
    extra: list[str] = []
    env: dict[str, str] = {}
    files = {
        "--authfile": tmp_path / "given.json",
        "REGISTRY_AUTH_FILE": tmp_path / "env.json",
        "XDG_RUNTIME_DIR": tmp_path / "run" / "containers" / "auth.json",
        "XDG_CONFIG_HOME": tmp_path / "config" / "containers" / "auth.json",
        "~/.config": work / "home" / ".config" / "containers" / "auth.json",
    }
    if source == "DOCKER_CONFIG":
        env["DOCKER_CONFIG"] = docker_config(tmp_path, host, USER, PASSWORD)
    else:
        path = auth_json(files[source], host, USER, PASSWORD)
        if source == "--authfile":
            extra = ["--authfile", str(path)]
        elif not source.startswith("~"):
            env[source] = str(path.parent.parent) if source.startswith("XDG") else str(path)
    assert inspect_cli(work, pushed_ref, cert, *extra, env=env).returncode == 0
    if source != "--authfile":  # and nothing else does it: without the file, a 401
        shutil.rmtree(work / "home")
        for f in files.values():
            f.unlink(missing_ok=True)
        env.pop("DOCKER_CONFIG", None)
        r = inspect_cli(work, pushed_ref, cert, env=env)
        assert r.returncode == 4 and "requires credentials" in r.stdout


@pytest.mark.slow
def test_the_first_file_with_an_entry_wins(
    pushed_ref: str, secure_registry: tuple[str, str], tmp_path: Path
) -> None:
    host, cert = secure_registry
    work = tmp_path / "w"
    run_dir = tmp_path / "run"
    runtime = auth_json(run_dir / "containers" / "auth.json", host, USER, "wrong")
    home_file = work / "home" / ".config" / "containers" / "auth.json"
    auth_json(home_file, host, USER, PASSWORD)
    env = {"XDG_RUNTIME_DIR": str(run_dir)}
    # The runtime file is read first: its wrong password is the one used.
    r = inspect_cli(work, pushed_ref, cert, env=env)
    assert r.returncode == 4 and "401" in r.stdout
    # --authfile and $REGISTRY_AUTH_FILE replace the runtime file.
    right = auth_json(tmp_path / "right.json", host, USER, PASSWORD)
    assert inspect_cli(work, pushed_ref, cert, "--authfile", str(right), env=env).returncode == 0
    env_file = {**env, "REGISTRY_AUTH_FILE": str(right)}
    assert inspect_cli(work, pushed_ref, cert, env=env_file).returncode == 0
    # A file without an entry for the host does not stop the search.
    auth_json(runtime, "elsewhere.example:5000", USER, "wrong")
    assert inspect_cli(work, pushed_ref, cert, env=env).returncode == 0


@pytest.mark.slow
def test_creds_option(pushed_ref: str, secure_registry: tuple[str, str], tmp_path: Path) -> None:
    _host, cert = secure_registry
    work = tmp_path / "w"
    r = inspect_cli(work, pushed_ref, cert, "--creds", f"{USER}:{PASSWORD}")
    assert r.returncode == 0, r.stdout
    r = inspect_cli(work, pushed_ref, cert, "--creds", f"{USER}:wrong")
    assert r.returncode == 4 and "the registry rejected the credentials" in r.stdout
    r = inspect_cli(work, pushed_ref, cert, "--creds", USER)  # no terminal to ask on
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"] == (
        "--creds USER without a password, and no terminal to ask it on: "
        "use --creds USER:PASSWORD or an auth file"
    )


def test_creds_without_password_asks_at_a_terminal(
    pushed_ref: str, secure_registry: tuple[str, str], tmp_path: Path
) -> None:
    host, cert = secure_registry
    work = tmp_path / "w"
    env = confined_env(work)  # (makes work/cwd and work/home)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        confined_command("inspect", pushed_ref, "--json", "--ca-cert", cert, "--creds", USER),
        cwd=work / "cwd",
        env=env,
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # no controlling terminal but the pty on stdin
    )
    os.close(slave)
    assert proc.stderr is not None
    prompt = b""
    while b": " not in prompt:  # the answer must follow the prompt: getpass flushes input
        more = os.read(proc.stderr.fileno(), 4096)
        assert more, prompt
        prompt += more
    os.write(master, f"{PASSWORD}\n".encode())
    out_bytes, err_bytes = proc.communicate(timeout=120)
    os.close(master)
    out, err = out_bytes.decode(), (prompt + err_bytes).decode()
    assert proc.returncode == 0, err
    assert f"Password for {USER} at {host}: " in err
    assert PASSWORD not in out + err


def test_creds_are_for_one_registry(tmp_path: Path) -> None:
    r = run_vmimg(
        tmp_path / "w", "build", "docker://one.example/a:1", "-o", str(tmp_path / "b"),
        "--push", "two.example/b:1", "--creds", "u:p", "--json",
    )  # fmt: skip
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"] == (
        "--creds is for one registry, but this command talks to one.example and two.example:"
        " keep the credentials in an auth file instead (--authfile)"
    )


def test_tls_verify_false_skips_the_certificate_check(
    pushed_ref: str, secure_registry: tuple[str, str], tmp_path: Path
) -> None:
    work = tmp_path / "w"
    creds = ["--creds", f"{USER}:{PASSWORD}"]
    r = inspect_cli(work, pushed_ref, None, *creds)
    assert r.returncode == 4 and "TLS certificate is not trusted" in r.stdout
    assert inspect_cli(work, pushed_ref, None, "--tls-verify=false", *creds).returncode == 0
