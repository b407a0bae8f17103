"""Search backends by name: the index kinds ``--kind`` takes.

Each backend is one module of this package that defines a
:class:`~esreid.search.backends.base.SearchBackend` subclass and decorates it with
:func:`register`; the modules are found and imported when this package is, so adding a
backend is adding its file (docs/design.md, "Adding a search backend"). A backend whose
library is optional imports it only when an index of its kind is made or loaded.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from esreid.search.backends.base import SearchBackend

_REGISTRY: dict[str, type[SearchBackend]] = {}


class UnknownKindError(ValueError):
    """An index kind no backend registers; the message lists the known kinds."""


def register(cls: type[SearchBackend]) -> type[SearchBackend]:
    """Class decorator: make ``cls`` the backend of index kind ``cls.kind``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"backend {cls.__name__} needs a kind that is a plain name, got {kind!r}")
    if kind in _REGISTRY and _REGISTRY[kind] is not cls:
        raise ValueError(f"index kind {kind!r} is registered twice ({_REGISTRY[kind].__name__} "
                         f"and {cls.__name__})")
    _REGISTRY[kind] = cls
    return cls


def kinds() -> tuple[str, ...]:
    """The registered index kinds, sorted."""
    return tuple(sorted(_REGISTRY))


def backend_class(kind: str) -> type[SearchBackend]:
    """The backend of index kind ``kind``; :class:`UnknownKindError` naming it and listing
    the known kinds otherwise."""
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise UnknownKindError(f"unknown index kind {kind!r}; known kinds: "
                               f"{', '.join(kinds())}") from None


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()
