"""The repository stands alone: its code, tests and documentation cite nothing a reader of the
repository cannot open (notes kept beside the checkout, a developer's home or work directory).
They cite `docs/`, Ollama's source files and issues, RFC sections instead."""

from __future__ import annotations

import re
import subprocess

from tests.support import ROOT

# Documents and paths outside the repository. Split so that this file does not match itself.
OUTSIDE = re.compile(
    "|".join(
        [
            r"\.\./" + "shared",
            *(re.escape(name + ".md") for name in ("DESIGN", "STYLE", "services", "measurements", "ollama-api")),
            *("performance" + "-anchors", "gateway" + "-anchors"),
            "reference" + "/",
            "/" + "work/",
            "/" + "root/",
        ]
    )
)
# Applied migrations cannot change (migrate.py records their checksums), so an old comment
# stays: the README (Database schema) says what it pointed to: invalidation by trigger.
FROZEN = {"migrations/0001_tenants_and_keys.sql:71"}
# Paths inside the container images and the test rootfs, which are the repository's own.
CONTAINER_PATHS = re.compile("/" + r"root/\.(ollama|cache)\b")


def test_nothing_cites_documents_outside_the_repository() -> None:
    where = ["neuronetz", "tests", "build.py", "README.md", "docs", "ops", "migrations", "pyproject.toml", "Dockerfile",
             "docker-compose.yml", "docker-compose.dev.yml"]  # fmt: skip
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *where],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    found = []
    for name in sorted(set(listed.stdout.splitlines())):
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the working tree
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(CONTAINER_PATHS.sub("", line)) and f"{name}:{number}" not in FROZEN:
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "cite docs/, Ollama's sources or an RFC instead:\n" + "\n".join(found)
