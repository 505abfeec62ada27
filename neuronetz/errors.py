"""The error tree: every failure a client can see, with its status, code and both dialects.

Handlers raise a `GatewayError` subclass; `app.py` renders it once, in the dialect of the
path the client called: `/v1/*` gets OpenAI's `{"error": {"message", "type", "code",
"param"}}`, everything else Ollama's `{"error": "message"}`.
"""

from __future__ import annotations

import math

import orjson

# The agent dialects (dialects.py), named here because every error is rendered in its caller's.
ANTHROPIC = "anthropic"
RESPONSES = "responses"
# Anthropic's error types by status: the SDK picks its exception class by status, and
# clients read `error.type` (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(openai_dialect: bool, message: str, type_: str, code: str) -> bytes:
    """An error in the caller's dialect: OpenAI's error object or Ollama's `{"error": message}`."""
    if openai_dialect:
        return orjson.dumps({"error": {"message": message, "type": type_, "code": code, "param": None}})
    return orjson.dumps({"error": message})


class GatewayError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str = "internal_error"
    # `x-should-retry`, which both official OpenAI SDKs obey before their own rules (they
    # otherwise retry every 429 and 5xx, sleeping whatever Retry-After says). None: not sent.
    should_retry: bool | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        if should_retry is not None:
            self.should_retry = should_retry

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = []
        if self.retry_after is not None:
            # Retry-After takes whole seconds (RFC 9110 §10.2.3); round up so a client that
            # obeys it never comes back before the limiter would admit it.
            headers.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
        if self.should_retry is not None:
            headers.append((b"x-should-retry", b"true" if self.should_retry else b"false"))
        return headers

    def body(self, openai_dialect: bool) -> bytes:
        return error_body(openai_dialect, self.message, self.type, self.code)


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


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


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
    # A used-up budget comes back at the period's reset, up to a month away: a client that
    # retried (openai-node sleeps any Retry-After) would hang instead of raising.
    should_retry = False


class BadGateway(GatewayError):
    status = 502
    code = "backend_error"


class ServiceUnavailable(GatewayError):
    status = 503
    code = "service_unavailable"


class GatewayTimeout(GatewayError):
    status = 504
    code = "backend_timeout"


def dialect_of(path: str) -> str | None:
    """The dialect of a normalised request path (None: Ollama's own or OpenAI's chat)."""
    if path == "/v1/responses":
        return RESPONSES
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return ANTHROPIC
    return None


def anthropic_body(error: GatewayError) -> bytes:
    """A refusal in Anthropic's shape: `{"type":"error","error":{"type":…,"message":…}}`."""
    kind = _ANTHROPIC_TYPES.get(error.status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": error.message}})
