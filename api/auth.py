"""API keys: with --api-key, every /v1 route needs `Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac
from typing import Callable

from fastapi import Request

from serving.errors import APIError


def api_key_checker(keys: list[str]) -> Callable[[Request], None]:
    """A FastAPI dependency that lets a request through only with one of the keys (any, when there are none)."""
    encoded = [key.encode() for key in keys]

    def require_api_key(request: Request) -> None:
        if not encoded:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # compare against every key, so the time taken does not tell which (or how much) matched
        matched = [hmac.compare_digest(given, key) for key in encoded]
        if scheme.lower() != "bearer" or not any(matched):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return require_api_key
