"""The one mapping from typed errors to HTTP responses, in each public API's shape."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from serve.errors import AtelierError, InvalidField, RouteError

RETRY_AFTER_S = 1

# Each public API answers errors in its own shape, chosen by path prefix.
_OPENAI_PREFIXES = ("/v1/images",)
_REPLICATE_PREFIXES = ("/v1/predictions", "/v1/models/", "/v1/files", "/v1/deployments",
                       "/v1/account", "/v1/webhooks", "/v1/hardware", "/v1/collections",
                       "/v1/trainings")


def error_response(path: str, exc: AtelierError) -> JSONResponse:
    """The response for `exc` in the shape of the API that `path` belongs to."""
    retry_after_s = getattr(exc, "retry_after_s", RETRY_AFTER_S)
    headers = {"Retry-After": str(retry_after_s)} if exc.status in (429, 503) else None
    if exc.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if path.startswith(_OPENAI_PREFIXES):
        status = 400 if exc.status == 422 else exc.status
        return JSONResponse(openai_error(exc), status_code=status, headers=headers)
    if path.startswith(_REPLICATE_PREFIXES):
        return JSONResponse(_replicate_body(exc), status_code=exc.status, headers=headers,
                            media_type="application/problem+json")
    return JSONResponse({"detail": exc.detail()}, status_code=exc.status, headers=headers)


def openai_error(exc: AtelierError) -> dict:
    """`exc` as OpenAI's API describes an error (the body of an error answer or event)."""
    param = exc.field if isinstance(exc, InvalidField) and exc.field else None
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    if exc.status == 401:
        kind = "authentication_error"
    return {"error": {"message": exc.message, "type": kind, "param": param, "code": exc.kind}}


def _replicate_body(exc: AtelierError, fields: list[dict] | None = None) -> dict:
    """Problem details, as Replicate answers, with `invalid_fields` for bad input."""
    body = {"type": exc.kind, "title": exc.kind.replace("_", " ").capitalize(),
            "status": exc.status, "detail": exc.message}
    if fields is None and isinstance(exc, InvalidField) and exc.field:
        fields = [{"type": "invalid", "field": exc.field, "description": exc.reason}]
    if fields:
        body["invalid_fields"] = fields
    return body


def api_path(request: Request) -> str:
    """The request's path below the app's route prefix (e.g. /v1/images/generations)."""
    root, path = request.scope.get("root_path", ""), request.url.path
    return path[len(root):] if root and path.startswith(root) else path


def install_error_handlers(app: FastAPI) -> None:
    """Register the one mapping from typed errors to HTTP responses."""

    @app.exception_handler(AtelierError)
    async def _atelier(request: Request, exc: AtelierError) -> JSONResponse:
        return error_response(api_path(request), exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _plain_errors(exc.errors())
        path = api_path(request)
        if path.startswith(_REPLICATE_PREFIXES):
            fields = [{"type": e["type"], "field": ".".join(str(p) for p in e["loc"][1:]),
                       "description": e["msg"]} for e in errors]
            problem = InvalidField("", "; ".join(f"{f['field']}: {f['description']}"
                                                 for f in fields))
            return JSONResponse(_replicate_body(problem, fields), status_code=422,
                                media_type="application/problem+json")
        if path.startswith(_OPENAI_PREFIXES):
            first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
            field = str(first["loc"][-1]) if len(first["loc"]) > 1 else ""
            return error_response(path, InvalidField(field, first["msg"]))
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _route(request: Request, exc: HTTPException) -> Response:
        """No such path or method: in the shape of the API whose prefix the path has (as
        OpenAI's and Replicate's clients read errors), FastAPI's own elsewhere."""
        path = api_path(request)
        if not path.startswith(_OPENAI_PREFIXES + _REPLICATE_PREFIXES):
            return await http_exception_handler(request, exc)
        response = error_response(path, RouteError(exc.status_code, str(exc.detail)))
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return response


def _plain_errors(errors: Any) -> list[dict]:
    """Pydantic error dicts reduced to JSON-safe loc/msg/type."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
             "type": str(e.get("type", "value_error"))} for e in errors]
