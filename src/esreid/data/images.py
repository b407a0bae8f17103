"""The one image reader: every entry point (data loaders, ``ReIDModel``, ``esreid index``,
``esreid serve``, explanations) turns a file, uploaded bytes or a PIL image into pixels here.

``read_image(source)`` returns an upright 8-bit RGB PIL image, or raises
:class:`ImageReadError` with one line ``cannot read image <name>: <reason>``:

* **Orientation.** The EXIF orientation tag (phone photos) is applied, so the pixels are the
  picture as a browser shows it.
* **Modes.** 8-bit grayscale (``L``) and bilevel (``1``) are repeated over R, G and B.
  16-bit grayscale (``I;16*``, and ``I`` whose values lie in 0-65535) is scaled by
  ``round(v * 255 / 65535)``. Float (``F``) pixels in [0, 1] are scaled by 255, float pixels
  in [0, 255] are taken as they are (rounded); other ranges, NaN and infinities are refused.
  Palette images take their palette colours. Transparency (``RGBA``, ``LA``, palette
  transparency, premultiplied modes) is composited over :data:`BACKGROUND`, the ImageNet mean
  colour: the value the model's normalisation maps to 0, the same neutral input that Random
  Erasing and BESM erase to. CMYK is converted with Pillow's profile-free formula (Adobe
  JPEGs are inverted by the decoder). ``YCbCr``, ``RGBX`` and ``HSV`` are converted to RGB.
  Other modes (``LAB``, multi-channel floats) are refused with the mode named. Embedded ICC
  colour profiles are not applied: pixels are taken as sRGB, like the training benchmarks'.
* **Size.** Images must have at least :data:`MIN_IMAGE_SIDE` pixels on each side (smaller
  ones cannot be a person or vehicle crop: a 1x1 image would still get a "same person"
  verdict) and at most :data:`MAX_IMAGE_PIXELS` pixels, checked from the header before any
  pixel is decoded (decompression bombs).
* **Bounded decoding.** With ``target=(height, width)`` (the model's input size) an image at
  least four times larger than the target in both directions is decoded smaller: JPEGs in
  the DCT domain (``draft``, scale 1/2 to 1/8), others reduced right after decoding by an
  integer box filter (``reduce``), always keeping at least twice the target size so the
  model's antialiased resize still has the detail it needs. Every caller that wants the same
  pixels for the same file passes the same target (evaluation, ``ReIDModel``, the index and
  the server all pass the model's input size).
* **Bounded memory.** An image of :data:`LARGE_IMAGE_PIXELS` or more (after any JPEG draft)
  is decoded on one of :data:`DECODE_THREADS` decoder threads of the process, whatever
  thread asked for it: twenty concurrent uploads of a 36 M pixel PNG then hold at most two
  full-size buffers at a time, not twenty. The full-size buffer is released as soon as the
  result is made, and the freed memory handed back to the operating system (glibc's
  ``malloc_trim``): glibc keeps each thread's freed large buffers in that thread's arena,
  so twenty threads decoding in turn would otherwise keep twenty of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import os
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "BACKGROUND",
    "DECODE_THREADS",
    "LARGE_IMAGE_PIXELS",
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "ImageReadError",
    "ImageTooLargeError",
    "ImageTooSmallError",
    "prepare_image",
    "read_image",
]

#: Smallest accepted width and height, in pixels.
MIN_IMAGE_SIDE = 8
#: Largest accepted image, in pixels (width x height): far above any re-ID crop or phone
#: photo, far below a decompression bomb.
MAX_IMAGE_PIXELS = 40_000_000
#: Images at least this large (pixels as decoded) decode on the decoder threads.
LARGE_IMAGE_PIXELS = 4_000_000
#: Decoder threads per process: at most this many large images decode at once.
DECODE_THREADS = 2
#: What transparent pixels are composited over: ImageNet's mean colour (0.485, 0.456, 0.406)
#: x 255, rounded, which normalises to (about) 0.
BACKGROUND = (124, 116, 104)
#: Reduce (or draft) only when the image is at least this many times the target.
_REDUCE_MARGIN = 2

_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # transposed or rotated by 90 degrees
#: What turns a stored image with EXIF orientation 2-8 upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}
#: Metadata that can carry an orientation (Pillow's getexif reads XMP's tiff:Orientation too).
_ORIENTATION_CARRIERS = {"exif", "xmp", "XML:com.adobe.xmp"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_CONVERTIBLE = {"RGB", "RGBX", "CMYK", "YCbCr", "HSV"}

# torch re-raises a worker's exception as ``exc_type(msg)`` where ``msg`` is
# "Caught <Type> in DataLoader worker process N.\nOriginal Traceback ...\n<module>.<Type>: <message>".
_WORKER_MESSAGE = re.compile(r"Caught Image\w*Error in DataLoader worker process")
_FINAL_LINE = re.compile(r"(?:\w+\.)*Image\w*Error: (.*)")


class ImageReadError(OSError):
    """An image is missing, unreadable, not a decodable image, of an unsupported mode, or of
    a refused size.

    The message is one line, ``cannot read image <name>: <reason>`` (or, in the loaders' skip
    mode, one naming an identity none of whose images can be read). When torch re-raises the
    error from a DataLoader worker with the worker's whole traceback as the message, only the
    original one-line message is kept, so the error reads the same with and without workers.
    """

    def __init__(self, *args: object) -> None:
        """Store the message, unwrapping a DataLoader worker's re-raise message."""
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap_worker_message(args[0]),)
        super().__init__(*args)


