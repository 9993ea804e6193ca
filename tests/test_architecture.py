"""The layout docs/architecture.md describes is the layout the code has: stages import only
from the stages before them, nothing imports vmimg inside a function, and every module is
on the map."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

from vmimg.image.reference import TRANSPORTS
from vmimg.image.sources import OPENERS
from vmimg.rootfs.writers import FORMATS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vmimg"
# The stages in data-flow order; the foundation modules may be imported by any of them.
FOUNDATION = {"errors", "digest", "arch", "safetext", "testhook", "netstrings", "__init__"}
STAGES = ["image", "rootfs", "guest", "bundle", "boot", "artifact", "pipeline", "cli", "__main__"]


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _stage(module: str) -> str:
    """'vmimg.image.cache' -> 'image'; foundation modules -> their own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported vmimg module, whether at module level) for each import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] == "vmimg":
                out.append((name, id(node) in top))
    return out


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_no_vmimg_import_inside_a_function() -> None:
    hidden = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in _modules()
        for name, at_top in _imports(path)
        if not at_top
    ]
    assert hidden == []


def test_stages_import_only_earlier_stages() -> None:
    backwards = []
    for path in _modules():
        here = _stage(_module_name(path))
        if here in FOUNDATION:
            assert all(_stage(n) in FOUNDATION for n, _ in _imports(path)), path
            continue
        for name, _ in _imports(path):
            there = _stage(name)
            if there in FOUNDATION or there == "vmimg" or there not in STAGES:
                continue
            if STAGES.index(there) > STAGES.index(here):
                backwards.append(f"{_module_name(path)} imports {name}")
    assert backwards == []


def test_every_module_is_on_the_map() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for path in _modules():
        rel = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py" or path.name == "__main__.py":
            continue
        parent = path.parent.relative_to(PACKAGE).as_posix() + "/"
        if f"`{rel}`" in text or rel in text:
            continue
        # Writers and sources are listed by their folder.
        if parent in ("rootfs/writers/ext4/", "rootfs/writers/erofs/", "image/sources/"):
            continue
        if path.parent.name == "writers" and f"`{path.name}`" in text:
            continue
        missing.append(rel)
    assert missing == []


def test_only_the_named_tables_load_modules_by_name() -> None:
    """cli/main.py loads each command's module when the command is used, and cli/quick.py
    loads cli/main.py when its fast path cannot answer (start-up time); the plug-in tables
    (the sources' OPENERS, the writers' FORMATS) load their entries' modules on first use,
    each a module of the table's own package. Nothing else in vmimg imports by name, so the
    import graph above stays the whole graph."""
    users = sorted(
        _module_name(p)
        for p in _modules()
        if "importlib" in {n.split(".")[0] for n in _all_imported_names(p)}
    )
    assert users == [
        "vmimg.cli.main",
        "vmimg.cli.quick",
        "vmimg.image.sources.__init__",
        "vmimg.rootfs.writers.__init__",
    ]


def test_the_plugin_tables_name_modules_of_their_own_package() -> None:
    """Each table names modules of its own package by their names there (so no stage is
    reached backwards), and every entry loads: a module per transport with its `open_ref`,
    a writer per format."""
    assert set(OPENERS) == set(TRANSPORTS)
    for module in OPENERS.values():
        assert "." not in module and (PACKAGE / "image" / "sources" / f"{module}.py").is_file()
        assert callable(importlib.import_module(f"vmimg.image.sources.{module}").open_ref)
    for fmt in FORMATS.values():
        module, _, function = fmt.writer.partition(":")
        assert (PACKAGE / "rootfs" / "writers" / f"{module.replace('.', '/')}.py").is_file()
        assert callable(
            getattr(importlib.import_module(f"vmimg.rootfs.writers.{module}"), function)
        )


def _all_imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_a_rootfs_command_loads_no_later_stage() -> None:
    """`vmimg rootfs` (most of a warm run is start-up) loads the image and rootfs stages
    only; `vmimg --help` loads every command."""
    probe = (
        "import sys\n"
        "from vmimg.cli import main\n"
        "main.main(['rootfs', '--help'], standalone_mode=False)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('vmimg.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    loaded = {_stage(m) for m in out if m.startswith("vmimg.")}
    assert loaded <= FOUNDATION | {"image", "rootfs", "cli"}, sorted(loaded)


def test_a_conversion_loads_only_its_transport_and_its_writer(
    sample_ref: str, tmp_path: Path
) -> None:
    """A cold `vmimg rootfs oci:... --format erofs` (start-up is much of a short run) loads
    the layout reader and the erofs writer through the plug-in tables, and no other
    transport (not the registry client), no other writer, nor `vmimg sample`'s builder."""
    probe = (
        "import sys\n"
        "from vmimg.cli import main\n"
        "try:\n"
        "    main.main(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n"
        "    print(' '.join(sorted(sys.modules)))\n"
    )
    args = ["rootfs", sample_ref, "--format", "erofs", "-o", str(tmp_path / "out.erofs")]
    out = subprocess.run(
        [sys.executable, "-c", probe, *args],
        capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "VMIMG_CACHE": str(tmp_path / "cache")},
    ).stdout.splitlines()  # fmt: skip
    assert out[0].startswith(str(tmp_path / "out.erofs") + ": erofs,"), out  # converted
    loaded = set(out[-1].split())
    used = {"vmimg.image.sources.layout", "vmimg.rootfs.writers.erofs.writer"}
    assert used <= loaded, sorted(m for m in loaded if m.startswith("vmimg."))
    unused = {"vmimg.image.registry", "vmimg.image.sample"}
    unused |= {f"vmimg.image.sources.{m}" for m in OPENERS.values() if m != OPENERS["oci"]}
    for fmt in FORMATS.values():  # a writer's module, or the package holding it
        if fmt.name != "erofs":
            unused.add(f"vmimg.rootfs.writers.{fmt.writer.partition(':')[0].split('.')[0]}")
    assert sorted(loaded & unused) == []
