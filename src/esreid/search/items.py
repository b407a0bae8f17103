"""What a gallery item carries besides its descriptor, its id, and the filters searches take.

Every item has a ``path``, an optional identity ``label``, an optional ``camera`` (a string:
``"3"``) and an optional capture ``time`` (seconds since the Unix epoch, UTC), and an ``id``
derived from its content and path (:func:`item_id`), so that adding the same image twice
(a retried ``esreid index add``) finds it already there instead of duplicating it.

A :class:`SearchFilter` keeps the items of a search to those not seen by some cameras
(``camera_not``) and captured within a window (``after`` <= time <= ``before``, both
inclusive). An item without a capture time is left out by a time window (it cannot be shown
to lie in it); an item without a camera is never excluded by ``camera_not``.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

#: The namespace of item ids (uuid5): fixed, so ids agree across processes and machines.
ID_NAMESPACE = uuid.UUID("6f1f7a52-3c1e-5b8e-9a57-2f6c1d0e4b11")
#: The camera in dataset-style file names: Market-1501 ``0001_c3s1_000151_01.jpg``,
#: DukeMTMC ``0001_c2_f0046182.jpg``, MSMT17 ``0000_011_05_0303morning_0015_0.jpg`` is not.
_CAMERA_IN_NAME = re.compile(r"^-?\d+_c(\d+)")
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class Item:
    """One gallery item's fields (see the module docstring)."""

    path: str
    label: str | None = None
    camera: str | None = None
    time: float | None = None
    id: str | None = None


def item_id(path: str, content: bytes | None = None, content_file: str | None = None,
            features: np.ndarray | None = None) -> str:
    """The id of an image: a UUID (uuid5) of the SHA-256 of its bytes (``content``, or the
    file ``content_file`` read in blocks) and its stored ``path``. When neither is available
    (an item added from descriptors alone, or an index file of format 1) the descriptor's
    bytes stand in for the content."""
    digest = hashlib.sha256()
    if content is not None:
        digest.update(content)
    elif content_file is not None:
        with open(content_file, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    elif features is not None:
        digest.update(b"descriptor:")
        digest.update(np.ascontiguousarray(features, dtype="<f4").tobytes())
    return str(uuid.uuid5(ID_NAMESPACE, digest.hexdigest() + "\0" + path))


def camera_from_name(path: str) -> str | None:
    """The camera a dataset-style file name gives (Market-1501, DukeMTMC: ``0001_c3...``
    is camera ``"3"``), else None."""
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    found = _CAMERA_IN_NAME.match(name)
    return str(int(found.group(1))) if found else None


def parse_time(value: Any, what: str = "time") -> float | None:
    """Seconds since the epoch (UTC) from a number, a numeric string or an ISO 8601 string
    (``2024-05-01T12:30:00Z``; without a zone it is read as UTC); None for None or "".
    ValueError naming ``what`` otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a time, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        out = float(value)
    else:
        text = str(value).strip()
        try:
            out = float(text)
        except ValueError:
            try:
                stamp = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise ValueError(f"{what}: {text!r} is not a time (ISO 8601 such as "
                                 "2024-05-01T12:30:00Z, or seconds since the epoch)") from None
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=timezone.utc)
            out = stamp.timestamp()
    if not math.isfinite(out):
        raise ValueError(f"{what}: {value!r} is not a finite time")
    return out


def check_camera(value: Any, what: str = "camera") -> str | None:
    """A camera id as a non-empty string (numbers are written as integers), or None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a camera id, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if not text or any(ord(c) < 32 for c in text):
        raise ValueError(f"{what}: a camera id must be a non-empty line of text, got {value!r}")
    return text


@dataclass(frozen=True)
class SearchFilter:
    """Which items a search may return: none of the cameras in ``camera_not``, captured at
    or after ``after`` and at or before ``before`` (seconds since the epoch)."""

    camera_not: frozenset[str] = frozenset()
    after: float | None = None
    before: float | None = None

    @classmethod
    def make(cls, camera_not: Iterable[Any] | None = None, after: Any = None,
             before: Any = None) -> SearchFilter:
        """A filter from user input (cameras as numbers or strings, times as
        :func:`parse_time` reads them); ValueError naming the field that is wrong."""
        cams = frozenset(check_camera(c, "camera_not") for c in (camera_not or ()))
        lo, hi = parse_time(after, "after"), parse_time(before, "before")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"after ({after}) is later than before ({before}): the window is "
                             "empty")
        return cls(cams, lo, hi)  # type: ignore[arg-type]

    @property
    def empty(self) -> bool:
        """True when the filter keeps every item."""
        return not self.camera_not and self.after is None and self.before is None

    @property
    def timed(self) -> bool:
        """True when the filter has a time window."""
        return self.after is not None or self.before is not None

    def accepts(self, camera: str | None, time: float | None) -> bool:
        """Whether an item with this camera and time passes."""
        if camera is not None and camera in self.camera_not:
            return False
        if self.timed:
            if time is None:
                return False
            if self.after is not None and time < self.after:
                return False
            if self.before is not None and time > self.before:
                return False
        return True

    def mask(self, cameras: Sequence[str | None], times: Sequence[float | None]) -> np.ndarray:
        """Boolean ``[N]``: which of N items (their cameras and times) pass."""
        keep = np.ones(len(cameras), dtype=bool)
        if self.camera_not:
            keep &= np.fromiter((c not in self.camera_not for c in cameras), bool, len(cameras))
        if self.timed:
            t = np.fromiter((np.nan if x is None else x for x in times), np.float64, len(times))
            with np.errstate(invalid="ignore"):
                ok = ~np.isnan(t)
                if self.after is not None:
                    ok &= t >= self.after
                if self.before is not None:
                    ok &= t <= self.before
            keep &= ok
        return keep

    def to_dict(self) -> dict[str, Any]:
        """The filter as JSON-ready fields (sorted cameras, times in seconds)."""
        return {"camera_not": sorted(self.camera_not), "after": self.after, "before": self.before}


NO_FILTER = SearchFilter()
