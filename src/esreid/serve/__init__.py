"""The gallery service: ``esreid serve`` (FastAPI app under uvicorn, JSON API and a page)."""

from esreid.serve.app import create_app

__all__ = ["create_app"]
