"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause becomes an :class:`APIError` (a 4xx with
the field that was wrong); an exception that reaches the generic handler is a
bug and is answered 500, still in the same shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from xybrid.errors import (
    ContextOverflowError,
    GenerationError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotLoadedError,
    OverloadedError,
    XybridError,
)

__all__ = ["APIError", "error_body", "from_exception", "install_handlers"]

log = logging.getLogger("xybrid.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "server_unavailable", 500: "server_error"}


class APIError(Exception):
    """An HTTP error with an OpenAI body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_exception(exc: BaseException, retry_after_s: int = 1) -> APIError:
    """The API error for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, OverloadedError):
        return APIError(429, str(exc) or "the server is busy: every slot is taken and the "
                        "queue is full; retry later", code="overloaded",
                        headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, ModelNotLoadedError):
        return APIError(503, str(exc), code="model_not_loaded",
                        headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, ModelNotFoundError):
        return APIError(400, str(exc), code="model_not_found")
    if isinstance(exc, (InvalidInputError, UnicodeError)):
        # InvalidInputError covers GrammarError and UnsupportedInputError; a
        # lone surrogate in a JSON string cannot be encoded for the tokenizer.
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, GenerationError):
        # Includes a tool call the model wrote that does not parse (ToolCallError).
        code = "tool_call_parse_error" if type(exc).__name__ == "ToolCallError" \
            else "generation_failed"
        return APIError(500, f"generation failed: {exc}", code=code)
    if isinstance(exc, XybridError):
        return APIError(500, str(exc), code="engine_error")
    log.error("unhandled error while serving a request", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"``."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}",
                        code="invalid_json").response()
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param is None:
        return APIError(400, "the request needs a JSON body", code="missing_body").response()
    msg = first.get("msg", "invalid value")
    where = f"{param}: " if param else ""
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{where}{msg}{more}", param=param, code="invalid_value").response()


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
        code: str | None = "unknown_route"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
        code = "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return JSONResponse(error_body(message, _TYPES.get(exc.status_code, "invalid_request_error"),
                                   None, code),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


def install_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Answer every error in OpenAI's shape."""

    def api_error(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc, retry_after_s).response()

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(XybridError, api_error)
    app.add_exception_handler(UnicodeError, api_error)
    app.add_exception_handler(Exception, api_error)
