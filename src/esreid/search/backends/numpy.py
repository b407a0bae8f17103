"""``kind="numpy"``: exact search with one float32 BLAS product of the queries and the
features themselves (no second copy, no faiss, every core even for a single query)."""

from __future__ import annotations

from esreid.search.backends import register
from esreid.search.backends.base import InMemoryBackend


@register
class NumpyBackend(InMemoryBackend):
    """The in-memory base as it is: its scan is numpy's."""

    kind = "numpy"
    summary = ("exact search with numpy's BLAS (no faiss needed; one copy of the features; "
               "every core for a single query)")
