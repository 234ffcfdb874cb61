"""The annotation web app (FastAPI): one page plus a small JSON API over an AnnotationSession.

Safe by default, as Jupyter is: the server binds to 127.0.0.1 and every request must carry a
random token (``?token=`` in the URL the CLI prints, then a same-site cookie, or an
``X-Token`` header). Image ids are looked up, never used as paths; class ids are range-checked;
request bodies are capped.
"""

from __future__ import annotations

import secrets
from importlib import resources
from typing import Optional
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from al.annotate.session import AnnotationError, AnnotationSession

TOKEN_COOKIE = "al_annotate_token"
MAX_BODY_BYTES = 4096


class Query(BaseModel):
    image_id: str = Field(max_length=512)
    row: int = Field(ge=0, strict=True)  # strict: true, 1.5 or "3" is an error, not a pixel
    col: int = Field(ge=0, strict=True)


class Answer(Query):
    class_id: Optional[int] = Field(default=None, strict=True)  # None = unsure (void)


def _error(request: Request, status: int, message: str) -> Response:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": message}, status_code=status)
    page = (f"<!doctype html><title>Error {status}</title><h1>Error {status}</h1><p>{_escape(message)}</p>")
    return HTMLResponse(page, status_code=status)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for bodies above ``limit`` bytes, declared or streamed."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(send)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send):
        body = f'{{"detail": "request body larger than {self.limit} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(session: AnnotationSession, token: Optional[str] = None) -> FastAPI:
    """The app; ``app.state.token`` holds the access token (random unless given)."""
    app = FastAPI(title="al annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.token = token or secrets.token_urlsafe(24)
    page = resources.files("al.annotate").joinpath("static/index.html").read_text()

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        given = request.query_params.get("token") or request.headers.get("x-token") or request.cookies.get(TOKEN_COOKIE)
        if not given or not secrets.compare_digest(given.encode(), app.state.token.encode()):
            return _error(request, 403, "missing or wrong access token: open the URL that scripts/annotate.py "
                                        "printed (it ends in ?token=...)")
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            # defence in depth beside the token: a state change comes from this page's own origin only
            return _error(request, 403, f"requests from origin {origin!r} are refused; use the page this server serves")
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, app.state.token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(AnnotationError)
    async def annotation_error(request: Request, error: AnnotationError):
        return _error(request, error.status, str(error))

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/api/state")
    def state():
        return {"classes": session.classes_info(), "void_index": session.void_index, **session.progress()}

    @app.get("/api/images/{image_id}")
    def image(image_id: str):
        return session.image_info(image_id)

    @app.get("/api/images/{image_id}/image.png")
    def image_png(image_id: str):
        return Response(session.image_png(image_id), media_type="image/png")

    @app.get("/api/images/{image_id}/prediction.png")
    def prediction_png(image_id: str):
        return Response(session.prediction_png(image_id), media_type="image/png")

    @app.post("/api/answers")
    def answer(body: Answer):
        return session.answer(body.image_id, body.row, body.col, body.class_id)

    @app.post("/api/undo")
    def undo(body: Query):
        return session.undo(body.image_id, body.row, body.col)

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    return app
