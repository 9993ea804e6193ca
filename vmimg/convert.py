"""`vmimg rootfs`: source -> layers -> Tree -> writer -> one output file.

The output appears at its destination only when complete: it is written to a
temporary name beside the destination and renamed at the end; on any error
the temporary file is removed. Finished conversions are kept in the cache,
keyed by everything that determines their bytes, so a repeat is a copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vmimg import __version__
from vmimg.cache import Cache
from vmimg.content import ContentReader
from vmimg.errors import VmimgError, WriterError
from vmimg.flatten import flatten
from vmimg.image import fetch_layers
from vmimg.sources import SourceOptions, open_image
from vmimg.sources.base import Image
from vmimg.tree import Tree
from vmimg.writers import WRITER_VERSIONS, write_image

NS_PER_S = 1_000_000_000
COPY_CHUNK = 64 << 20


def source_date_epoch_ns() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if not value:
        return None
    try:
        return int(value) * NS_PER_S
    except ValueError:
        raise VmimgError(f"SOURCE_DATE_EPOCH is not an integer: {value!r}") from None


@dataclass
class ConvertResult:
    output: str
    format: str
    image: str
    digest: str
    platform: str
    size: int
    cached: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)


def options_doc(options: Any) -> dict[str, Any]:
    """A writer options dataclass as a dict (for cache keys and metadata)."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        return {"type": type(options).__name__, **dataclasses.asdict(options)}
    return {}


def with_seed(options: Any, image: Image) -> Any:
    """Writers that make UUIDs derive them from a `seed`: the image's config digest, so the
    same image gives the same bytes whichever transport it came through."""
    fields = (
        {f.name for f in dataclasses.fields(options)}
        if dataclasses.is_dataclass(options)
        else set()
    )
    if "seed" in fields and not options.seed:
        return dataclasses.replace(options, seed=image.config_digest.encode())
    return options


def conversion_key(image: Image, fmt: str, options: Any, epoch_ns: int | None) -> str:
    doc = {
        "vmimg": __version__,
        "image": image.digest,
        "platform": str(image.platform),
        "format": fmt,
        "writer": WRITER_VERSIONS.get(fmt),
        "options": options_doc(options),
        "epoch": epoch_ns,
    }
    blob = json.dumps(doc, sort_keys=True, default=lambda b: b.hex()).encode()
    return hashlib.sha256(blob).hexdigest()


@contextlib.contextmanager
def atomic_output(dest: str) -> Iterator[int]:
    """A file descriptor for a temporary file beside `dest`, renamed onto it on success."""
    directory = os.path.dirname(os.path.abspath(dest)) or "."
    if not os.path.isdir(directory):
        raise VmimgError(f"output directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dest)}.", suffix=".tmp")
    try:
        yield fd
        # No fsync: like cp and mkfs, the destination gets the page cache's guarantee.
        # (Cache entries are fsynced: other builds trust them.)
        os.close(fd)
        fd = -1
        os.chmod(tmp, 0o644)
        os.rename(tmp, dest)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def copy_file(src: str, dst_fd: int) -> None:
    """Copy `src` into the empty file `dst_fd`, leaving its holes holes.

    Images are sparse (ext4 free space, a sparse file's holes): copying a hole
    byte by byte could write terabytes of zeros that were never there.
    """
    with open(src, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: only a hole is left
                    raise
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            _copy_range(src, fd, dst_fd, start, end)
            offset = end
        os.ftruncate(dst_fd, size)


def _copy_range(src: str, in_fd: int, out_fd: int, start: int, end: int) -> None:
    while start < end:
        n = os.copy_file_range(in_fd, out_fd, min(COPY_CHUNK, end - start), start, start)
        if n <= 0:
            raise WriterError(f"copy from {src} stopped early")
        start += n


def build_tree(image: Image, cache: Cache, progress: Callable[[int], None] | None = None) -> Tree:
    tree = flatten(fetch_layers(image, cache, progress))
    epoch = source_date_epoch_ns()
    if epoch is not None:
        tree.clamp_mtimes(epoch)
    return tree


def convert(
    source: str,
    fmt: str,
    dest: str,
    options: Any,
    cache: Cache,
    source_options: SourceOptions,
    use_cache: bool = True,
    progress: Callable[[int], None] | None = None,
    transform: Callable[[Tree, Image], None] | None = None,
) -> ConvertResult:
    """Convert `source` to a `fmt` image at `dest`."""
    start = time.monotonic()
    image = open_image(source, cache, source_options)
    try:
        options = with_seed(options, image)
        key = conversion_key(image, fmt, options, source_date_epoch_ns())
        cached_path = os.path.join(cache.output_dir(key), f"rootfs.{fmt}")
        warnings: list[str] = []
        hit = use_cache and transform is None and os.path.exists(cached_path)
        tree = None
        if not hit:
            tree = build_tree(image, cache, progress)
            if transform is not None:
                transform(tree, image)
        try:
            with atomic_output(dest) as fd:
                if tree is None:
                    copy_file(cached_path, fd)
                else:
                    with ContentReader() as reader:
                        warnings = write_image(fmt, tree, reader, fd, options)
        except OSError as e:
            # A full disk, a quota, a read-only directory: the temporary file is gone.
            raise WriterError(f"cannot write {dest}: {e.strerror or e}") from None
        if use_cache and transform is None and not hit:
            with contextlib.suppress(OSError):  # keeping a copy is optional
                _store_output(cache, key, dest, f"rootfs.{fmt}")
        return ConvertResult(
            output=dest,
            format=fmt,
            image=image.name,
            digest=image.digest,
            platform=str(image.platform),
            size=os.path.getsize(dest),
            cached=hit,
            seconds=time.monotonic() - start,
            warnings=warnings,
        )
    finally:
        image.close()


def _store_output(cache: Cache, key: str, src: str, name: str) -> None:
    final_dir = cache.output_dir(key)
    if os.path.exists(os.path.join(final_dir, name)):
        return
    with cache.temp_dir() as tmp:
        fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            copy_file(src, fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):  # another process stored it first
            os.rename(tmp, final_dir)
