from typing import Any, TypeVar

_T = TypeVar("_T")

# fields: slot descriptors of cls (cls.size, ...); one value each
def new(cls: type[_T], fields: tuple[Any, ...], /, *values: object) -> _T: ...

# node_fields: Node's children, type and content slots; content_fields: Content's size and
# extents. (sum of the sizes of files named once, every other file, one item per name)
def file_sizes(
    root: Any, node_fields: tuple[Any, ...], content_fields: tuple[Any, ...], file_type: object, /
) -> tuple[int, list[Any]]: ...
