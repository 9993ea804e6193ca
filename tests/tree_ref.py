"""vmimg/rootfs/_slots.c's file_sizes in Python: Tree.content_bytes as it was before the C
walk, kept to check the C against (tests/test_tree.py)."""

from __future__ import annotations

from vmimg.rootfs.tree import Node, NodeType, Tree


def content_bytes(tree: Tree) -> int:
    """The stored bytes of every file, each hardlinked one once."""
    files: set[Node] = set()  # by identity (eq=False): hardlinks count once
    dirs = [tree.root]
    while dirs:
        directory = dirs.pop()
        assert directory.children is not None
        for child in directory.children.values():
            if child.children:
                dirs.append(child)
            elif child.type is NodeType.FILE and child.content is not None:
                files.add(child)
    total = 0
    for node in files:
        content = node.content
        assert content is not None
        total += content.size if content.extents is None else content.stored_size
    return total
