from typing import Any, TypeVar

_T = TypeVar("_T")

# fields: slot descriptors of cls (cls.size, ...); one value each
def new(cls: type[_T], fields: tuple[Any, ...], /, *values: object) -> _T: ...
