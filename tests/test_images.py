"""The one image reader (issue 20, cases 6 and 7): EXIF orientation, every image mode
converted to known 8-bit RGB values, sizes refused with one line, bounded decoding, and the
same pixels whichever entry point reads the file. Every image here is made by hand with
known pixel values."""

import io
import re
import threading

import numpy as np
import pytest
from PIL import Image

from esreid.data import images
from esreid.data.images import (
    BACKGROUND,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    ImageTooLargeError,
    ImageTooSmallError,
    prepare_image,
    read_image,
)
from esreid.data.loader import ImageReadError, read_rgb
from esreid.data.transforms import IMAGENET_MEAN


def _upright(h: int = 16, w: int = 8, seed: int = 0) -> np.ndarray:
    """An asymmetric uint8 RGB picture: every flip and rotation of it is different."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# How a camera stores an upright picture U under each EXIF orientation (the EXIF 2.32
# definitions, written independently of the reader's table): the viewer undoes it.
STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],                           # mirrored left-right
    3: lambda u: u[::-1, ::-1],                        # rotated 180
    4: lambda u: u[::-1, :],                           # mirrored top-bottom
    5: lambda u: u.transpose(1, 0, 2),                 # transposed (main diagonal)
    6: lambda u: np.rot90(u, 1),                       # shown after turning 90 clockwise
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),     # transverse
    8: lambda u: np.rot90(u, -1),                      # shown after turning 90 anticlockwise
}


def _with_orientation(path, pixels: np.ndarray, orientation: int, fmt: str = "PNG"):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format=fmt, exif=exif)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_picture(tmp_path, orientation):
    upright = _upright()
    path = _with_orientation(tmp_path / f"o{orientation}.png", STORED[orientation](upright),
                             orientation)
    got = read_rgb(str(path))
    assert np.array_equal(np.asarray(got), upright)
    # An already opened PIL image (ReIDModel.preprocess takes those) is turned the same way,
    # and an image the reader returned is upright for good: reading it again changes nothing.
    with Image.open(path) as opened:
        assert np.array_equal(np.asarray(prepare_image(opened)), upright)
    assert np.array_equal(np.asarray(prepare_image(got)), upright)


def test_exif_orientation_of_a_jpeg_phone_photo(tmp_path):
    # A "portrait" photo stored landscape with orientation 6, as phones write them.
    upright = np.zeros((64, 32, 3), np.uint8)
    upright[:32] = (250, 0, 0)  # red top half
    upright[32:] = (0, 0, 250)  # blue bottom half
    path = _with_orientation(tmp_path / "phone.jpg", STORED[6](upright), 6, fmt="JPEG")
    with Image.open(path) as raw:
        assert raw.size == (64, 32)  # stored sideways
    got = np.asarray(read_rgb(str(path))).astype(int)
    assert got.shape == (64, 32, 3)
    assert np.abs(got[4:28] - (250, 0, 0)).max() <= 8
    assert np.abs(got[36:60] - (0, 0, 250)).max() <= 8


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _grey(value_rows) -> np.ndarray:
    """Known grey values ``[[...]]`` as the RGB array read_rgb must return (8x8 tiles)."""
    tile = np.repeat(np.repeat(np.asarray(value_rows, dtype=np.uint8), 8, 0), 8, 1)
    return np.repeat(tile[..., None], 3, axis=2)


def _tiles(values, dtype) -> np.ndarray:
    return np.repeat(np.repeat(np.asarray(values, dtype=dtype), 8, 0), 8, 1)


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = [[0, 257, 32896], [65535, 1000, 65280]]
    path = tmp_path / "depth.png"
    Image.fromarray(_tiles(values, np.uint16)).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"
    # round(v * 255 / 65535): 0, 1, 128, 255, 4, 254 (the old reader clipped all to 255).
    assert np.array_equal(np.asarray(read_rgb(str(path))), _grey([[0, 1, 128], [255, 4, 254]]))


def test_thirty_two_bit_integer_images(tmp_path):
    path = tmp_path / "i.tif"
    Image.fromarray(_tiles([[0, 65535], [32896, 257]], np.int32), mode="I").save(path)
    assert np.array_equal(np.asarray(read_rgb(str(path))), _grey([[0, 255], [128, 1]]))
    wide = tmp_path / "wide.tif"
    Image.fromarray(_tiles([[0, 70000]], np.int32), mode="I").save(wide)
    with pytest.raises(ImageReadError, match=f"cannot read image {wide}: 32-bit integer pixels "
                                             "from 0 to 70000 do not fit 16 bits"):
        read_rgb(str(wide))


def test_float_tiffs_in_either_range(tmp_path):
    unit = tmp_path / "unit.tif"
    Image.fromarray(_tiles([[0.0, 0.5, 1.0], [0.25, 0.75, 0.1]], np.float32), mode="F").save(unit)
    # [0, 1] is scaled by 255 and rounded (the old reader made this image black).
    assert np.array_equal(np.asarray(read_rgb(str(unit))),
                          _grey([[0, 128, 255], [64, 191, 26]]))
    bytes_range = tmp_path / "bytes.tif"
    Image.fromarray(_tiles([[0.0, 10.4, 254.6]], np.float32), mode="F").save(bytes_range)
    assert np.array_equal(np.asarray(read_rgb(str(bytes_range))), _grey([[0, 10, 255]]))
    for name, values, reason in [
        ("neg.tif", [[-1.0, 0.5]], "float pixels from -1 to 0.5 are neither in [0, 1] nor in [0, 255]"),
        ("big.tif", [[0.0, 300.0]], "float pixels from 0 to 300 are neither"),
        ("nan.tif", [[0.0, np.nan]], "float pixels include NaN or infinite values"),
    ]:
        path = tmp_path / name
        Image.fromarray(_tiles(values, np.float32), mode="F").save(path)
        with pytest.raises(ImageReadError, match=re.escape(f"cannot read image {path}: {reason}")):
            read_rgb(str(path))


def _over_background(rgb, alpha):
    """The documented composite: round(c a / 255 + background (255 - a) / 255)."""
    c, a, b = np.asarray(rgb, float), alpha / 255.0, np.asarray(BACKGROUND, float)
    return tuple(int(v) for v in np.rint(c * a + b * (1 - a)))


def test_alpha_is_composited_over_the_imagenet_mean(tmp_path):
    assert BACKGROUND == tuple(round(255 * m) for m in IMAGENET_MEAN)
    pixels = np.zeros((8, 24, 4), np.uint8)
    pixels[:, :8] = (255, 0, 0, 255)     # opaque red
    pixels[:, 8:16] = (0, 0, 255, 0)     # fully transparent (its colour must not show)
    pixels[:, 16:] = (200, 100, 0, 128)  # half transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, mode="RGBA").save(path)
    got = np.asarray(read_rgb(str(path)))
    assert tuple(got[0, 0]) == (255, 0, 0)
    assert tuple(got[0, 8]) == BACKGROUND
    assert tuple(got[0, 16]) == _over_background((200, 100, 0), 128)
    la = tmp_path / "la.png"
    Image.fromarray(np.dstack([_tiles([[90, 90]], np.uint8), _tiles([[255, 64]], np.uint8)]),
                    mode="LA").save(la)
    got = np.asarray(read_rgb(str(la)))
    assert tuple(got[0, 0]) == (90, 90, 90)
    assert tuple(got[0, 8]) == _over_background((90, 90, 90), 64)


def test_palette_images_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    indices = _tiles([[0, 1, 2]], np.uint8)
    plain = Image.fromarray(indices, mode="P")
    plain.putpalette(palette)
    path = tmp_path / "plain.png"
    plain.save(path)
    got = np.asarray(read_rgb(str(path)))
    assert [tuple(got[0, x]) for x in (0, 8, 16)] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    see_through = tmp_path / "transparent.gif"
    plain.save(see_through, transparency=1)
    got = np.asarray(read_rgb(str(see_through)))
    assert [tuple(got[0, x]) for x in (0, 8, 16)] == [(255, 0, 0), BACKGROUND, (0, 0, 255)]


def test_cmyk_tiff_and_jpeg(tmp_path):
    cmyk = np.zeros((8, 32, 4), np.uint8)
    cmyk[:, :8] = (255, 0, 0, 0)     # cyan
    cmyk[:, 8:16] = (0, 255, 255, 0)  # red
    cmyk[:, 16:24] = (0, 0, 0, 255)   # black
    cmyk[:, 24:] = (0, 0, 0, 0)       # white
    expected = [(0, 255, 255), (255, 0, 0), (0, 0, 0), (255, 255, 255)]
    image = Image.fromarray(cmyk, mode="CMYK")
    tiff = tmp_path / "cmyk.tif"
    image.save(tiff)
    got = np.asarray(read_rgb(str(tiff)))
    assert [tuple(got[0, x]) for x in (0, 8, 16, 24)] == expected
    jpeg = tmp_path / "cmyk.jpg"  # an Adobe CMYK JPEG (stored inverted)
    image.save(jpeg, quality=100)
    got = np.asarray(read_rgb(str(jpeg))).astype(int)
    for x, want in zip((3, 11, 19, 27), expected, strict=True):
        assert np.abs(got[4, x] - want).max() <= 6, (x, got[4, x], want)


def test_grayscale_and_bilevel(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(_tiles([[0, 77, 255]], np.uint8), mode="L").save(grey)
    assert np.array_equal(np.asarray(read_rgb(str(grey))), _grey([[0, 77, 255]]))
    bilevel = tmp_path / "bilevel.png"
    Image.fromarray(_tiles([[0, 255]], np.uint8), mode="L").convert("1").save(bilevel)
    assert np.array_equal(np.asarray(read_rgb(str(bilevel))), _grey([[0, 255]]))


def test_an_unsupported_mode_is_named():
    with pytest.raises(ImageReadError, match="cannot read image lab: colour mode LAB is not "
                                             "supported"):
        prepare_image(Image.new("LAB", (8, 8)), name="lab")


@pytest.mark.parametrize(("size", "ok"), [((1, 1), False), ((7, 100), False), ((100, 7), False),
                                          ((8, 8), True), ((MIN_IMAGE_SIDE, 64), True)])
def test_images_below_the_minimum_size_are_refused(tmp_path, size, ok):
    path = tmp_path / "tiny.png"
    Image.new("RGB", size, (10, 20, 30)).save(path)
    if ok:
        assert read_rgb(str(path)).size == size
        return
    with pytest.raises(ImageTooSmallError) as err:
        read_rgb(str(path))
    message = str(err.value)
    assert message == (f"cannot read image {path}: {size[0]}x{size[1]} pixels is below the "
                       f"minimum of {MIN_IMAGE_SIDE} pixels on each side (too small to be a "
                       "person or vehicle crop)")
    assert isinstance(err.value, ImageReadError)


def test_a_declared_size_over_the_limit_is_refused_before_decoding(tmp_path):
    import struct
    import zlib

    data = bytearray(_png_bytes(Image.new("L", (8, 8))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", 10_000, 10_000)  # 100 M pixels declared
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    with pytest.raises(ImageTooLargeError, match=re.escape(
            f"10000x10000 pixels is over the limit of {MAX_IMAGE_PIXELS:,} pixels")):
        read_image(bytes(data), name="bomb.png")


def test_errors_name_the_image_never_a_python_object():
    with pytest.raises(ImageReadError) as err:
        read_image(b"certainly not an image", name="upload.png")
    assert str(err.value) == ("cannot read image upload.png: cannot identify image format "
                              "(not an image, or a format Pillow cannot read)")
    assert "BytesIO" not in str(err.value) and "0x" not in str(err.value)
    with pytest.raises(ImageReadError, match="the file is empty"):
        read_image(b"", name="e.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_decode_smaller_for_a_small_target(fmt):
    picture = Image.new("RGB", (2000, 1200), (30, 160, 90))
    data = _png_bytes(picture, fmt)
    full = read_image(data)
    assert full.size == (2000, 1200)
    small = read_image(data, target=(64, 32))  # (height, width)
    w, h = small.size
    # At least twice the target on each side, at most 4x on the tighter side.
    assert w >= 64 and h >= 128 and min(w / 32, h / 64) < 4 * 2
    assert w < 2000 and h < 1200
    assert np.abs(np.asarray(small).astype(int) - (30, 160, 90)).max() <= 3
    # Images already near the target are decoded untouched, pixel for pixel.
    crop = _upright(64, 32)
    same = read_image(_png_bytes(Image.fromarray(crop)), target=(64, 32))
    assert np.array_equal(np.asarray(same), crop)


def test_large_images_decode_on_a_few_threads_whatever_asks(monkeypatch):
    """Case 9: however many threads ask at once, large images decode on at most
    DECODE_THREADS decoder threads (so a burst holds that many full-size buffers, not one
    per request); small images decode where they are asked for."""
    decoders = images._Decoders(images.DECODE_THREADS)
    monkeypatch.setattr(images, "_DECODERS", decoders)
    monkeypatch.setattr(images, "LARGE_IMAGE_PIXELS", 300 * 200)
    data = _png_bytes(Image.new("RGB", (400, 300), (1, 2, 3)))
    seen, errors = set(), []
    original = images._load

    def spying_load(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(images, "_load", spying_load)

    def decode():
        try:
            assert read_image(data).getpixel((5, 5)) == (1, 2, 3)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=decode) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert 1 <= decoders.peak <= images.DECODE_THREADS and decoders.running == 0
    assert seen and all(name.startswith("esreid-decode") for name in seen)
    assert len(seen) <= images.DECODE_THREADS
    # A small image is decoded by the caller itself.
    seen.clear()
    assert read_image(_png_bytes(Image.new("RGB", (16, 32)))).size == (16, 32)
    assert seen == {threading.current_thread().name}
