"""A real Ollama server for the tests in this directory: finding one, starting it, giving it the
tiny models.

Where the server comes from, first match wins:

1. a ``shared/ollama/`` folder beside the repository holding ``ollama-*-linux-amd64.xz`` (CI): the binary is
   unpacked once into ``.build/ollama-<checksum>/`` and started here.
2. An ``ollama`` on PATH: started here the same way (a private port, a private model store).
3. ``NEURONETZ_TEST_OLLAMA_URL``: an Ollama someone else runs; it is used as it is, and the tiny
   models are added to it.

The models (``tiny``: never ends a reply by itself; ``tiny-eos``: does; ``tiny-embed``: 64-dim
embeddings) are registered from the GGUF files and Modelfiles in the shared folder, or in
``NEURONETZ_TEST_OLLAMA_GGUF_DIR``, through the same two calls `ollama create` makes (a blob
upload, then ``POST /api/create``: Ollama's ``server/create.go``).
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.support import ROOT, free_port

SHARED = ROOT.parent / "shared" / "ollama"
MODELS = ("tiny", "tiny-eos", "tiny-embed")
HOW_TO_ENABLE = (
    "no Ollama for the real-Ollama tier: put `ollama` on PATH or set NEURONETZ_TEST_OLLAMA_URL (README, Development)"
)


class Unavailable(Exception):
    """What the tier needs is not on this machine; the message says what and how to get it."""


def gguf_dir() -> Path | None:
    """Where the tiny models' GGUF files and Modelfiles are, if anywhere."""
    configured = os.environ.get("NEURONETZ_TEST_OLLAMA_GGUF_DIR")
    for directory in [Path(configured)] if configured else [SHARED]:
        if all((directory / f"Modelfile.{name}").is_file() for name in MODELS):
            return directory
    return None


def _unpacked_binary() -> Path | None:
    """The shared folder's binary, unpacked under .build (gitignored) and keyed by the archive's
    checksum, so later runs and parallel test workers reuse it."""
    archives = sorted(SHARED.glob("ollama-*-linux-amd64.xz"))
    if not archives:
        return None
    archive = archives[-1]
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    target = ROOT / ".build" / f"ollama-{digest}" / "ollama"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Unpack beside the target and rename: another worker may be doing the same right now.
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".ollama-")
        with os.fdopen(fd, "wb") as out, lzma.open(archive) as source:
            shutil.copyfileobj(source, out)
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    return target


def find_binary() -> Path | None:
    unpacked = _unpacked_binary()
    if unpacked is not None:
        return unpacked
    found = shutil.which("ollama")
    return Path(found) if found else None


class OllamaServer:
    """One `ollama serve` on a free loopback port, with a model store and HOME of its own
    (`serve` writes a key pair under HOME/.ollama), stopped with its runner processes."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="neuronetz-ollama-"))
        self.log_path = self.dir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> OllamaServer:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "OLLAMA_HOST": f"127.0.0.1:{self.port}",
            "OLLAMA_MODELS": str(self.dir / "models"),
            "OLLAMA_NO_CLOUD": "1",
        }
        with self.log_path.open("wb") as log:
            # A session of its own: the runner processes `serve` starts die with it in stop().
            self.process = subprocess.Popen(
                [str(self.binary), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/api/version", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        log_text = self.log()
        self.stop()
        raise RuntimeError(f"ollama serve did not start:\n{log_text[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the server and its runners: a backend that vanishes."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process is not None:
            # Runners left behind by a server that died first.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> OllamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _modelfile(path: Path) -> tuple[str, str | None, dict[str, float | int | str]]:
    """(GGUF file name, template, parameters) of the simple Modelfiles the tiny models use."""
    text = path.read_text()
    source = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE)
    if source is None:
        raise Unavailable(f"{path} has no FROM line")
    template = re.search(r'^TEMPLATE\s+"""(.*?)"""', text, re.MULTILINE | re.DOTALL)
    parameters: dict[str, float | int | str] = {}
    for name, value in re.findall(r"^PARAMETER\s+(\S+)\s+(.+?)\s*$", text, re.MULTILINE):
        number = re.fullmatch(r"-?\d+(\.\d+)?", value)
        parameters[name] = (float(value) if number.group(1) else int(value)) if number else value
    return Path(source.group(1)).name, template.group(1) if template else None, parameters


def register_models(url: str, directory: Path) -> None:
    """Create the tiny models on the server at `url` from `directory`'s GGUFs and Modelfiles."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for name in MODELS:
            gguf, template, parameters = _modelfile(directory / f"Modelfile.{name}")
            blob = (directory / gguf).read_bytes()
            digest = "sha256:" + hashlib.sha256(blob).hexdigest()
            uploaded = client.post(f"/api/blobs/{digest}", content=blob)
            uploaded.raise_for_status()
            request: dict[str, object] = {"model": name, "files": {gguf: digest}, "stream": False}
            if template is not None:
                request["template"] = template
            if parameters:
                request["parameters"] = parameters
            created = client.post("/api/create", json=request)
            if created.status_code != 200:
                raise Unavailable(f"Ollama at {url} refused to create {name}: {created.text}")


def missing_models(url: str) -> list[str]:
    listed = httpx.get(url + "/api/tags", timeout=10).json()["models"]
    present = {m["name"] for m in listed}
    return [name for name in MODELS if f"{name}:latest" not in present]
