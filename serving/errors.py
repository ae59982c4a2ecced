"""Every failure a request can meet, as one exception carrying its OpenAI error fields and HTTP status;
the HTTP layer turns it into `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from batching import Delta, QueueFullError


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def check_model_name(name: str, served_names: tuple[str, ...], aliases: tuple[str, ...] = ()) -> None:
    if name not in served_names and name not in aliases:
        raise APIError(404, f"The model '{name}' does not exist. Served models: {', '.join(served_names)}",
                       param="model", code="model_not_found")


def check_error(delta: Delta) -> None:
    if delta.finish_reason == "error":
        raise APIError(500, f"the engine failed while generating this response: {delta.error}", type="server_error")


def server_busy(error: QueueFullError) -> APIError:
    return APIError(429, f"{error}; retry shortly", type="rate_limit_exceeded", code="rate_limit_exceeded",
                    headers={"Retry-After": "1"})


def timeout_error(seconds: float | None) -> APIError:
    return APIError(408, f"the request did not finish within the server's {seconds:g} s request timeout",
                    type="timeout_error", code="request_timeout")
