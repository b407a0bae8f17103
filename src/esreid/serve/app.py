"""A FastAPI app that searches a gallery index with a query image and explains matches.

Endpoints (all errors are 4xx/5xx with ``{"error": "<one line>"}`` and never stop the server):

- ``GET /``: the page (``static/index.html``).
- ``GET /healthz``: ``{"status": "ok", "gallery_size": N}``.
- ``POST /api/search?k=10`` (multipart ``image``; optional ``camera_not`` (repeatable),
  ``after``, ``before``: the filters of ``esreid search``): ranked matches with ids and
  image URLs.
- ``POST /api/explain`` (multipart ``image``, form ``gallery_id``): CG-RAM overlays as PNG
  data URLs; 404 naming the id when its file is gone.
- ``POST /api/gallery`` (multipart ``image``, one or more, and optional form ``label``: one
  for all images or one per image; ``Authorization: Bearer TOKEN``): adds images to the
  index. Without a token the gallery is read-only.
- ``GET /api/gallery/{id}/image``: a gallery image by its id. Paths never come from a request.

Uploads are read with a size limit and decoded by the one image reader
(:mod:`esreid.data.images`: EXIF orientation, odd modes converted, a pixel limit checked
from the header, too-small images refused, decoded no larger than the model needs, decodes
in flight bounded), in a worker thread. Searches share a lock with additions, so a search
never sees a half-added gallery.

The index file may be written by other processes too (``esreid index add``, another
server): every request first checks whether the file changed on disk and, if so, serves the
new version; an addition takes the index's file lock, re-reads the file if it changed, adds,
and saves atomically (:func:`esreid.search.update_index_file`), so nothing another writer
added is lost. Uploaded images are stored in ``<index>.uploads/`` and recorded relative to
the index file, so the server can start from any directory and the index and its uploads
folder can move together.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, whose
# types are imported inside create_app (fastapi is an optional extra).
import base64
import hmac
import io
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image

from esreid.data.images import MAX_IMAGE_PIXELS, ImageReadError, read_image
from esreid.export import require

STATIC = Path(__file__).parent / "static"
MAX_PIXELS = MAX_IMAGE_PIXELS  # the image reader's limit (decompression bombs)
EXTRA = "serve"
#: How long an addition waits for another process writing the index before a 503.
WRITE_WAIT_SECONDS = 30.0
#: Longest label an upload may carry.
MAX_LABEL_LENGTH = 200

log = logging.getLogger("esreid.serve")


class BadUpload(ValueError):
    """An upload that is not a usable image (or a bad request around it); answered with a
    4xx status (5xx for ``status`` >= 500)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, name: str, max_bytes: int,
                  target: tuple[int, int] | None = None) -> Image.Image:
    """An upright RGB image from uploaded bytes (the one image reader), or
    :class:`BadUpload` saying why.

    Rejects empty and oversized uploads (413), files that are not images or are truncated,
    images whose declared size exceeds :data:`MAX_PIXELS` (decompression bombs, before
    decoding their pixels) and images too small to be a crop. ``target`` (the model's input
    height, width) lets a much larger image decode smaller. The client's file name appears
    only in messages, reduced to its base name.
    """
    label = os.path.basename(name or "upload")[:80] or "upload"
    if not data:
        raise BadUpload(f"{label}: the upload is empty")
    if len(data) > max_bytes:
        raise BadUpload(f"{label}: the upload is {len(data):,} bytes, over the limit of "
                        f"{max_bytes:,}", status=413)
    try:
        return read_image(data, name=label, target=target)
    except ImageReadError as err:
        reason = str(err).removeprefix(f"cannot read image {label}: ")
        if "pixels" in reason and ("limit" in reason or "minimum" in reason):
            raise BadUpload(f"{label}: {reason}") from err
        raise BadUpload(f"{label}: not a readable image ({reason})") from err


