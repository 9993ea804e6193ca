"""Every command shown in README.md and docs/*.md, run for real (issue 21: "every command in
README and docs/ run by a test, so the docs cannot drift").

What counts as a command: the lines of code blocks (indented four spaces, or fenced with no
language or sh/shell/bash/console) whose first line starts with a program, a `./` or
`.venv/bin/` path, a shell builtin or `NAME=value`; lines ending in `\\` are joined. Fenced
json, python and yaml blocks are not commands: the CI YAML in docs/ci.md is configuration
GitHub and GitLab run (test_docs.py checks it; its three vmimg lines are docs/ci.md's first
block, which runs here).

How they run: each doc's commands in document order, one `bash -c` each, in a scratch
directory of the doc's own, with the working directory and the environment carried from one
command to the next as a terminal carries them. Each must exit 0, or the code its comment
shows as `(exit N)`. A command that cannot run fails the test: nothing new is skipped.

The world the docs assume is made first (World): the stand-in "app" image (busybox, a user
`app`, and `serve`, which serves a site mounted at /srv and otherwise greets and exits) in the
tests' docker-registry, in the podman service and as files; the examples' images; and the
guest kernels, hard-linked into each doc's own cache so that nothing is built for minutes.
SUBSTITUTIONS maps the docs' placeholders to that world, MODES says how commands that serve
or need a terminal run, and ALLOWED lists, with the reason, the few that cannot run here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import layerkit as L
from tests.conftest import free_port, need
from tests.e2e.images import Podman
from vmimg.guest.kernel import find_or_build_kernel
from vmimg.image.cache import Cache
from vmimg.image.oci import parse_platform
from vmimg.image.ocilayout import ImageSpec, LayerSpec, write_layout
from vmimg.image.sample import busybox_for, busybox_layer

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = ROOT / ".venv" / "bin"
USER_CACHE = Path(os.environ.get("VMIMG_CACHE") or Path.home() / ".cache" / "vmimg")

SHELL_LANGS = {"", "sh", "shell", "bash", "console"}
SHELL_WORDS = {"cd", "export", "eval", "alias", "source"}
# Programs the docs show that this machine does not have (they are still commands).
ABSENT_PROGRAMS = {"firecracker", "zsh", "fish"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
EXPECTED_EXIT = re.compile(r"\(exit (\d+)\)")

COMMAND_TIMEOUT = 1800.0  # seconds; TCG boots on a loaded machine, podman builds with apt
READY_TIMEOUT = 300.0
STOP_TIMEOUT = 120.0
POLL_SECONDS = 0.2
TTY_INPUT = "echo DOCS-TTY-$((6*7)); exit\n"
TTY_REPLY = b"DOCS-TTY-42"  # what the shell prints, never the echo of what was typed
TTY_RETYPE = 5.0  # seconds
SHORT_FUZZ_SECONDS = 5


# --- extraction ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DocCommand:
    doc: str  # relative to the checkout
    line: int
    text: str  # as shown, continuation lines joined, comment kept

    @property
    def expected_exit(self) -> int:
        m = EXPECTED_EXIT.search(self.text)
        return int(m[1]) if m else 0

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def code_blocks(text: str) -> list[list[tuple[int, str]]]:
    """Shell-like code blocks: runs of indented lines, and fenced blocks of a shell language."""
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if fence is None:
                fence = line[3:].strip()
            else:
                if fence in SHELL_LANGS and current:
                    blocks.append(current)
                fence, current = None, []
            continue
        if fence is not None:
            current.append((number, line))
        elif line.startswith("    ") and line.strip():
            current.append((number, line.strip()))
        elif current and not line.strip():
            continue  # a blank line inside an indented block
        elif current:
            blocks.append(current)
            current = []
    if current and fence is None:
        blocks.append(current)
    return blocks


def is_command(line: str) -> bool:
    words = line.split()
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return False
    first = words[0]
    return (
        first.startswith(("./", ".venv/bin/"))
        or first in SHELL_WORDS
        or first in ABSENT_PROGRAMS
        or shutil.which(first, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        is not None
    )


def doc_commands(doc: Path) -> list[DocCommand]:
    """The commands of one doc: the blocks whose first line is a command, line by line."""
    rel = str(doc.relative_to(ROOT))
    out: list[DocCommand] = []
    for block in code_blocks(doc.read_text()):
        if not is_command(block[0][1].strip()):
            continue
        pending, start = "", 0
        for number, raw in block:
            line = raw.strip()
            if not pending:
                start = number
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            text = (pending + line).strip()
            pending = ""
            if text and not text.startswith("#"):
                out.append(DocCommand(rel, start, text))
    return out


def all_commands() -> list[DocCommand]:
    return [c for doc in DOCS for c in doc_commands(doc)]


# Code blocks that are not commands, by doc and first word: each is named, so that a block
# whose program this machine lacks is noticed (it would land here unlisted) rather than
# silently left out.
NOT_COMMANDS: dict[tuple[str, str], str] = {
    ("docs/agent.md", "vmimg-agent-config"): "the agent's config file",
    ("docs/agent.md", "<path>"): "the manifest's line format",
    ("docs/agent.md", '"\\n@@vmimg@@'): "the marker line format",
    ("docs/agent.md", "@@vmimg@@"): "a console marker line",
    ("docs/agent.md", "watcher"): "prose: a list item's continuation lines",
    ("docs/agent.md", "up,"): "prose: a list item's continuation lines",
    ("docs/agent.md", "process"): "prose: a list item's continuation lines",
    ("docs/agent.md", "SIGTERM,"): "prose: a list item's continuation lines",
    ("docs/agent.md", "disks"): "prose: a list item's continuation lines",
    ("docs/architecture.md", "SOURCE"): "a diagram",
    ("docs/architecture.md", "$VMIMG_CACHE"): "the cache's layout",
    ("docs/artifact.md", "vmimg:"): "an error message",
    ("docs/bundle.md", "BUNDLE/"): "the bundle's layout",
    ("docs/bundle.md", 'dm-mod.create="vroot,,0,ro,0'): "a kernel command line",
    ("docs/bundle.md", "0"): "a diagram",
    ("docs/erofs.md", "block"): "the image's layout",
    ("docs/kernel.md", "$VMIMG_CACHE/kernels/"): "the kernel cache's layout",
    ("docs/usage.md", "vmimg:"): "an error message",
}


def non_command_blocks() -> set[tuple[str, str]]:
    found = set()
    for doc in DOCS:
        for block in code_blocks(doc.read_text()):
            first = block[0][1].strip()
            if not is_command(first):
                found.add((str(doc.relative_to(ROOT)), first.split()[0]))
    return found


# --- what cannot run here, with the reason ------------------------------------------------

SELF_IMAGE = (
    "builds or runs vmimg's own toolchain image (Dockerfile: Debian packages and the guest "
    "kernel, many minutes); tests/e2e/test_self_image.py builds that Dockerfile with podman "
    "and runs vmimg from it"
)
TAP = (
    "changes the host's network (tap device, IP forwarding, NAT) for Firecracker or Cloud "
    "Hypervisor, which this machine lacks (no usable KVM); on a shared machine it must not"
)
ALLOWED: dict[tuple[str, str], str] = {
    ("README.md", "./scripts/test"): "runs the whole suite, this test included: it would recurse",
    ("README.md", "./scripts/test                       # everything CI runs"): (
        "runs the whole suite, this test included: it would recurse"
    ),
    ("README.md", "docker build -t vmimg ."): SELF_IMAGE,
    (
        "README.md",
        'docker run --rm -v "$PWD:/work" -w /work vmimg build docker://REGISTRY/app:1.0 -o app.vm',
    ): SELF_IMAGE,
    ("docs/quickstart.md", "docker build -t vmimg ."): SELF_IMAGE,
    (
        "docs/quickstart.md",
        'alias vmimg=\'docker run --rm -it --user "$(id -u):$(id -g)" '
        '--device /dev/kvm --group-add "$(stat -c %g /dev/kvm)" '
        '-v "$PWD:$PWD" -w "$PWD" vmimg\'',
    ): SELF_IMAGE + "; it also needs /dev/kvm",
    ("docs/quickstart.md", 'eval "$(_VMIMG_COMPLETE=zsh_source vmimg)"'): (
        "zsh is not installed here; test_docs.py checks the zsh script vmimg prints"
    ),
    (
        "docs/ci.md",
        "podman build --isolation chroot --network host --pull=never -t vmimg .   "
        "# or: docker build -t vmimg .",
    ): SELF_IMAGE,
    (
        "docs/arm64.md",
        "qemu-system-aarch64 -M virt,gic-version=max -accel tcg -cpu max,pauth-impdef=on "
        "-m 256 -smp 1 -nodefaults -no-user-config -nographic -no-reboot -sandbox ... "
        "-kernel kernel -append 'console=ttyAMA0 quiet panic=-1 root=/dev/vda ...' "
        "-serial stdio -device virtio-rng-device "
        "-drive id=root,...,if=none -device virtio-blk-device,drive=root "
        "-netdev user,id=net0 -device virtio-net-device,netdev=net0",
    ): (
        "an excerpt of the launch command vmimg writes, elided with '...'; `vmimg verify` "
        "and `vmimg run` of app-arm64.vm in the same doc boot the whole one"
    ),
    ("docs/run.md", 'ip tuntap add dev vmimg0 mode tap user "$USER"'): TAP,
    ("docs/run.md", "ip addr add 172.16.0.1/24 dev vmimg0"): TAP,
    ("docs/run.md", "ip link set vmimg0 up"): TAP,
    ("docs/run.md", "sysctl -w net.ipv4.ip_forward=1"): TAP,
    ("docs/run.md", "iptables -t nat -A POSTROUTING -s 172.16.0.0/24 ! -o vmimg0 -j MASQUERADE"): (
        TAP
    ),
    ("docs/run.md", "firecracker --no-api --config-file launch/firecracker.json"): (
        "Firecracker is not installed and needs KVM, which does not work for guests here"
    ),
    ("docs/run.md", "./launch/cloud-hypervisor.sh"): (
        "Cloud Hypervisor is not installed and needs KVM, which does not work for guests here"
    ),
}


# --- the docs' placeholders -> the world --------------------------------------------------


@dataclass(frozen=True)
class Sub:
    """Replace `pattern` (a regex) with `replacement` (str.format'ed with the World's fields)
    in the commands of `doc` (any doc when "*"), for the reason given."""

    doc: str
    pattern: str
    replacement: str
    reason: str


SUBSTITUTIONS: list[Sub] = [
    Sub("*", r"registry\.example:5000", "{registry}", "the tests' docker-registry on loopback"),
    Sub("docs/ci.md", r"\bSOURCE\b", "oci:./layout:1.0", "any image source: the app layout"),
    Sub("docs/ci.md", r"REGISTRY/REPOSITORY:TAG", "{registry}/ci/vm:1", "the local registry"),
    Sub(
        "docs/artifact.md",
        r"HOST/REPO:TAG --from-image -o DIR",
        "{registry}/app:1.0 --from-image -o from-image.vm",
        "the image app.vm was built from; its bundle was pushed beside it by the first line",
    ),
    Sub(
        "docs/artifact.md",
        r"kernel (push KEY|pull) HOST/REPO:TAG",
        r"kernel \1 {registry}/kernels:x86_64",
        "a kernel repository in the local registry",
    ),
    Sub(
        "docs/artifact.md",
        r"HOST/REPO:TAG",
        "{registry}/app:vm",
        "the bundle's tag, in the image's repository (so --from-image finds it)",
    ),
    Sub("docs/artifact.md", r"\bBUNDLE\b", "app.vm", "the app bundle built from app:1.0"),
    Sub("docs/artifact.md", r"\bDIR\b", "pulled.vm", "a new directory"),
    Sub("docs/artifact.md", r"\bKEY\b", "{kernel_key}", "the cached x86_64 kernel's key"),
    Sub("*", r"-p 8080:", "-p {port}:", "a free host port (8080 may be taken on this machine)"),
    Sub("*", r"127\.0\.0\.1:8080", "127.0.0.1:{port}", "the same free host port"),
    Sub(
        "*",
        r"^podman build ",
        "podman build --isolation chroot --network host ",
        "docs/workflow.md's own advice where `podman run` does not work (as here)",
    ),
    Sub(
        "*",
        r"(^|&& )podman (?!--storage-driver)",
        r"\1{podman} ",
        "podman on the storage of the tests' podman service",
    ),
    Sub(
        "docs/workflow.md",
        r"unix:///run/podman-api\.sock",
        "unix://{scratch}/podman-api.sock",
        "a socket of the test's own, not the machine's /run",
    ),
    Sub(
        "docs/workflow.md",
        r"debootstrap --variant=minbase bookworm rootfs \S+",
        "cp -a {bench}/debootstrap-minbase rootfs",
        "the machine's minbase tree, made once by this debootstrap command (bench/fixtures.py)",
    ),
    Sub(
        "docs/workflow.md",
        r"--pull=never \.\.\.$",
        "--pull=never -t localhost/http-service .",
        "the '...' is the build above, now from the imported base",
    ),
    Sub(
        "docs/bundle.md",
        r"--data-blocks=N --hash-offset=BYTES --salt=SALT_HEX "
        r"rootfs\.erofs rootfs\.erofs ROOT_HASH",
        "--data-blocks={data_blocks} --hash-offset={hash_offset} --salt={salt} "
        "app.vm/rootfs.erofs app.vm/rootfs.erofs {root_hash}",
        "the values app.vm's vm.json reports (rootfs.verity)",
    ),
    Sub(
        "*",
        r"FUZZ_SECONDS=600",
        f"FUZZ_SECONDS={SHORT_FUZZ_SECONDS}",
        "the same fuzz target for seconds, not ten minutes",
    ),
    Sub(
        "*",
        r"\.venv/bin/pytest ",
        ".venv/bin/pytest --collect-only -q -p no:cacheprovider ",
        "these run suites of this test suite (minutes, boots): collecting them proves the "
        "paths and options; ./scripts/test runs them for real",
    ),
    Sub(
        "docs/workflow.md",
        r"-m bench\.e2e ",
        "-m bench.e2e --help ",
        "the benchmark takes many minutes of builds and boots; the doc points at --help",
    ),
    Sub(
        "*",
        r"^(\./scripts/demo)",
        r"VMIMG_DEMO_DIR={scratch}/demo \1",
        "the demo's outputs in the scratch directory",
    ),
]


def substitutions_for(doc: str) -> list[Sub]:
    return [s for s in SUBSTITUTIONS if s.doc in ("*", doc)]


def synopsis_words(text: str) -> list[str] | None:
    """`vmimg CMD [OPTIONS] ARGS` (a usage line, cli.md and kernel.md): the command's words,
    or None when the line is no synopsis."""
    words = text.split()
    if words[0] != "vmimg" or not any(w.startswith("[") for w in words):
        return None
    path = []
    for word in words:
        if word.startswith("[") or word.isupper():
            break
        path.append(word)
    return path


def prepared(cmd: DocCommand, world: World) -> str:
    """The command as it runs: a synopsis becomes `--help`, placeholders become the world."""
    path = synopsis_words(cmd.text)
    if path is not None:
        return shlex.join([*path, "--help"])
    text = cmd.text
    values = world.values()
    for sub in substitutions_for(cmd.doc):
        text = re.sub(sub.pattern, sub.replacement.format(**values), text)
    return text


# --- how commands run: terminals and services ---------------------------------------------


@dataclass(frozen=True)
class Mode:
    """How a command that does not simply run and exit is run."""

    kind: str  # "tty": under a terminal; "serve": until ready, stopped after the next command;
    # "follow": in the background until a later command (`until`) has run
    ready: str = ""  # serve: "http" (the published port answers), "socket", or console text
    until: str = ""  # the later command after which it ends (serve: "" the next; END: none)
    stop_exit: int = 0  # the exit code after the stop (SIGTERM) or the follower's end


SIGTERM_EXIT = 128 + signal.SIGTERM
END = "(the end of the doc)"
MODES: list[tuple[str, str, Mode]] = [
    ("*", r"^vmimg (run|exec) -it ", Mode("tty")),
    ("docs/run.md", r"^vmimg logs -f web$", Mode("follow", until="vmimg stop web")),
    # The examples' services: http-service stops cleanly on SIGTERM; counter-service's busybox
    # httpd does not catch it (tests/e2e/test_examples.py checks the same codes).
    ("docs/workflow.md", r"^vmimg run http\.vm ", Mode("serve", "http", "", 0)),
    ("docs/workflow.md", r"^vmimg run counter\.vm ", Mode("serve", "http", "", SIGTERM_EXIT)),
    ("docs/workflow.md", r"^podman system service ", Mode("serve", "socket", END, 0)),
]


def mode_for(cmd: DocCommand) -> Mode | None:
    for doc, pattern, mode in MODES:
        if doc in ("*", cmd.doc) and re.search(pattern, cmd.text):
            return mode
    return None


# --- the world ----------------------------------------------------------------------------

SERVE = b"""#!/bin/sh
# The docs' "app": a web service when a site is mounted at /srv, else a greeting.
port=80
[ "$1" = --port ] && port=$2
if [ -f /srv/index.html ]; then
  echo "app: serving /srv on port $port"
  exec httpd -f -p "$port" -h /srv
