"""Supervised background tasks: what every long-lived loop of a worker runs under.

A background loop (a writer, a listener, a timer) that ends with an unexpected exception
would otherwise vanish silently, and whatever it did (writing audit rows, renewing leases,
applying revocations) would stop with it until the worker restarts. Under a `Supervisor`
the exception is logged once with its traceback, the loop is started again after a backoff
(0.5 s doubling to 30 s, reset once it has run a minute without failing), and the restart is
counted in `RESTARTS` (exported as `neuronetz_background_task_restarts_total{task=...}`).

`stop` cancels the loops, but never a step a loop runs through `finish` (a writer's batch on
its way to Postgres): cut halfway, the batch would be neither written nor kept for the
writer's last flush. `stop` lets such a step end first.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

log = logging.getLogger("neuronetz.tasks")

RESTARTS: Counter[str] = Counter()  # task name -> restarts in this process
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
HEALTHY_AFTER = 60.0  # a run this long without failing resets the backoff
T = TypeVar("T")


class Supervisor:
    """Starts named loops, restarts those that fail, and cancels them all on `stop`.

    >>> supervisor = Supervisor()
    >>> supervisor.start("audit.writer", writer.run)   # inside a running event loop
    >>> await supervisor.stop()
    """

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        self.steps: set[asyncio.Future[Any]] = set()  # run through `finish`, not yet done

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        self.tasks.append(asyncio.create_task(self._supervise(name, loop), name=name))

    def every(self, name: str, seconds: float, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` every `seconds` (the first time after one interval), supervised."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                await self.finish(step())

        self.start(name, loop)

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        clock = asyncio.get_running_loop().time
        delay = FIRST_DELAY
        while True:
            started = clock()
            try:
                await loop()
                return  # a loop that returns by itself has nothing more to do
            except Exception:
                if clock() - started > HEALTHY_AFTER:
                    delay = FIRST_DELAY
                RESTARTS[name] += 1
                log.error("background task failed; restarting it", exc_info=True,
                          extra={"fields": {"task": name, "restart_in_s": delay}})  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(MAX_DELAY, delay * 2)

    async def finish(self, step: Awaitable[T]) -> T:
        """Await `step` in a loop of this supervisor such that `stop` cannot cut it short."""
        future = asyncio.ensure_future(step)
        self.steps.add(future)
        future.add_done_callback(self.steps.discard)
        return await asyncio.shield(future)

    async def stop(self) -> None:
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The steps their loops were in: nobody else will see how they end.
        for outcome in await asyncio.gather(*self.steps, return_exceptions=True):
            if isinstance(outcome, Exception):
                log.error("background step failed while stopping", exc_info=outcome)