def _check_labels(labels: list[str] | None, count: int) -> list[str | None]:
    """One label per image from the form's ``label`` fields (none, one for all, or one
    each), or :class:`BadUpload` naming the problem."""
    if not labels:
        return [None] * count
    if len(labels) not in (1, count):
        raise BadUpload(f"label: got {len(labels)} labels for {count} images; send one for "
                        "all of them or one per image")
    cleaned = []
    for label in labels:
        text = label.strip()
        if not text:
            raise BadUpload("label: a label must not be empty")
        if len(text) > MAX_LABEL_LENGTH:
            raise BadUpload(f"label: {len(text)} characters, over the limit of {MAX_LABEL_LENGTH}")
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise BadUpload("label: control characters (newlines, tabs) are not allowed")
        cleaned.append(text)
    return cleaned * count if len(cleaned) == 1 else cleaned


def _png_data_url(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class GalleryFileMissing(KeyError):
    """A gallery id whose image file is no longer on disk."""


class IndexUnavailable(RuntimeError):
    """The index file now on disk cannot be served by this server (another model built
    it); answered with 503 until the server is restarted."""


class GalleryService:
    """The state behind the app: the index (kept in step with its file), the model, the
    locks and the upload folder."""

    def __init__(self, index_path: str | os.PathLike, model: Any = None,
                 token: str | None = None, max_upload_bytes: int = 10 * 2**20,
                 write_wait: float = WRITE_WAIT_SECONDS) -> None:
        from esreid.search import GalleryIndex

        self.path = Path(os.path.expandvars(os.fspath(index_path))).expanduser().absolute()
        self.index = GalleryIndex.load(self.path)
        if model is None:
            from esreid.inference import ReIDModel

            if not self.index.model_path:
                raise ValueError(f"{self.index.source} does not record its model: pass "
                                 "--checkpoint or --onnx")
            path = self.index.model_path
            model = (ReIDModel.from_onnx(path) if path.endswith(".onnx")
                     else ReIDModel.from_checkpoint(path))
        self.index.check_model(model.identity, f"the model {model.source}")
        self.model = model
        self.token = token or None
        self.max_upload_bytes = int(max_upload_bytes)
        self.write_wait = float(write_wait)
        self.uploads = self.path.with_name(self.path.name + ".uploads")
        self.lock = threading.RLock()  # the index: searches never see a half-done addition
        # The model: CG-RAM hooks a layer for the duration of an explanation, which must not
        # meet a concurrent embedding's forward pass.
        self.model_lock = threading.Lock()
        self._bad_version: tuple | None = None  # a version of the file that failed to load
        self._unavailable: str | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        """The model's input (height, width): uploads decode no larger than they need."""
        return int(self.model.height), int(self.model.width)

    def decode(self, data: bytes, name: str) -> Image.Image:
        """An uploaded image, decoded (see :func:`decode_upload`)."""
        return decode_upload(data, name, self.max_upload_bytes, self.input_size)

    def current(self):
        """The index as the file on disk holds it now: reloaded when another process saved
        a new version (a version that cannot be read is logged and the last good one kept;
        one built by another model makes requests fail with :class:`IndexUnavailable`)."""
        from esreid.search import GalleryIndex, IndexFileError, IndexMismatchError
        from esreid.search.index import file_signature

        with self.lock:
            if self.index.changed_on_disk():
                version = file_signature(self.path)
                if version is None:
                    if self._bad_version != "missing":
                        log.warning("%s is gone; serving the last version read", self.path)
                        self._bad_version = "missing"
                elif version != self._bad_version:
                    try:
                        fresh = GalleryIndex.load(self.path)
                        fresh.check_model(self.model.identity, f"the model {self.model.source}")
                    except IndexMismatchError as err:
                        self._unavailable = f"{err}; restart esreid serve with that model"
                        self._bad_version = version
                    except (IndexFileError, OSError) as err:
                        log.warning("cannot read the new version of %s (%s); serving the "
                                    "last version read", self.path, err)
                        self._bad_version = version
                    else:
                        self.index, self._unavailable, self._bad_version = fresh, None, None
            if self._unavailable is not None:
                raise IndexUnavailable(self._unavailable)
            return self.index

    def embed(self, images: list) -> np.ndarray:
        """Descriptors of ``images`` (one model call at a time)."""
        with self.model_lock:
            return self.model.embed(images)

    def search(self, image: Image.Image, k: int, flt: Any = None) -> dict[str, Any]:
        """Ranked matches of a query image among the items ``flt`` (a
        :class:`esreid.search.SearchFilter`, default none) keeps."""
        features = self.embed([image])
        with self.lock:
            index = self.current()
            (matches,) = index.search(features, top_k=k, model_id=self.model.identity,
                                      filter=flt)
            threshold = index.threshold
        return {"matches": [{**m.to_dict(), "id": m.index,
                             "image_url": f"/api/gallery/{m.index}/image"} for m in matches],
                "threshold": threshold}

    def size(self) -> int:
        """The number of gallery images now."""
        with self.lock:
            return self.current().count

    def gallery_path(self, gallery_id: int) -> str:
        """The file of gallery item ``gallery_id``; KeyError when there is none."""
        with self.lock:
            index = self.current()
            if not 0 <= gallery_id < index.count:
                raise KeyError(gallery_id)
            return index.file_path(gallery_id)

    def explain(self, image: Image.Image, gallery_id: int) -> dict[str, Any]:
        """CG-RAM overlays of the query and one gallery image, as PNG data URLs;
        :class:`GalleryFileMissing` when that image's file is gone."""
        from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        from esreid.saliency import denormalize, overlay_heatmap

        path = self.gallery_path(gallery_id)
        if not os.path.isfile(path):
            raise GalleryFileMissing(gallery_id)
        with self.model_lock:
            q_map, g_map = self.model.explain(image, path)
        pictures = []
        for item, saliency in ((image, q_map), (path, g_map)):
            rgb = denormalize(self.model.preprocess(item)[0], IMAGENET_MEAN, IMAGENET_STD)
            pictures.append(_png_data_url(overlay_heatmap(rgb, saliency)))
        distance = self._distance(image, path)
        with self.lock:
            threshold = self.current().threshold
        return {"query": pictures[0], "gallery": pictures[1], "distance": distance,
                "same": None if threshold is None else bool(distance <= threshold)}

    def _distance(self, image: Image.Image, path: str) -> float:
        # Re-embedding the one gallery image gives its stored descriptor (same model, same
        # transform) without copying the index's features.
        from esreid.metrics import compute_distance

        pair = self.embed([image, path])
        return float(compute_distance(pair[:1], pair[1:], metric=self.index.metric)[0, 0])

    def add(self, uploads: list[tuple[str, bytes]], labels: list[str] | None = None
            ) -> dict[str, Any]:
        """Validate, store and embed uploaded images, then add them to the index file
        (holding its lock, re-reading it if another process changed it) and save it
        atomically; nothing is added unless every upload is a readable image and the
        labels fit (none, one for all, or one per image)."""
        from esreid.locking import LockBusyError
        from esreid.search import update_index_file
        from esreid.utils import atomic_write

        images = [self.decode(data, name) for name, data in uploads]
        labels = _check_labels(labels, len(images))
        self.uploads.mkdir(parents=True, exist_ok=True)
        stored, files = [], []
        try:
            for image in images:
                # A generated name: nothing of the client's file name reaches the file system.
                name = f"{uuid.uuid4().hex}.png"
                path = self.uploads / name
                atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
                files.append(path)
                # Relative to the index's folder: valid from any working directory, and
                # after the index and its uploads folder move together.
                stored.append(f"{self.uploads.name}/{name}")
            features = self.embed(images)

            def append(index) -> int:
                first = index.count
                index.add(features, stored, labels, model_id=self.model.identity)
                return first

            with self.lock:
                self.current()  # refuses (503) when the file is another model's
                try:
                    index, first = update_index_file(self.path, append, base=self.index,
                                                     timeout=self.write_wait)
                except BaseException:
                    self.index.signature = None  # may hold the failed rows: re-read the file
                    raise
                self.index = index
                size = index.count
        except LockBusyError as err:
            _remove(files)
            raise BadUpload(f"{err}; try again later", status=503) from err
        except BaseException:
            _remove(files)
            raise
        return {"added": [{"id": first + i, "path": index.resolve_path(p), "label": label}
                          for i, (p, label) in enumerate(zip(stored, labels, strict=True))],
                "gallery_size": size}


def _remove(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError:
            pass


def create_app(index_path: str | os.PathLike, model: Any = None, token: str | None = None,
               max_upload_bytes: int = 10 * 2**20, max_k: int = 100):
    """The FastAPI app serving ``index_path`` (see the module docstring). ``model`` defaults
    to the one recorded in the index; ``token`` enables ``POST /api/gallery``."""
    fastapi = require("fastapi", EXTRA)
    require("python_multipart", EXTRA)  # FastAPI needs it to read uploads
    from fastapi import File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    service = GalleryService(index_path, model, token, max_upload_bytes)
    app = fastapi.FastAPI(title="esreid", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)

    @app.exception_handler(BadUpload)
    async def _bad_upload(request: Request, exc: BadUpload) -> JSONResponse:
        return error(exc.status, str(exc))

    @app.exception_handler(IndexUnavailable)
    async def _unavailable(request: Request, exc: IndexUnavailable) -> JSONResponse:
        return error(503, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "request"
        return error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, exc.detail)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}")

    async def read_upload(upload: UploadFile) -> tuple[str, bytes]:
        # Read one byte past the limit: enough to know it is too large without reading all.
        data = await upload.read(service.max_upload_bytes + 1)
        return upload.filename or "upload", data

    def missing(gallery_id: int) -> JSONResponse:
        return error(404, f"gallery image {gallery_id} is no longer on disk (its file was "
                          "moved or deleted)")

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "gallery_size": service.size()}

    @app.post("/api/search")
    async def search(image: Annotated[UploadFile, File()],
                     k: Annotated[int, Query(ge=1, le=max_k)] = 10,
                     camera_not: Annotated[list[str] | None, Query()] = None,
                     after: Annotated[str | None, Query()] = None,
                     before: Annotated[str | None, Query()] = None):
        from esreid.search import SearchFilter

        try:
            flt = SearchFilter.make(camera_not, after, before)
        except ValueError as err:
            return error(400, str(err))
        name, data = await read_upload(image)
        # Decoding is heavy (large images): a worker thread, never the event loop.
        query = await _in_thread(service.decode, data, name)
        return await _in_thread(service.search, query, k, flt)

    @app.post("/api/explain")
    async def explain(image: Annotated[UploadFile, File()], gallery_id: Annotated[int, Form()]):
        name, data = await read_upload(image)
        query = await _in_thread(service.decode, data, name)
        try:
            return await _in_thread(service.explain, query, gallery_id)
        except GalleryFileMissing:
            return missing(gallery_id)
        except KeyError:
            return error(404, f"no gallery image with id {gallery_id}")

    @app.post("/api/gallery")
    async def add(request: Request, image: Annotated[list[UploadFile], File()],
                  label: Annotated[list[str] | None, Form()] = None):
        if service.token is None:
            return error(403, "the gallery is read-only: start the server with --token to allow additions")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), service.token.encode()):
            return error(401, "missing or wrong token (send Authorization: Bearer TOKEN)")
        uploads = [await read_upload(u) for u in image]
        return await _in_thread(service.add, uploads, label)

    @app.get("/api/gallery/{gallery_id}/image")
    def gallery_image(gallery_id: int):
        try:
            path = service.gallery_path(gallery_id)
        except KeyError:
            return error(404, f"no gallery image with id {gallery_id}")
        if not os.path.isfile(path):
            return missing(gallery_id)
        return FileResponse(path)

    return app


async def _in_thread(fn, *args):
    """Run blocking model work off the event loop, so health checks stay answered."""
    import anyio

    return await anyio.to_thread.run_sync(fn, *args)