class ImageTooSmallError(ImageReadError):
    """An image with fewer than :data:`MIN_IMAGE_SIDE` pixels on a side."""


class ImageTooLargeError(ImageReadError):
    """An image over :data:`MAX_IMAGE_PIXELS` pixels (checked before decoding)."""


def _unwrap_worker_message(message: str) -> str:
    """The original message inside torch's "Caught ImageReadError in DataLoader worker ..."
    text (the last traceback line's text after the exception name), else ``message``."""
    if not _WORKER_MESSAGE.match(message):
        return message
    # The last line is the re-raised exception itself: chained causes (the PIL error behind
    # it) are printed before it in the traceback, and the message is one line.
    last = message.strip().splitlines()[-1].strip()
    found = _FINAL_LINE.fullmatch(last)
    return found.group(1).strip() if found else message


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _Decoders:
    """The process's decoder threads (made on first use, and again in a forked child, whose
    copy of the parent's threads does not run). Counts the decodes running on them."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.running = 0
        self.peak = 0
        self._pid: int | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def run(self, fn: Any) -> Any:
        """``fn()`` on a decoder thread; its result or its exception."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="esreid-decode")
                self._pid = os.getpid()
            pool = self._pool
        return pool.submit(self._counted, fn).result()

    def _counted(self, fn: Any) -> Any:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return fn()
        finally:
            with self._lock:
                self.running -= 1


_DECODERS = _Decoders(DECODE_THREADS)


def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


_TRIM = _malloc_trim()


def _give_back_memory() -> None:
    """Return freed heap memory to the OS. glibc keeps the pages of freed large buffers
    (its mmap threshold grows after the first large free, and each thread has its own
    arena), so a server that decoded a burst of large images would otherwise stay near its
    peak size."""
    if _TRIM is not None:
        _TRIM(0)


def _open(source: Any, name: str) -> tuple[Image.Image, IO[bytes] | None]:
    """Open ``source`` (path, bytes or binary file) lazily: header only."""
    handle: IO[bytes] | None = None
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageReadError(f"cannot read image {name}: the file is empty")
            handle = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            handle = open(source, "rb")  # noqa: SIM115 - closed by read_image
        else:
            handle = source
        with warnings.catch_warnings():
            # The size check below is ours; Pillow's own bomb warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
        return image, handle
    except ImageReadError:
        _close(handle)
        raise
    except FileNotFoundError as exc:
        _close(handle)
        raise ImageReadError(f"cannot read image {name}: file not found") from exc
    except IsADirectoryError as exc:
        _close(handle)
        raise ImageReadError(f"cannot read image {name}: it is a folder") from exc
    except PermissionError as exc:
        _close(handle)
        raise ImageReadError(f"cannot read image {name}: permission denied") from exc
    except UnidentifiedImageError as exc:
        _close(handle)
        empty = isinstance(source, (str, os.PathLike)) and _is_empty(source)
        reason = ("the file is empty" if empty else
                  "cannot identify image format (not an image, or a format Pillow cannot read)")
        raise ImageReadError(f"cannot read image {name}: {reason}") from exc
    except Image.DecompressionBombError as exc:
        _close(handle)
        raise ImageTooLargeError(f"cannot read image {name}: over the limit of "
                                 f"{MAX_IMAGE_PIXELS:,} pixels") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        _close(handle)
        raise ImageReadError(f"cannot read image {name}: {_one_line(exc)}") from exc


