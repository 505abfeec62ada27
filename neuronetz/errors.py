"""The error tree: every failure a client can see, with its status, code and both dialects.

Handlers raise a `GatewayError` subclass; `app.py` renders it once, in the dialect of the
path the client called: `/v1/*` gets OpenAI's `{"error": {"message", "type", "code",
"param"}}`, everything else Ollama's `{"error": "message"}` (DESIGN.md, HTTP).
"""

from __future__ import annotations

import math

import orjson


class GatewayError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        # Retry-After takes whole seconds (RFC 9110 §10.2.3); round up so a client that
        # obeys it never comes back before the limiter would admit it.
        return [(b"retry-after", str(max(1, math.ceil(self.retry_after))).encode())]

    def body(self, openai_dialect: bool) -> bytes:
        if openai_dialect:
            return orjson.dumps(
                {"error": {"message": self.message, "type": self.type, "code": self.code, "param": None}}
            )
        return orjson.dumps({"error": self.message})


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", b"Bearer"), *super().headers()]


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"allow", ", ".join(self.allowed).encode())]


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExceeded(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "budget_exceeded"


class BadGateway(GatewayError):
    status = 502
    code = "backend_error"


class ServiceUnavailable(GatewayError):
    status = 503
    code = "service_unavailable"


class GatewayTimeout(GatewayError):
    status = 504
    code = "backend_timeout"