fi
echo "app: hello as $(id -un), port $port, LOG_LEVEL=${LOG_LEVEL:-info}"
"""
APP_PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
APP_GROUP = b"root:x:0:\napp:x:1000:\n"
APP_UID = 1000
APP_APPLETS = ("httpd", "id", "sleep")  # beyond the sample's
APP_PLATFORMS = ("linux/amd64", "linux/arm64")
SITE_INDEX = "<h1>site from the host</h1>\n"


def app_layer() -> bytes:
    """What the app adds to busybox: the user `app`, `serve` and its applets, /srv."""
    return L.layer(
        L.file("etc/passwd", APP_PASSWD),
        L.file("etc/group", APP_GROUP),
        L.dir("home"),
        L.dir("home/app", uid=APP_UID, gid=APP_UID),
        L.dir("srv"),
        L.dir("usr/local/bin"),
        L.file("usr/local/bin/serve", SERVE, mode=0o755),
        *(L.symlink(f"bin/{applet}", "busybox") for applet in APP_APPLETS),
    )


def write_app_layout(root: Path) -> None:
    layer = app_layer()
    specs = []
    for text in APP_PLATFORMS:
        platform = parse_platform(text)
        busybox = busybox_for(platform, Cache.open(str(USER_CACHE)))
        specs.append(
            ImageSpec(
                layers=[LayerSpec(busybox_layer(busybox), "gzip"), LayerSpec(layer, "gzip")],
                config={
                    "Cmd": ["/usr/local/bin/serve"],
                    "Env": ["PATH=/usr/local/bin:/bin:/usr/bin"],
                    "WorkingDir": "/",
                },
                platform=platform,
            )
        )
    write_layout(str(root), {"1.0": specs})


@dataclass
class World:
    root: Path
    registry: str
    docker_host: str
    podman: Podman
    kernel_key: str
    files: Path  # what every scratch directory starts with
    app_bundle: Path
    extra: dict[str, str] = field(default_factory=dict)  # the running doc's port and scratch

    def values(self) -> dict[str, str]:
        """The fields SUBSTITUTIONS' replacements name."""
        verity = json.loads((self.app_bundle / "vm.json").read_text())["rootfs"]["verity"]
        return {
            **{k: str(verity[k]) for k in ("data_blocks", "hash_offset", "salt", "root_hash")},
            "registry": self.registry,
            "kernel_key": self.kernel_key,
            "podman": shlex.join(self.podman.base),
            "bench": str(Path(os.environ.get("VMIMG_BENCH_DIR") or "~/.cache/vmimg-bench")).replace(
                "~", str(Path.home())
            ),
            **self.extra,
        }


