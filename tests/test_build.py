"""build.py's command line: what reaches the scripts it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import build


def test_bench_gives_the_options_after_the_names_to_each_script_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[str, list[str]]] = []

    def record(python: Path, script: Path, *options: str, **_: Any) -> None:
        ran.append((script.stem, list(options)))

    monkeypatch.setattr(build, "ensure_venv", lambda *_, **__: Path("python"))
    monkeypatch.setattr(build, "run", record)
    build.bench(["limits", "services", "--repeat", "5"])
    assert ran == [("bench_limits", ["--repeat", "5"]), ("bench_services", ["--repeat", "5"])]
    ran.clear()
    build.bench([])
    assert ran
    assert all(options == [] for _, options in ran)
    assert {"bench_limits", "bench_gateway"} <= {stem for stem, _ in ran}