def _is_empty(path: str | os.PathLike) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def _close(handle: IO[bytes] | None) -> None:
    if handle is not None:
        handle.close()


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable: the pixels are still fine)."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # damaged EXIF blocks raise many types; the pixels are still fine
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(f"cannot read image {name}: {width}x{height} pixels is over "
                                 f"the limit of {MAX_IMAGE_PIXELS:,} pixels")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageTooSmallError(f"cannot read image {name}: {width}x{height} pixels is below "
                                 f"the minimum of {MIN_IMAGE_SIDE} pixels on each side (too "
                                 "small to be a person or vehicle crop)")


def _reduce_factor(width: int, height: int, target: tuple[int, int] | None) -> int:
    """The integer factor an image of ``width`` x ``height`` (as stored) may shrink by for
    a ``target`` of (height, width) in the same orientation; 1 for none."""
    if target is None:
        return 1
    t_h, t_w = target
    return max(1, min(width // (_REDUCE_MARGIN * t_w), height // (_REDUCE_MARGIN * t_h)))


def _stored_target(target: tuple[int, int] | None, orientation: int) -> tuple[int, int] | None:
    """``target`` (upright height, width) in the stored image's orientation."""
    if target is None:
        return None
    t_h, t_w = int(target[0]), int(target[1])
    if t_h < 1 or t_w < 1:
        raise ValueError(f"target size must be positive, got {target}")
    return (t_w, t_h) if orientation in _SWAPPING_ORIENTATIONS else (t_h, t_w)


def _composite(rgba: Image.Image) -> Image.Image:
    """RGB of ``rgba`` over :data:`BACKGROUND`: ``round(c a / 255 + b (255 - a) / 255)``."""
    arr = np.asarray(rgba, dtype=np.float32)
    alpha = arr[..., 3:4] / 255.0
    out = arr[..., :3] * alpha + np.asarray(BACKGROUND, dtype=np.float32) * (1.0 - alpha)
    return Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8), mode="RGB")


def _to_eight_bit(image: Image.Image, name: str) -> Image.Image:
    """``image`` as ``L``, ``RGB`` or ``RGBA`` with 8-bit values (see the module docstring)."""
    mode = image.mode
    if mode in ("L", "RGB", "RGBA"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image)
        if mode == "I":
            low, high = int(values.min()), int(values.max())
            if low < 0 or high > 65535:
                raise ImageReadError(
                    f"cannot read image {name}: 32-bit integer pixels from {low} to {high} "
                    "do not fit 16 bits; save it as an 8- or 16-bit image")
        scaled = (values.astype(np.uint32) * 255 + 32767) // 65535
        return Image.fromarray(scaled.astype(np.uint8), mode="L")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageReadError(f"cannot read image {name}: float pixels include NaN or "
                                 "infinite values")
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high <= 1.0:
            values = values * 255.0
        elif not (low >= 0.0 and high <= 255.0):
            raise ImageReadError(f"cannot read image {name}: float pixels from {low:g} to "
                                 f"{high:g} are neither in [0, 1] nor in [0, 255]")
        return Image.fromarray(np.rint(values).astype(np.uint8), mode="L")
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if mode in _ALPHA_MODES:
        # La/RGBa are premultiplied; Pillow un-premultiplies them on the way to RGBA.
        return (image.convert("LA") if mode == "La" else image).convert("RGBA")
    if mode in _CONVERTIBLE:
        return image.convert("RGB")
    raise ImageReadError(f"cannot read image {name}: colour mode {mode} is not supported; "
                         "save it as RGB or grayscale")


