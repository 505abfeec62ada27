from __future__ import annotations

import pytest

from neuronetz.errors import BadRequest, MethodNotAllowed, NotFound
from neuronetz.http import Request
from neuronetz.router import Route, Router, is_account, is_blocked, normalize_path
from neuronetz.types import Send


async def _nothing(request: Request, send: Send, exchange: object) -> None:
    return None


ROUTER = Router(
    [
        Route("/api/chat", frozenset({"POST"}), _nothing),
        Route("/api/tags", frozenset({"GET", "HEAD"}), _nothing),
        Route("/v1/models/{model}", frozenset({"GET"}), _nothing),
    ]
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/api/chat", "/api/chat"),
        (b"//api///chat/", "/api/chat"),
        (b"/api/./chat", "/api/chat"),
        (b"/v1/../api/chat", "/api/chat"),
        (b"/api/chat;jsessionid=1", "/api/chat"),
        (b"/api%2Fchat", "/api/chat"),
        (b"/api%252Fchat", "/api/chat"),
        (b"/api\\chat", "/api/chat"),
        (b"/api/chat?x=1", "/api/chat"),
        (b"/", "/"),
        (b"/API/Chat", "/API/Chat"),
    ],
)
def test_paths_normalise_to_one_canonical_form(raw: bytes, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"api/chat",
        b"/api/chat%00",
        b"/api/ chat",
        b"/api/chat%20",
        b"/api/\tchat",
        b"/../etc",
        b"/api/ch\xc3\xa4t",
        b"/api/%25252525252Fchat",
        b"/api/chat%0a",
    ],
)
def test_ambiguous_paths_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        normalize_path(raw)


@pytest.mark.parametrize(
    "path",
    [
        "/api/pull",
        "/API/PULL",
        "/api/push",
        "/api/create",
        "/api/copy",
        "/api/delete",
        "/api/blobs",
        "/api/blobs/sha256:abc",
        "/Api/Blobs/x/y",
    ],
)
def test_model_mutating_endpoints_are_blocked_in_any_case(path: str) -> None:
    assert is_blocked(path)


@pytest.mark.parametrize("path", ["/api/chat", "/api/pulls", "/api/blobsy", "/v1/api/pull", "/api"])
def test_other_paths_are_not_blocked(path: str) -> None:
    assert not is_blocked(path)
    assert not is_account(path)


@pytest.mark.parametrize(
    "path",
    ["/api/me", "/API/ME", "/api/signout", "/api/user/keys", "/api/user/keys/c3NoLWVk", "/api/experimental/web_search",
     "/Api/Experimental/Web_Fetch"],
)  # fmt: skip
def test_ollama_account_endpoints_are_recognised_in_any_case(path: str) -> None:
    assert is_account(path)
    assert not is_blocked(path)


@pytest.mark.parametrize("path", ["/api/mes", "/api/user", "/api/experimental/web_searches", "/v1/api/me"])
def test_paths_next_to_account_endpoints_are_not_refused_as_such(path: str) -> None:
    assert not is_account(path)


def test_exact_route_and_method() -> None:
    route, param = ROUTER.resolve("/api/chat", "POST")
    assert route.path == "/api/chat"
    assert param is None


def test_known_path_with_wrong_method_is_405_with_allow() -> None:
    with pytest.raises(MethodNotAllowed) as caught:
        ROUTER.resolve("/api/tags", "POST")
    assert caught.value.status == 405
    assert (b"allow", b"GET, HEAD") in caught.value.headers()


def test_unknown_path_is_404() -> None:
    with pytest.raises(NotFound):
        ROUTER.resolve("/api/nothing", "GET")
    with pytest.raises(NotFound):
        ROUTER.resolve("/API/CHAT", "POST")  # routing is case-sensitive, like Ollama's


def test_parameter_route_captures_the_rest_of_the_path() -> None:
    route, param = ROUTER.resolve("/v1/models/myhost/ns/lips:code", "GET")
    assert route.path == "/v1/models/{model}"
    assert param == "myhost/ns/lips:code"
    with pytest.raises(NotFound):
        ROUTER.resolve("/v1/models/", "GET")
    with pytest.raises(MethodNotAllowed):
        ROUTER.resolve("/v1/models/x", "DELETE")
