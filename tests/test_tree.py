"""Tree.content_bytes: C's walk (_slots.file_sizes) against its Python twin (tree_ref)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import tree_ref
from vmimg.image.layers import Extent
from vmimg.rootfs import _slots
from vmimg.rootfs.tree import (
    _SIZED_CONTENT_SLOTS,
    _SIZED_NODE_SLOTS,
    Content,
    Node,
    NodeType,
    Tree,
)

# Sizes past a C long long take the Python way; they must still add up.
SIZES = st.one_of(st.integers(0, 1 << 20), st.integers((1 << 62), (1 << 64)))


def _content(draw: st.DrawFn) -> Content:
    size = draw(SIZES)
    if draw(st.booleans()):
        return Content(size, path="/layer.tar", offset=512)
    runs = draw(st.lists(st.integers(0, 1 << 16), max_size=3))
    return Content(size, path="/layer.tar", extents=tuple(Extent(i, n) for i, n in enumerate(runs)))


@st.composite
def trees(draw: st.DrawFn) -> tuple[Tree, list[Node]]:
    """A tree of directories, files (plain, sparse, huge), symlinks and hardlinks; and a list
    holding some of its files (a reference more, as a caller may have)."""
    tree = Tree()
    dirs = [tree.root]
    files: list[Node] = []
    held: list[Node] = []
    for i in range(draw(st.integers(0, 40))):
        parent = draw(st.sampled_from(dirs))
        assert parent.children is not None
        name = b"n%d" % i
        kind = draw(st.sampled_from(["dir", "file", "file", "link", "symlink", "odd"]))
        if kind == "dir":
            node = Node(NodeType.DIR)
            dirs.append(node)
        elif kind == "file":
            node = Node(NodeType.FILE, content=_content(draw))
            files.append(node)
            if draw(st.booleans()):
                held.append(node)
        elif kind == "link" and files:
            node = draw(st.sampled_from(files))  # another name of the same node
        elif kind == "odd":  # a file with an (empty) children dict: still a file
            node = Node(NodeType.FILE, children={}, content=_content(draw))
        else:
            node = Node(NodeType.SYMLINK, target=b"x" * draw(st.integers(1, 9)))
        parent.children[name] = node
    return tree, held


@settings(max_examples=300, deadline=None)
@given(trees())
def test_content_bytes_is_its_twins(case: tuple[Tree, list[Node]]) -> None:
    tree, _held = case
    assert tree.content_bytes() == tree_ref.content_bytes(tree)


def test_a_hardlinked_file_counts_once_however_its_names_are_held() -> None:
    tree = Tree()
    assert tree.root.children is not None
    a, b = Node(NodeType.DIR), Node(NodeType.DIR)
    tree.root.children.update({b"a": a, b"b": b})
    shared = Node(NodeType.FILE, content=Content(1000))
    assert a.children is not None and b.children is not None
    a.children[b"x"] = shared
    b.children[b"y"] = shared
    a.children[b"plain"] = Node(NodeType.FILE, content=Content(7))
    del shared  # only the two directories name it now
    assert tree.content_bytes() == 1007 == tree_ref.content_bytes(tree)
    total, others = _slots.file_sizes(
        tree.root, _SIZED_NODE_SLOTS, _SIZED_CONTENT_SLOTS, NodeType.FILE
    )
    assert total == 7 and len(others) == 2 and others[0] is others[1]


def test_a_sparse_file_counts_its_stored_bytes() -> None:
    tree = Tree()
    assert tree.root.children is not None
    runs = (Extent(0, 10), Extent(1 << 30, 5))
    tree.root.children[b"s"] = Node(NodeType.FILE, content=Content(1 << 40, extents=runs))
    assert tree.content_bytes() == 15


def _sizes(root: object, node_fields: object = None, content_fields: object = None) -> object:
    return _slots.file_sizes(
        root,
        _SIZED_NODE_SLOTS if node_fields is None else node_fields,
        _SIZED_CONTENT_SLOTS if content_fields is None else content_fields,
        NodeType.FILE,
    )


def test_file_sizes_refuses_what_is_not_a_tree() -> None:
    root = Node(NodeType.DIR)
    assert root.children is not None
    arguments = r"file_sizes\(root, "
    with pytest.raises(TypeError, match=arguments):
        _sizes(object())  # not a node
    with pytest.raises(TypeError, match=arguments):
        _sizes(root, (*_SIZED_CONTENT_SLOTS, None))  # not Node's slots
    with pytest.raises(TypeError, match=arguments):
        _sizes(root, None, _SIZED_NODE_SLOTS)  # not Content's
    with pytest.raises(TypeError, match=arguments):
        _sizes(root, (Node.type, Node.children, Node.content))  # Node's, in the wrong order
    root.children[b"x"] = "not a node"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        _sizes(root)
    root.children[b"x"] = Node(NodeType.FILE, content="not content")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _sizes(root)
    odd = Node(NodeType.DIR)
    odd.children = ["not", "a", "dict"]  # type: ignore[assignment]
    root.children[b"x"] = odd
    with pytest.raises(TypeError):
        _sizes(root)
    bad = Node(NodeType.FILE, content=Content(-5))
    root.children[b"x"] = bad
    assert _sizes(root) == (0, [bad])  # a negative size is left to Python, as is
