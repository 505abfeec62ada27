"""``Emulator``: the server on a background thread with its own event loop, driven from test code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from .config import Config
from .faults import Fault
from .registry import ModelSpec
from .server import Server, new_event_loop
from .state import Cancellation, RecordedRequest, State, Stats


class Emulator:
    """A faithful fake Ollama on ``127.0.0.1`` and a free port.

    Every method is safe to call from any thread, including while requests run::

        with Emulator() as emu:
            emu.inject("drop", after_tokens=3, model="tiny")
            httpx.post(f"{emu.url}/api/chat", json=...)
            assert emu.requests("/api/chat")[0].json()["model"] == "tiny"
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        models: Iterable[ModelSpec] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.state = State(config, models)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> Emulator:
        self._thread = threading.Thread(target=self._run, name="ollama-emulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise RuntimeError(f"the emulator could not listen on {self.host}:{self.port}") from self._failure
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = new_event_loop()
        server = Server(self.state)
        try:
            self.port = loop.run_until_complete(server.start(self.host, self.port))
        except OSError as exc:
            self._failure = exc
            loop.close()
            self._ready.set()
            return
        self._loop = loop
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._shutdown(server))
        loop.close()

    @staticmethod
    async def _shutdown(server: Server) -> None:
        """Cut every connection and cancel what is still running (stalls, slow streams)."""
        await server.stop()
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()

    # Records
    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        """Requests received (all, or those to ``path``), oldest first. Control requests are not recorded."""
        return self.state.requests(path)

    def clear_requests(self) -> None:
        self.state.clear_requests()

    def wait_for_cancellations(self, count: int = 1, timeout: float = 1.0) -> list[Cancellation]:
        return self.state.wait_for_cancellations(count, timeout)

    def stats(self) -> Stats:
        return self.state.stats()

    # Faults
    def inject(self, fault: Fault | str, **fields: Any) -> Fault:
        """Arm a fault: ``inject(Fault(...))`` or ``inject("error", after_tokens=2, model="tiny")``."""
        armed = fault if isinstance(fault, Fault) else Fault(fault, **fields)
        self.state.faults.add(armed)
        return armed

    def clear_faults(self) -> None:
        self.state.faults.clear()

    # Config
    def configure(self, **changes: Any) -> Config:
        """Change settings for requests that arrive from now on, e.g. ``configure(token_delay_ms=20)``."""
        return self.state.configure(changes)

    # Models
    def add_model(self, spec: ModelSpec | str, **fields: Any) -> ModelSpec:
        """Install a model: ``add_model(ModelSpec(...))`` or ``add_model("m", capabilities=("completion",))``."""
        model = spec if isinstance(spec, ModelSpec) else ModelSpec(spec, **fields)
        self.state.registry.put(model)
        return model

    def set_models(self, specs: Iterable[ModelSpec]) -> None:
        """Replace the whole registry (and forget what was loaded)."""
        self.state.registry.replace(specs)

    def reset(self) -> None:
        """Back to how it started: config, models, no faults, records or loaded models."""
        self.state.reset()
