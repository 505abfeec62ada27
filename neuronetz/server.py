"""Starting Granian: the ASGI server that runs `neuronetz.app:app` in worker processes."""

from __future__ import annotations

import os

from neuronetz import config, logs


def serve(settings: config.Settings) -> None:
    """Serve until SIGTERM/SIGINT. Granian then stops accepting, lets in-flight requests
    finish (each worker is killed after GATEWAY_SHUTDOWN_TIMEOUT), runs every worker's
    lifespan shutdown and exits 0."""
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops

    # Workers build their own Settings from the same environment (fork inherits it); the
    # env file chosen on the command line travels with it.
    if settings.env_file is not None:
        os.environ[config.ENV_FILE_VARIABLE] = str(settings.env_file.resolve())
    Granian(
        "neuronetz.app:app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=settings.workers,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        websockets=False,
        backlog=2048,
        log_dictconfig=logs.dictconfig(settings.log_level),
        log_access=False,
        respawn_failed_workers=True,
        workers_kill_timeout=settings.shutdown_timeout,
    ).serve()
