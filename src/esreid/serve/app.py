"""A FastAPI app that searches a gallery index with a query image and explains matches.

Endpoints (all errors are 4xx with ``{"error": "<one line>"}`` and never stop the server):

- ``GET /``: the page (``static/index.html``).
- ``GET /healthz``: ``{"status": "ok", "gallery_size": N}``.
- ``POST /api/search?k=10`` (multipart ``image``): ranked matches with ids and image URLs.
- ``POST /api/explain`` (multipart ``image``, form ``gallery_id``): CG-RAM overlays as PNG
  data URLs.
- ``POST /api/gallery`` (multipart ``image``, one or more; ``Authorization: Bearer TOKEN``):
  adds images to the index, saved atomically. Without a token the gallery is read-only.
- ``GET /api/gallery/{id}/image``: a gallery image by its id. Paths never come from a request.

Uploads are read with a size limit, decoded with a pixel limit (decompression bombs) and
fully verified before use. Searches share a lock with additions, so a search never sees a
half-added gallery.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, whose
# types are imported inside create_app (fastapi is an optional extra).
import base64
import hmac
import io
import os
import threading
import uuid
import warnings
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image

from esreid.export import require

STATIC = Path(__file__).parent / "static"
MAX_PIXELS = 40_000_000  # well above any re-ID crop, far below a decompression bomb
EXTRA = "serve"


class BadUpload(ValueError):
    """An upload that is not a usable image; answered with a 4xx status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, name: str, max_bytes: int) -> Image.Image:
    """A fully decoded RGB image from uploaded bytes, or :class:`BadUpload` saying why.

    Rejects empty and oversized uploads (413), files that are not images or are truncated,
    and images whose declared size exceeds :data:`MAX_PIXELS` (decompression bombs), before
    decoding their pixels.
    """
    label = os.path.basename(name or "upload")[:80] or "upload"
    if not data:
        raise BadUpload(f"{label}: the upload is empty")
    if len(data) > max_bytes:
        raise BadUpload(f"{label}: the upload is {len(data):,} bytes, over the limit of "
                        f"{max_bytes:,}", status=413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if width * height > MAX_PIXELS:
                    raise BadUpload(f"{label}: {width}x{height} pixels is over the limit of "
                                    f"{MAX_PIXELS:,} pixels")
                probe.verify()
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
    except BadUpload:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadUpload(f"{label}: image too large to decode ({err})") from err
    except Exception as err:  # PIL raises many types for broken files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadUpload(f"{label}: not a readable image ({reason})") from err


def _png_data_url(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class GalleryService:
    """The state behind the app: the index, the model, the lock and the upload folder."""

    def __init__(self, index_path: str | os.PathLike, model: Any = None,
                 token: str | None = None, max_upload_bytes: int = 10 * 2**20) -> None:
        from esreid.search import GalleryIndex

        self.index = GalleryIndex.load(index_path)
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
        self.uploads = Path(str(self.index.source) + ".uploads")
        self.lock = threading.RLock()  # the index: searches never see a half-done addition
        # The model: CG-RAM hooks a layer for the duration of an explanation, which must not
        # meet a concurrent embedding's forward pass.
        self.model_lock = threading.Lock()

    def embed(self, images: list) -> np.ndarray:
        """Descriptors of ``images`` (one model call at a time)."""
        with self.model_lock:
            return self.model.embed(images)

    def search(self, image: Image.Image, k: int) -> dict[str, Any]:
        """Ranked matches of a query image."""
        features = self.embed([image])
        with self.lock:
            (matches,) = self.index.search(features, top_k=k, model_id=self.model.identity)
            threshold = self.index.threshold
        return {"matches": [{**m.to_dict(), "id": m.index,
                             "image_url": f"/api/gallery/{m.index}/image"} for m in matches],
                "threshold": threshold}

    def gallery_path(self, gallery_id: int) -> str:
        """The file of gallery item ``gallery_id``; KeyError when there is none."""
        with self.lock:
            if not 0 <= gallery_id < self.index.count:
                raise KeyError(gallery_id)
            return self.index.paths[gallery_id]

    def explain(self, image: Image.Image, gallery_id: int) -> dict[str, Any]:
        """CG-RAM overlays of the query and one gallery image, as PNG data URLs."""
        from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        from esreid.saliency import denormalize, overlay_heatmap

        path = self.gallery_path(gallery_id)
        with self.model_lock:
            q_map, g_map = self.model.explain(image, path)
        pictures = []
        for item, saliency in ((image, q_map), (path, g_map)):
            rgb = denormalize(self.model.preprocess(item)[0], IMAGENET_MEAN, IMAGENET_STD)
            pictures.append(_png_data_url(overlay_heatmap(rgb, saliency)))
        distance = self._distance(image, path)
        with self.lock:
            threshold = self.index.threshold
        return {"query": pictures[0], "gallery": pictures[1], "distance": distance,
                "same": None if threshold is None else bool(distance <= threshold)}

    def _distance(self, image: Image.Image, path: str) -> float:
        # Re-embedding the one gallery image gives its stored descriptor (same model, same
        # transform) without copying the index's features.
        from esreid.metrics import compute_distance

        pair = self.embed([image, path])
        return float(compute_distance(pair[:1], pair[1:], metric=self.index.metric)[0, 0])

    def add(self, uploads: list[tuple[str, bytes]]) -> dict[str, Any]:
        """Validate, store and embed uploaded images, then add them to the index and save it
        atomically; nothing is added unless every upload is a readable image."""
        images = [(decode_upload(data, name, self.max_upload_bytes), data) for name, data in uploads]
        self.uploads.mkdir(parents=True, exist_ok=True)
        from esreid.utils import atomic_write

        paths = []
        for image, _ in images:
            # A generated name: nothing of the client's file name reaches the file system.
            path = self.uploads / f"{uuid.uuid4().hex}.png"
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            paths.append(str(path))
        features = self.embed([image for image, _ in images])
        with self.lock:
            first = self.index.count
            self.index.add(features, paths, [None] * len(paths), model_id=self.model.identity)
            self.index.save()
            size = self.index.count
        return {"added": [{"id": first + i, "path": p} for i, p in enumerate(paths)],
                "gallery_size": size}


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

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        with service.lock:
            return {"status": "ok", "gallery_size": service.index.count}

    @app.post("/api/search")
    async def search(image: Annotated[UploadFile, File()],
                     k: Annotated[int, Query(ge=1, le=max_k)] = 10):
        name, data = await read_upload(image)
        query = decode_upload(data, name, service.max_upload_bytes)
        return await _in_thread(service.search, query, k)

    @app.post("/api/explain")
    async def explain(image: Annotated[UploadFile, File()], gallery_id: Annotated[int, Form()]):
        name, data = await read_upload(image)
        query = decode_upload(data, name, service.max_upload_bytes)
        try:
            return await _in_thread(service.explain, query, gallery_id)
        except KeyError:
            return error(404, f"no gallery image with id {gallery_id}")

    @app.post("/api/gallery")
    async def add(request: Request, image: Annotated[list[UploadFile], File()]):
        if service.token is None:
            return error(403, "the gallery is read-only: start the server with --token to allow additions")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), service.token.encode()):
            return error(401, "missing or wrong token (send Authorization: Bearer TOKEN)")
        uploads = [await read_upload(u) for u in image]
        return await _in_thread(service.add, uploads)

    @app.get("/api/gallery/{gallery_id}/image")
    def gallery_image(gallery_id: int):
        try:
            path = service.gallery_path(gallery_id)
        except KeyError:
            return error(404, f"no gallery image with id {gallery_id}")
        if not os.path.isfile(path):
            return error(404, f"gallery image {gallery_id} is no longer on disk")
        return FileResponse(path)

    return app


async def _in_thread(fn, *args):
    """Run blocking model work off the event loop, so health checks stay answered."""
    import anyio

    return await anyio.to_thread.run_sync(fn, *args)
