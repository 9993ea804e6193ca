from typing import Any

from vmimg.image.layers import Entry
from vmimg.rootfs.tree import Node

# entries: a layer's entries, reversed (plain files and directories in known directories
# are applied and popped); shapes: flatten._SHAPES (classes, slots, constants)
def apply_files(
    entries: list[Entry],
    parents: dict[bytes, tuple[Node, int]],
    times: dict[int, int],
    tar_path: str,
    shapes: tuple[Any, ...],
    /,
) -> int: ...
