"""Every failure as OpenAI's error JSON with its status: APIError from serving, invalid requests (400
naming the field), unknown routes (404) and anything unexpected (500, logged with the request id)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.middleware import request_id
from models import ErrorBody, ErrorResponse
from serving.errors import APIError

logger = logging.getLogger("batchwise.api")


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    param = ".".join(location) or None
    message = str(first.get("msg", "")).removeprefix("Value error, ")
    return (f"Invalid value for '{param}': {message}" if param else f"Invalid request: {message}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        log = logger.error if error.status >= 500 else logger.info
        log("request %s failed with %d: %s", request_id(request), error.status, error.message)
        return error_response(error.status, error.message, error.type, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error)
        logger.info("request %s rejected: %s", request_id(request), message)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return error_response(404, f"Unknown route {request.method} {request.url.path}", "not_found_error")
        return error_response(error.status_code, str(error.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request %s failed unexpectedly", request_id(request), exc_info=error)
        return error_response(500, f"Internal server error (request id {request_id(request)})", "server_error")
