"""Token arithmetic on request bodies: a bounded estimate and Ollama's meaning of output caps."""

from __future__ import annotations

from typing import Any

import pytest

from neuronetz.errors import BadRequest
from neuronetz.llm_tokens import MAX_TOKENS, estimate_prompt, requested_cap


def test_the_estimate_counts_text_messages_and_images() -> None:
    body = {"messages": [{"role": "user", "content": "abcdefgh", "images": ["x"]}], "system": "abcd"}
    assert estimate_prompt(body) == 3 + 4 + 768


@pytest.mark.parametrize(
    "body",
    [{"images": ["A"] * 3_000_000}, {"messages": [{"role": "user", "content": "", "images": ["A"] * 20_000}] * 100},
     {"messages": [{"role": "user", "content": [{"type": "image_url"}] * 20_000}]}],
)  # fmt: skip
def test_the_estimate_never_exceeds_the_token_bound(body: dict[str, Any]) -> None:
    assert estimate_prompt(body) == MAX_TOKENS


@pytest.mark.parametrize("value", [0, -1, -2, -(2**70), None])
def test_a_cap_of_zero_or_less_is_no_cap(value: Any) -> None:
    assert requested_cap({"options": {"num_predict": value}}, openai=False, produces_text=True) is None
    assert requested_cap({"max_tokens": value}, openai=True, produces_text=True) is None


def test_a_positive_cap_is_kept_and_embeddings_generate_nothing() -> None:
    assert requested_cap({"options": {"num_predict": 7}}, openai=False, produces_text=True) == 7
    assert requested_cap({"max_tokens": MAX_TOKENS}, openai=True, produces_text=True) == MAX_TOKENS
    assert requested_cap({"max_tokens": 7}, openai=True, produces_text=False) == 0


@pytest.mark.parametrize("value", [True, False, 1.0, 1.5, "5", [5], {"n": 5}, MAX_TOKENS + 1])
def test_a_cap_that_is_not_an_integer_in_range_is_refused(value: Any) -> None:
    with pytest.raises(BadRequest, match="must be an integer"):
        requested_cap({"options": {"num_predict": value}}, openai=False, produces_text=True)
    with pytest.raises(BadRequest, match="'max_tokens'"):
        requested_cap({"max_tokens": value}, openai=True, produces_text=True)
