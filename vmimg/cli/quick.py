"""The console script, with a fast path for warm `vmimg rootfs` runs.

A warm `vmimg rootfs` (its conversion already cached) is mostly start-up: click, the image
sources and the writers take longer to import than handing out the cached file does. So
every `vmimg rootfs` that ends well writes a hit record (`record_hit`) of what decided its
result: the command line without its -o value, the working directory, the environment that
matters, a fingerprint of vmimg's own code, and stamps (inode, size, times) of the local
files its SOURCE resolved through. `entry` looks the record up before anything else is
imported; when every part matches, the conversion is the cached entry the record names,
and handing it out is the whole run.

Anything else goes to the full command line (cli/main): another command, a source in a
registry or a daemon (a tag there can move), a changed file, an entry pruned or touched,
or any error at all here; the full command decides afresh and prints its own messages.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import zlib
from collections.abc import Sequence

import vmimg
from vmimg import netstrings
from vmimg.errors import EXIT_INTERRUPTED, VmimgError
from vmimg.image.fsutil import (
    HITS_AREA,
    OUTPUTS_AREA,
    default_cache_dir,
    lock_shared,
)
from vmimg.rootfs.handout import entry_usable, hand_out
from vmimg.testhook import PAUSE_AT_ENV

FULL_CLI = "vmimg.cli.main"
# What else decides a result: the cache's place, and reproducible builds' clock.
KEY_ENVIRONMENT = ("VMIMG_CACHE", "XDG_CACHE_HOME", "HOME", "SOURCE_DATE_EPOCH")
CODE_SUFFIXES = (".py", ".so")
RECORD_VERSION = 3
# A record's fields (netstrings): RECORD_MAGIC, its key, entry_dir, file, linkable ("1" or
# "0"), format, image, digest, platform; then for each deciding file its path and its stamp
# (the numbers joined by spaces).
RECORD_MAGIC = f"vmimg-hit {RECORD_VERSION}"
RECORD_HEAD = 9  # the fields before the stamps
RECORD_SUFFIX = ".hit"
VMIMG_ERROR = VmimgError.exit_code


class HitRecord:
    """What a finished run left for the fast path (written by `record_hit`). A plain class,
    not a dataclass: importing dataclasses (and inspect with it) would cost a fifth of the
    fast path."""

    __slots__ = (
        "digest",
        "entry_dir",
        "file",
        "format",
        "image",
        "key",
        "linkable",
        "platform",
        "stamps",
    )

    def __init__(
        self,
        entry_dir: str,  # the conversion's cache entry
        file: str,  # the image's name in it
        linkable: bool,  # nobody writes this format in place (a hardlink may be handed out)
        stamps: dict[str, list[int]],  # SOURCE's deciding files -> `stamp`
        format: str,
        image: str,
        digest: str,
        platform: str,
        key: str = "",  # hit_key of the command line it answers (set by record_hit)
    ) -> None:
        self.entry_dir = entry_dir
        self.file = file
        self.linkable = linkable
        self.stamps = stamps
        self.format = format
        self.image = image
        self.digest = digest
        self.platform = platform
        self.key = key

    def to_fields(self) -> list[str]:
        """The record as the fields it is written as (RECORD_MAGIC's comment)."""
        head = [RECORD_MAGIC, self.key, self.entry_dir, self.file, "1" if self.linkable else "0"]
        head += [self.format, self.image, self.digest, self.platform]
        for path, numbers in sorted(self.stamps.items()):
            head += [path, " ".join(str(n) for n in numbers)]
        return head

    @classmethod
    def from_fields(cls, fields: list[str]) -> HitRecord | None:
        """The record `to_fields` gave these fields; None for any other fields."""
        stamped = fields[RECORD_HEAD:]
        if len(fields) < RECORD_HEAD or len(stamped) % 2 or fields[0] != RECORD_MAGIC:
            return None
        key, entry_dir, file, linkable, fmt, image, digest, platform = fields[1:RECORD_HEAD]
        if linkable not in ("0", "1") or not _plain_name(file):
            return None
        stamps = {}
        for path, numbers in zip(stamped[::2], stamped[1::2], strict=True):
            parsed = _integers(numbers)
            if parsed is None:
                return None
            stamps[path] = parsed
        return cls(entry_dir, file, linkable == "1", stamps, fmt, image, digest, platform, key)


def _integers(text: str) -> list[int] | None:
    """The integers of "N N ..." (plain ASCII digits, maybe a minus sign); None if not."""
    numbers = []
    for word in text.split(" "):
        digits = word.removeprefix("-")
        if not (digits.isascii() and digits.isdigit()):
            return None
        numbers.append(int(word))
    return numbers


def split_output(args: Sequence[str]) -> tuple[list[str], str] | None:
    """(the arguments without the output option, the output path), or None unless the
    output is given exactly once in a form we can tell (-o P, -oP, --output P, --output=P)."""
    rest: list[str] = []
    outputs: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return None  # after it, "-o" is a name: leave such lines to click
        if arg in ("-o", "--output"):
            if i + 1 == len(args):
                return None
            outputs.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--output="):
            outputs.append(arg.removeprefix("--output="))
        elif arg.startswith("-o") and not arg.startswith("--"):
            outputs.append(arg[2:])
        else:
            rest.append(arg)
        i += 1
    if len(outputs) != 1 or not outputs[0]:
        return None
    return rest, outputs[0]


def code_listing() -> list[str]:
    """The path, size and mtime of every module of vmimg: a hit record is good only for the
    code that wrote it (a checkout changes without a new version number)."""
    root = os.path.dirname(os.path.abspath(vmimg.__file__))
    listing = [f"{root} {vmimg.__version__}"]
    for dirpath, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            if name.endswith(CODE_SUFFIXES):
                st = os.stat(os.path.join(dirpath, name))
                listing.append(f"{dirpath}/{name} {st.st_size} {st.st_mtime_ns}")
    return listing


def hit_key(args: Sequence[str]) -> str:
    """The key of a command line (its output option taken out) in this place and state:
    all of it, as text. A record keeps its key whole and is used only if it matches
    exactly; the record's file name is just a checksum of it (no cryptographic hash:
    hashlib's OpenSSL load was a tenth of the fast path)."""
    # "NAME" for a variable not set, "NAME=VALUE" for one set (to the empty string too)
    env = [f"{name}={os.environ[name]}" if name in os.environ else name for name in KEY_ENVIRONMENT]
    head = [f"hit-key {RECORD_VERSION}", os.getcwd(), os.uname().machine, str(len(args))]
    return netstrings.pack([*head, *args, *env, *code_listing()])


def default_cache_root() -> str:
    """The default cache ($VMIMG_CACHE or ~/.cache/vmimg): the only one with hit records
    (`--cache DIR` on a command line: no record)."""
    return os.path.abspath(default_cache_dir())


def cache_area(name: str) -> str:
    return os.path.join(default_cache_root(), name)


def stamp(path: str) -> list[int]:
    """What changes when a file is written, replaced or renamed over (ctime: every write)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def result_line(output: str, size: int, record: HitRecord, state: str) -> str:
    """The human result line of `vmimg rootfs` (cli/rootfs prints it too)."""
    return (
        f"{output}: {record.format}, {size} bytes, "
        f"{record.image} ({record.digest[:19]}, {record.platform}) {state}"
    )


def record_place(args: Sequence[str]) -> tuple[str, str, str] | None:
    """Where the hit record of this command line lives, its key, and the command's output;
    None if it cannot have one. Two keys may share a place: the later record replaces the
    earlier."""
    if not args or args[0] != "rootfs":
        return None
    split = split_output(args[1:])
    if split is None:
        return None
    key = hit_key(split[0])
    name = f"{zlib.crc32(key.encode(netstrings.ENCODING, netstrings.ERRORS)):08x}{RECORD_SUFFIX}"
    return os.path.join(cache_area(HITS_AREA), name), key, split[1]


def record_hit(args: Sequence[str], output: str, record: HitRecord) -> None:
    """Keep `record` for this command line (`args`: sys.argv[1:]), if it can have one and
    its output is the one the command wrote. Best effort: a failure only costs speed."""
    place = record_place(args)
    if place is None or place[2] != output:
        return
    path, key, _output = place
    record.key = key
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Not fsynced: a record a crash cut short does not parse, and one lost costs a full run.
        netstrings.write_file(tmp, record.to_fields())
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def load_record(path: str, key: str) -> HitRecord | None:
    """The record of `key` at `path`, or None if it is missing, another key's, or not one
    `record_hit` could write."""
    try:
        fields = netstrings.read_file(path)
    except OSError:
        return None
    record = None if fields is None else HitRecord.from_fields(fields)
    return record if record is not None and record.key == key else None


def _plain_name(name: str) -> bool:
    """A file name in one directory, and not the entry's seal record."""
    return bool(name) and "/" not in name and not name.startswith(".")


def _unchanged(stamps: dict[str, list[int]]) -> bool:
    try:
        return all(stamp(path) == recorded for path, recorded in stamps.items())
    except OSError:  # gone, or unreadable now
        return False


def try_hit(args: Sequence[str]) -> str | None:
    """Serve `vmimg ARGS` from its hit record: the output handed out, and the line to print;
    None (having changed nothing) if it cannot."""
    if os.environ.get(PAUSE_AT_ENV):
        return None  # the fault tests stop runs at points of the full command line
    place = record_place(args)
    if place is None:
        return None
    path, key, output = place
    record = load_record(path, key)
    if record is None:
        return None
    if os.path.dirname(record.entry_dir) != cache_area(OUTPUTS_AREA):
        return None  # a record names an entry of its own cache, nothing else
    if not _unchanged(record.stamps):
        return None
    pin = lock_shared(record.entry_dir)  # kept by `cache prune` while we hand it out
    if pin is None:
        return None
    try:
        cached = os.path.join(record.entry_dir, record.file)
        if not (os.path.isfile(cached) and entry_usable(record.entry_dir)):
            return None  # the full command line discards the entry and converts again
        how = hand_out(cached, output, record.linkable)  # atomic: all of it, or nothing
    finally:
        os.close(pin)
    return result_line(output, os.path.getsize(output), record, f"from cache ({how})")


def entry() -> None:
    """The `vmimg` console script."""
    try:
        line = try_hit(sys.argv[1:])
    except KeyboardInterrupt:
        sys.stderr.write("vmimg: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except Exception:  # any trouble here: the full command line decides
        line = None
    _leave(_run_full_command_line() if line is None else _print_result(line))


def _print_result(line: str) -> int:
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except OSError as e:  # as the full command line reports a closed stdout
        sys.stderr.write(f"vmimg: error: cannot write the result: {e.strerror}\n")
        return VMIMG_ERROR
    return 0


def _run_full_command_line() -> int | str | None:
    """cli/main's entry (loaded only now); its exit status."""
    try:
        importlib.import_module(FULL_CLI).entry()
    except SystemExit as e:
        return e.code
    return 0


def _leave(status: int | str | None) -> None:
    """Exit with `status` (never returns), skipping the interpreter's teardown when nothing
    else runs: after a conversion it frees every module and object one by one (20-25 ms of a
    cold run), which the kernel does at once. Anything still running (a thread) gets the
    ordinary exit, and so does a run under a profiler or tracer (cProfile, coverage), which
    writes its results at exit. (No thread was started if threading was never loaded.)"""
    threading = sys.modules.get("threading")
    alone = threading is None or threading.active_count() == 1
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if isinstance(status, int) and alone and not watched:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a reader gone: nothing to add
                stream.flush()
        os._exit(status)
    sys.exit(status)
