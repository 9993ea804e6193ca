"""The user docs against the code: the generated CLI reference is current, every `vmimg`
command line in the README, the docs and the CI examples names real commands and options,
the CI examples are valid YAML and appear verbatim in docs/ci.md, the exit code tables
(docs/usage.md's, the one reference, and docs/ci.md's) are vmimg.errors', no doc announces
as coming a command that exists, links resolve, and shell completion works in bash, zsh
and fish."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from vmimg import errors
from vmimg.cli import main as cli
from vmimg.cli import options as cli_options

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GENERATOR = ROOT / "scripts" / "gen-cli-docs"
CLI_MD = DOCS / "cli.md"
CI_MD = DOCS / "ci.md"
USAGE_MD = DOCS / "usage.md"
README = ROOT / "README.md"
GITHUB_EXAMPLE = DOCS / "ci" / "github-actions.yml"
GITLAB_EXAMPLE = DOCS / "ci" / "gitlab-ci.yml"
# The docs written with these files; each is checked for command lines and links.
USER_DOCS = [
    DOCS / "quickstart.md",
    CI_MD,
    DOCS / "troubleshooting.md",
    DOCS / "comparison.md",
    DOCS / "run.md",
    CLI_MD,
    USAGE_MD,
    GITHUB_EXAMPLE,
    GITLAB_EXAMPLE,
]
# Every doc whose command lines are checked: the README and all of docs/.
ALL_DOCS = sorted({README, *DOCS.glob("*.md"), *USER_DOCS})
# Commands the docs may show before they exist (a parallel change adds them).
PENDING_COMMANDS: set[str] = set()
VMIMG_SCRIPT = Path(sys.executable).parent / "vmimg"


# --- the generated reference ------------------------------------------------------------------


def test_cli_reference_is_current(tmp_path: Path) -> None:
    fresh = tmp_path / "cli.md"
    subprocess.run(
        [sys.executable, str(GENERATOR), "--output", str(fresh)], check=True, capture_output=True
    )
    assert CLI_MD.read_text() == fresh.read_text(), (
        "docs/cli.md is out of date: run scripts/gen-cli-docs "
        "(.venv/bin/python scripts/gen-cli-docs)"
    )


def all_commands() -> list[tuple[str, click.Command]]:
    """Every command path under `vmimg`, with its command object."""
    out: list[tuple[str, click.Command]] = []

    def visit(cmd: click.Command, path: str) -> None:
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None, name
                visit(sub, f"{path} {name}")

    visit(cli.main, "vmimg")
    return out


def test_cli_reference_has_every_command_and_option() -> None:
    text = CLI_MD.read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    by_title = {s.splitlines()[0].strip("`"): s for s in sections[1:]}
    for path, cmd in all_commands()[1:]:
        assert path in by_title, f"docs/cli.md has no section for {path}"
        for param in cmd.params:
            if isinstance(param, click.Option) and "--help" not in param.opts:
                assert f"`{param.opts[0]}`" in by_title[path], f"{path}: {param.opts[0]} missing"


# --- command lines in the docs ----------------------------------------------------------------

SHELL_STOPS = {"&&", "||", ";", "|", ">", ">>", "2>", "<"}


def code_lines(doc: Path) -> list[str]:
    """The lines of code in a doc: all of a YAML file; in Markdown, indented and fenced code."""
    text = doc.read_text()
    if doc.suffix != ".md":
        return text.splitlines()
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            out.append(line)
    return out


def command_lines(lines: list[str]) -> list[str]:
    """The `vmimg ...` command lines among lines of code (also after `- `, `$ `, `run: `).
    Lines ending in a backslash are joined with the next."""
    found: list[str] = []
    pending = ""
    for raw in lines:
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        line = re.sub(r"^(?:- |\$ |run: )", "", line).strip()
        if line.startswith("vmimg "):
            found.append(line)
    return found


def check_command_line(line: str) -> None:
    words = []
    for word in shlex.split(line, comments=True):
        if word in SHELL_STOPS or word.startswith((">", "2>")):
            break
        words.append(word)
    cmd: click.Command = cli.main
    path = "vmimg"
    rest = words[1:]
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        if rest[0].startswith("[") or rest[0].isupper():
            break  # a synopsis: [OPTIONS] COMMAND [ARGS]...
        name = rest.pop(0)
        if name in PENDING_COMMANDS and cmd is cli.main and name not in cli.COMMANDS:
            return
        sub = cmd.get_command(click.Context(cmd), name)
        assert sub is not None, f"{line!r}: {path} has no command {name!r}"
        cmd, path = sub, f"{path} {name}"
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    known |= {"-h", "--help"} | ({"--version"} if cmd is cli.main else set())
    for word in rest:
        if word == "--":
            break  # the end of vmimg's options: a command for the guest follows
        if word.startswith("-") and len(word) > 1 and not word.lstrip("-").isdigit():
            option = word.split("=", 1)[0]
            if not option.startswith("--") and len(option) > 2:  # short flags together: -it
                for letter in option[1:]:
                    assert f"-{letter}" in known, f"{line!r}: {path} has no option -{letter}"
                continue
            assert option in known, f"{line!r}: {path} has no option {option}"


@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda p: p.name)
def test_command_lines_in_docs_are_real(doc: Path) -> None:
    lines = command_lines(code_lines(doc))
    for line in lines:
        check_command_line(line)
    if doc in (GITHUB_EXAMPLE, GITLAB_EXAMPLE):
        assert len(lines) == 3, "the CI examples build, verify and push"


def test_command_line_check_catches_mistakes() -> None:
    check_command_line("vmimg verify bundle --junit report.xml --json > out.json")
    check_command_line("vmimg run bundle -- ls --all")
    check_command_line("vmimg exec -it name sh")
    with pytest.raises(AssertionError, match="no option -x"):
        check_command_line("vmimg exec -ix name sh")
    with pytest.raises(AssertionError, match="no option --junit-xml"):
        check_command_line("vmimg verify bundle --junit-xml report.xml")
    with pytest.raises(AssertionError, match="no command 'biuld'"):
        check_command_line("vmimg biuld x -o y")


# --- the CI examples --------------------------------------------------------------------------


def fenced_yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```$", text, flags=re.M | re.S)


def test_ci_examples_appear_verbatim_in_ci_md() -> None:
    blocks = fenced_yaml_blocks(CI_MD.read_text())
    assert [b.rstrip() for b in blocks] == [
        GITHUB_EXAMPLE.read_text().rstrip(),
        GITLAB_EXAMPLE.read_text().rstrip(),
    ], "docs/ci.md must quote docs/ci/*.yml exactly"


def test_github_workflow_builds_verifies_with_junit_and_pushes() -> None:
    wf = yaml.safe_load(GITHUB_EXAMPLE.read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "push" in triggers and "pull_request" in triggers
    (job,) = wf["jobs"].values()
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "vmimg build " in runs and "vmimg verify bundle --junit report.xml" in runs
    assert "vmimg push bundle " in runs
    upload = [
        s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")
    ]
    assert upload and upload[0]["if"] == "always()" and "report.xml" in upload[0]["with"]["path"]


def test_gitlab_job_builds_verifies_with_junit_and_pushes() -> None:
    (job,) = yaml.safe_load(GITLAB_EXAMPLE.read_text()).values()
    script = "\n".join(job["script"])
    assert "vmimg build " in script and "vmimg verify bundle --junit report.xml" in script
    assert "vmimg push bundle " in script
    assert job["image"]["entrypoint"] == [""]
    assert job["artifacts"]["when"] == "always"
    assert job["artifacts"]["reports"]["junit"] == "report.xml"


def error_classes() -> list[type[errors.VmimgError]]:
    return [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, errors.VmimgError)
    ]


def exit_code_rows(text: str) -> dict[int, str]:
    """The rows of a `| code | ... |` table, by code."""
    return {int(m[0]): m[1] for m in re.findall(r"^\| (\d+) \|(.*)$", text, flags=re.M)}


def test_ci_md_exit_codes_are_vmimg_errors() -> None:
    text = CI_MD.read_text().split("### Exit codes", 1)[1].split("###", 1)[0]
    codes = {cls.exit_code for cls in error_classes()}
    assert set(exit_code_rows(text)) == {0, cli_options.EXIT_INTERRUPTED} | codes


def test_usage_md_exit_code_table_names_every_error_class() -> None:
    """docs/usage.md holds the one exit code table: a row per code, and every class of
    vmimg.errors named in the row of its exit code (nothing else names a class)."""
    text = USAGE_MD.read_text().split("## Exit codes", 1)[1]
    rows = exit_code_rows(text)
    codes = {cls.exit_code for cls in error_classes()}
    assert set(rows) == {0, cli_options.EXIT_INTERRUPTED} | codes
    for cls in error_classes():
        assert f"`{cls.__name__}`" in rows[cls.exit_code], (
            f"{cls.__name__} not in row {cls.exit_code}"
        )
    named = {
        n for row in rows.values() for n in re.findall(r"`(\w+Error|VerificationFailed)`", row)
    }
    assert named == {cls.__name__ for cls in error_classes()}
    # The generated reference points at this table rather than repeating it.
    assert "usage.md#exit-codes" in CLI_MD.read_text()


def test_no_doc_announces_an_existing_command_as_coming() -> None:
    pending = re.compile(r"`vmimg (\w+)[^`]*` (?:is|are) (?:arriving|coming|not yet)")
    for doc in ALL_DOCS:
        for name in pending.findall(doc.read_text()):
            assert name not in cli.COMMANDS, f"{doc.name}: `vmimg {name}` exists"


# --- links ------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", USER_DOCS[:6], ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
    for target, fragment in re.findall(r"\]\(([^)#\s]*)#([^)]+)\)", text):
        linked = doc.parent / target if target else doc
        headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
        anchors = {github_anchor(h) for h in headings}
        assert fragment in anchors, f"{doc.name} links to missing #{fragment} in {linked.name}"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


# --- shell completion -------------------------------------------------------------------------


def complete(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert VMIMG_SCRIPT.is_file(), f"{VMIMG_SCRIPT} missing: pip install -e . makes it"
    return subprocess.run(
        [str(VMIMG_SCRIPT)], capture_output=True, text=True, env={**os.environ, **env}
    )


@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o nosort -F _vmimg_completion vmimg"),
        ("zsh", "#compdef vmimg"),
        ("fish", "complete --no-files --command vmimg"),
    ],
)
def test_completion_script_for_each_shell(shell: str, marker: str) -> None:
    result = complete({"_VMIMG_COMPLETE": f"{shell}_source"})
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    assert "_VMIMG_COMPLETE" in result.stdout  # the script calls back into vmimg


def bash_complete(words: str, cword: int) -> list[str]:
    """What bash would offer: click answers `type,value` lines."""
    result = complete(
        {"_VMIMG_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    )
    assert result.returncode == 0, result.stderr
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if "," in line]


def test_completion_offers_commands_subcommands_options_and_choices() -> None:
    assert bash_complete("vmimg ro", 1) == ["rootfs"]
    assert set(bash_complete("vmimg cache ", 2)) == {"ls", "prune"}
    assert "--format" in bash_complete("vmimg rootfs SRC --for", 3)
    assert set(bash_complete("vmimg rootfs SRC --format e", 4)) == {"ext4", "erofs"}
