"""Model names, compared the way Ollama compares them.

Ollama stores every model with a tag and looks names up case-insensitively, so `llama3.2`,
`Llama3.2:latest` and `llama3.2:LATEST` are one model (docs/ollama.md §5). Every comparison
in the gateway (allow-lists, backend routing) goes through `normalize`.
"""

from __future__ import annotations

# The longest model name a request may carry (the gateway answers 400 above it). Ollama's own
# bound is 128 bytes for the whole name (`MaxNamePartLen` in `types/model/name.go`), so this
# refuses nothing a backend would serve, and it bounds what a client can write into the usage
# ledger's key and the audit log.
MAX_LENGTH = 256


def normalize(name: str) -> str:
    """`name` lower-cased with `:latest` added when it has no tag.

    >>> normalize("Llama3.2")
    'llama3.2:latest'
    >>> normalize("myhost:5000/ns/lips:code")
    'myhost:5000/ns/lips:code'
    """
    lowered = name.strip().lower()
    # A ':' inside the host part (registry:port/ns/model) is not a tag separator.
    last = lowered.rsplit("/", 1)[-1]
    return lowered if ":" in last else lowered + ":latest"


def is_cloud(name: str) -> bool:
    """True for Ollama's cloud models, which the backend forwards to ollama.com on its owner's
    account: a `cloud` tag or a tag ending in `-cloud` (`gpt-oss:20b-cloud`,
    `qwen3-coder:480b-cloud`, `kimi-k2:cloud`), the suffix rule of Ollama's
    `types/model/name.go`.

    >>> is_cloud("GPT-OSS:20B-Cloud"), is_cloud("llama3.2"), is_cloud("cloud")
    (True, False, False)
    """
    tag = normalize(name).rsplit(":", 1)[-1]
    return tag == "cloud" or tag.endswith("-cloud")