def kernel_cache(dest: Path) -> None:
    """The user's cached kernels, hard-linked into a fresh cache (never their sources)."""
    src = USER_CACHE / "kernels"
    for entry in src.iterdir():
        if (entry / "kernel.json").is_file():
            shutil.copytree(entry, dest / "kernels" / entry.name, copy_function=os.link)
    for stat in (src / "sources").glob("*.stat"):
        (dest / "kernels" / "sources").mkdir(parents=True, exist_ok=True)
        shutil.copy(stat, dest / "kernels" / "sources" / stat.name)


def vmimg_env(cache: Path, home: Path, docker_host: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}:/usr/sbin:/sbin",
        VMIMG_CACHE=str(cache),
        HOME=str(home),
        DOCKER_HOST=docker_host,
    )
    return env


@pytest.fixture(scope="module")
def world(registry: str, podman_socket: str, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("docs-world")
    podman = Podman(tuple(os.environ["VMIMG_TEST_PODMAN"].split()))
    files = root / "files"
    files.mkdir()
    layout = files / "layout"
    write_app_layout(layout)
    subprocess.run(
        [need("skopeo"), "copy", "--quiet", "--all", "--dest-tls-verify=false",
         f"oci:{layout}:1.0", f"docker://{registry}/app:1.0"],
        check=True, capture_output=True,
    )  # fmt: skip
    podman("pull", "--quiet", "--tls-verify=false", f"docker://{registry}/app:1.0")
    podman("tag", f"{registry}/app:1.0", "localhost/app:latest")
    podman("save", "--quiet", "--format", "docker-archive", "-o", str(files / "saved.tar"),
           "localhost/app:latest")  # fmt: skip
    shutil.copy(files / "saved.tar", files / "app.tar")
    podman.import_base()
    for example in ("counter-service", "oneshot-job"):
        podman.build_example(example)
    (files / "site").mkdir()
    (files / "site" / "index.html").write_text(SITE_INDEX)
    (files / "Dockerfile").write_text("FROM localhost/app:latest\nLABEL org.example.app=1\n")
    shutil.copytree(ROOT / "agent", files / "agent", ignore=shutil.ignore_patterns("build"))
    shutil.copytree(ROOT / "examples", files / "examples")
    (files / "home" / ".config" / "fish" / "completions").mkdir(parents=True)
    cache = root / "cache"
    kernel_cache(cache)
    app_bundle = root / "app.vm"
    env = vmimg_env(cache, files / "home", podman_socket)
    r = subprocess.run(
        ["vmimg", "build", f"docker://{registry}/app:1.0", "-o", str(app_bundle)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    kernel_key = find_or_build_kernel("x86_64", cache_dir=str(cache)).key
    return World(root, registry, podman_socket, podman, kernel_key, files, app_bundle)


# --- running a doc ------------------------------------------------------------------------


@dataclass
class Shell:
    """A terminal's state between commands: the directory and the environment."""

    cwd: Path
    env: dict[str, str]
    state: Path  # where each command leaves its directory and environment
    background: list[tuple[DocCommand, subprocess.Popen[bytes], Mode]] = field(default_factory=list)

    def script(self, text: str) -> str:
        # The command, then what a next command in the same terminal would see.
        return f"{text}\n__rc=$?\npwd > {self.state}/pwd; env -0 > {self.state}/env\nexit $__rc\n"

    def absorb(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.cwd = Path((self.state / "pwd").read_text().strip())
            raw = (self.state / "env").read_bytes().split(b"\0")
            self.env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def log_of(shell: Shell, cmd: DocCommand) -> Path:
    return shell.state / f"out-{cmd.line}.log"


def run_plain(shell: Shell, cmd: DocCommand, text: str) -> tuple[int, str]:
    log = log_of(shell, cmd)
    with open(log, "wb") as out:
        proc = subprocess.run(
            ["bash", "-c", shell.script(text)], cwd=shell.cwd, env=shell.env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT, check=False,
        )  # fmt: skip
    shell.absorb()
    return proc.returncode, log.read_text(errors="replace")


def run_tty(shell: Shell, cmd: DocCommand, text: str) -> tuple[int, str]:
    """Under a terminal (script(1)): once the guest's shell prompts, type a line and `exit`,
    again every few seconds until the line's output shows (typing may beat the shell)."""
    proc = subprocess.Popen(
        ["script", "-qfec", text, "/dev/null"], cwd=shell.cwd, env=shell.env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    seen = b""
    last_sent = 0.0
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if sel.select(POLL_SECONDS):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
            prompted = re.search(rb"[#$] ", seen) is not None
            if prompted and TTY_REPLY not in seen and time.monotonic() - last_sent > TTY_RETYPE:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(TTY_INPUT.encode())
                    proc.stdin.flush()
                last_sent = time.monotonic()
        code = proc.wait(STOP_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = seen.decode(errors="replace")
    assert TTY_REPLY in seen, f"{cmd}: no shell prompt or no reply:\n{out[-3000:]}"
    return code, out


def wait_ready(proc: subprocess.Popen[bytes], mode: Mode, log: Path, port: str, sock: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ended before it was ready:\n{log.read_text()[-3000:]}"
        if mode.ready == "http":
            url = f"http://127.0.0.1:{port}/"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        elif mode.ready == "socket":
            if Path(sock).exists():
                return
        elif mode.ready in log.read_text(errors="replace"):
            return
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"not ready in {READY_TIMEOUT:.0f}s:\n{log.read_text()[-3000:]}")


def start_background(shell: Shell, cmd: DocCommand, text: str, mode: Mode, world: World) -> None:
    log = log_of(shell, cmd)
    text = text.rstrip().removesuffix("&").rstrip()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {text}"], cwd=shell.cwd, env=shell.env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    if mode.kind == "serve":
        values = world.values()
        wait_ready(proc, mode, log, values["port"], f"{values['scratch']}/podman-api.sock")
    shell.background.append((cmd, proc, mode))


def finish_background(shell: Shell, after: DocCommand | None) -> list[str]:
    """Stop services started before `after` (all, at the end); collect finished followers."""
    failures = []
    for item in list(shell.background):
        cmd, proc, mode = item
        if after is not None:
            if mode.until == END or after.line <= cmd.line:
                continue
            if mode.until and after.text != mode.until:
                continue
        if mode.kind == "serve":
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        shell.background.remove(item)
        if code != mode.stop_exit:
            failures.append(
                f"{cmd}\n  ended with {code}, expected {mode.stop_exit}:\n"
                f"{log_of(shell, cmd).read_text(errors='replace')[-2000:]}"
            )
    return failures


def doc_dirs(world: World, doc: str) -> tuple[Path, Path]:
    """Where a page's commands run (its scratch), and its cache and logs (its state)."""
    scratch = world.root / doc.replace("/", "_")
    return scratch, scratch.with_name(scratch.name + ".state")


def scratch_for(world: World, doc: str) -> Path:
    scratch = doc_dirs(world, doc)[0]
    shutil.copytree(world.files, scratch, symlinks=True)
    if not any("-o app.vm" in c.text for c in doc_commands(ROOT / doc)):
        shutil.copytree(world.app_bundle, scratch / "app.vm", symlinks=True)
    return scratch


CHECKOUT_COMMAND = re.compile(r"^(\S+=\S+ )*(\./scripts/|\.venv/bin/)")


def run_doc(world: World, doc: str) -> tuple[list[str], int]:
    scratch = scratch_for(world, doc)
    state = doc_dirs(world, doc)[1]
    state.mkdir()
    cache = state / "cache"
    kernel_cache(cache)
    port = str(free_port())
    world.extra.update(port=port, scratch=str(scratch))
    shell = Shell(scratch, vmimg_env(cache, scratch / "home", world.docker_host), state)
    failures: list[str] = []
    ran = 0
    try:
        for cmd in doc_commands(ROOT / doc):
            if (cmd.doc, cmd.text) in ALLOWED:
                continue
            text = prepared(cmd, world)
            saved_cwd = shell.cwd
            if CHECKOUT_COMMAND.match(text):
                shell.cwd = ROOT  # the checkout's own commands run from the checkout
            mode = mode_for(cmd)
            ran += 1
            if mode is not None and mode.kind in ("serve", "follow"):
                start_background(shell, cmd, text, mode, world)
                continue
            t0 = time.monotonic()
            code, out = (
                run_tty(shell, cmd, text) if mode is not None else run_plain(shell, cmd, text)
            )
            print(f"{time.monotonic() - t0:7.1f}s  exit {code}  {cmd}")
            if synopsis_words(cmd.text) is not None:
                missing = [o for o in re.findall(r"--[\w-]+", cmd.text) if o not in out]
                if missing:
                    failures.append(f"{cmd}\n  options not in its --help: {missing}")
            if code != cmd.expected_exit:
                failures.append(
                    f"{cmd}\n  ran as: {text}\n  exit {code}, expected {cmd.expected_exit}:\n"
                    f"{out[-3000:]}"
                )
            failures += finish_background(shell, cmd)
            if CHECKOUT_COMMAND.match(text):
                shell.cwd = saved_cwd
    finally:
        failures += finish_background(shell, None)
    return failures, ran


# --- the tests ----------------------------------------------------------------------------

DOC_NAMES = [str(d.relative_to(ROOT)) for d in DOCS]


def test_commands_are_found_in_every_kind_of_block() -> None:
    commands = all_commands()
    texts = {(c.doc, c.text) for c in commands}
    assert ("README.md", "./scripts/demo") in texts
    assert ("docs/run.md", "vmimg logs -f web") in texts
    assert any(c.text.startswith("veritysetup verify --no-superblock") for c in commands)
    assert any(c.text.startswith("podman import --change") for c in commands)
    # Output, configuration and prose in code blocks are not commands.
    assert not any(c.text.startswith(("vmimg:", "vmimg-agent-config", "arg ")) for c in commands)
    assert not any(c.doc == "docs/agent.md" and c.text.startswith("env ") for c in commands)


def test_every_block_that_is_not_a_command_is_named() -> None:
    found = non_command_blocks()
    assert found - NOT_COMMANDS.keys() == set(), (
        "code blocks neither run nor named in NOT_COMMANDS (a program this machine lacks?)"
    )
    assert NOT_COMMANDS.keys() - found == set(), "NOT_COMMANDS names blocks the docs dropped"


def test_allow_list_has_no_stale_entries() -> None:
    texts = {(c.doc, c.text) for c in all_commands()}
    stale = [key for key in ALLOWED if key not in texts]
    assert not stale, f"ALLOWED names commands the docs no longer show: {stale}"


def test_every_substitution_is_used() -> None:
    commands = all_commands()
    unused = [
        s
        for s in SUBSTITUTIONS
        if not any(s.doc in ("*", c.doc) and re.search(s.pattern, c.text) for c in commands)
    ]
    assert not unused, f"substitutions no doc needs any more: {unused}"
    unused_modes = [
        (doc, p) for doc, p, _ in MODES
        if not any(doc in ("*", c.doc) and re.search(p, c.text) for c in commands)
    ]  # fmt: skip
    assert not unused_modes, f"modes no doc needs any more: {unused_modes}"


@pytest.mark.slow
@pytest.mark.boot
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("doc", DOC_NAMES)
def test_doc_commands_run(world: World, doc: str) -> None:
    failures, ran = run_doc(world, doc)
    print(f"{doc}: {ran} commands run")
    assert not failures, "\n\n".join(failures)
    # A page that passed leaves nothing to look at: its images go (one page alone makes 2 GB).
    for d in doc_dirs(world, doc):
        shutil.rmtree(d)