def _finish(image: Image.Image, factor: int, orientation: int, name: str) -> Image.Image:
    """Reduce by ``factor``, convert to 8-bit RGB, then turn upright."""
    if factor > 1:
        try:
            image = image.reduce(factor)
            factor = 1
        except ValueError:  # a mode reduce() does not take: convert first
            pass
    image = _to_eight_bit(image, name)
    if factor > 1:
        image = image.reduce(factor)
    if image.mode == "RGBA":
        image = _composite(image)
    elif image.mode == "L":
        image = image.convert("RGB")
    if orientation != 1:
        # From the tag read before decoding: converted copies no longer carry the EXIF block.
        image = image.transpose(_TRANSPOSE[orientation])
        # The copy keeps the source's metadata; without its orientation tag, reading the
        # upright result again (a PIL image handed on to ReIDModel) cannot turn it twice.
        image.info = {k: v for k, v in image.info.items() if k not in _ORIENTATION_CARRIERS}
    return image


def read_image(source: str | os.PathLike | bytes | IO[bytes], *, name: str | None = None,
               target: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file, its bytes or an open binary file into an upright 8-bit RGB PIL
    image (see the module docstring for orientation, modes and sizes).

    ``name`` is what error messages call the image (default: the path, or "upload").
    ``target`` is the (height, width) the caller will resize to; an image at least 4x
    larger in both directions is then decoded smaller. Raises :class:`ImageReadError`
    (one line naming the image) for a missing, unreadable, truncated or refused image.
    """
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "upload"
    image, handle = _open(source, name)
    try:
        with image:
            width, height = image.size
            _check_size(width, height, name)
            if image.format == "JPEG":
                # A JPEG's EXIF block is read with its header: the orientation is known
                # before decoding, so the DCT-domain scaling can aim at the upright target
                # (the full-size pixels are then never decoded).
                orientation = _orientation(image)
                stored = _stored_target(target, orientation)
                if stored is not None and _reduce_factor(width, height, stored) > 1:
                    t_h, t_w = stored
                    image.draft(None, (_REDUCE_MARGIN * t_w, _REDUCE_MARGIN * t_h))
            else:
                # Other formats may keep EXIF after the pixels (PNG's eXIf chunk): asking for
                # it would decode the whole image here, outside the decoder threads.
                orientation = None
            if image.size[0] * image.size[1] < LARGE_IMAGE_PIXELS:
                return _load(image, target, orientation, name)
            return _DECODERS.run(lambda: _load(image, target, orientation, name, large=True))
    finally:
        if handle is not None and handle is not source:
            handle.close()


def _load(image: Image.Image, target: tuple[int, int] | None, orientation: int | None,
          name: str, large: bool = False) -> Image.Image:
    """Decode the opened ``image`` and make the result (see :func:`read_image`;
    ``orientation`` None: read it after decoding); the decoded buffer is released before
    returning, and for a ``large`` image the memory handed back to the OS."""
    try:
        image.load()
        if orientation is None:
            orientation = _orientation(image)
        stored = _stored_target(target, orientation)
        result = _finish(image, _reduce_factor(*image.size, stored), orientation, name)
        if result is image:
            result = image.copy()  # closing the file must not take the pixels along
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError,
            Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image {name}: {_one_line(exc)}") from exc
    finally:
        image.close()  # frees the full-size buffer now, on this thread
    if large:
        _give_back_memory()
    return result


def prepare_image(image: Image.Image, *, name: str = "image",
                  target: tuple[int, int] | None = None) -> Image.Image:
    """An already opened PIL image turned into what :func:`read_image` returns: the same
    size checks, mode conversion, reduction and EXIF orientation."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"prepare_image takes a PIL image, got {type(image).__name__}")
    width, height = image.size
    _check_size(width, height, name)
    orientation = _orientation(image)
    stored = _stored_target(target, orientation)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageReadError(f"cannot read image {name}: {_one_line(exc)}") from exc
    return _finish(image, _reduce_factor(width, height, stored), orientation, name)
